"""Load a dataset's item metadata and popularity into Redis, for the services that read them.

Each item becomes a hash ``item:{id}`` with ``title``, ``categories`` (``|``-separated) and
``year`` (empty when unknown), where the fold script finds item categories; every id joins the set
``catalog:items``; ``catalog:popular`` ranks items by their interaction count in the dataset, the
read API's fallback for users without a cached list (see :meth:`recstream.keys.Keys.popular`);
``catalog:meta`` records the dataset name, its input files' SHA-256 digests (JSON) and the item
count.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

import redis

from lab.datasets import Dataset
from recstream.keys import Keys

CHUNK = 1000


def load_catalog(client: redis.Redis, keys: Keys, dataset: Dataset) -> int:
    """Write every item of ``dataset``; returns the number of items written."""
    items = list(dataset.items.values())
    for start in range(0, len(items), CHUNK):
        pipe = client.pipeline(transaction=False)
        chunk = items[start : start + CHUNK]
        for item in chunk:
            pipe.hset(
                keys.item(item.item_id),
                mapping={
                    "title": item.title,
                    "categories": "|".join(item.categories),
                    "year": "" if item.year is None else str(item.year),
                },
            )
        pipe.sadd(keys.catalog(), *(item.item_id for item in chunk))
        pipe.execute()
    store_popularity(client, keys, Counter(it.item_id for it in dataset.interactions))
    client.hset(
        keys.catalog_meta(),
        mapping={
            "dataset": dataset.name,
            "sha256": json.dumps(dataset.sha256, sort_keys=True),
            "items": str(len(items)),
            "loaded_at": datetime.now(UTC).isoformat(),
        },
    )
    return len(items)


def store_popularity(client: redis.Redis, keys: Keys, counts: Counter[str]) -> None:
    """Replace the popularity ranking with ``counts``.

    One transaction, so a reader never sees a mix of two datasets, nor an empty set mid-reload.
    """
    ranked = list(counts.items())
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.popular())
    for start in range(0, len(ranked), CHUNK):
        pipe.zadd(keys.popular(), {item: -n for item, n in ranked[start : start + CHUNK]})
    pipe.execute()
