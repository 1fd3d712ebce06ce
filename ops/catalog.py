"""Load a dataset's item metadata into Redis, where the fold script finds item categories.

Each item becomes a hash ``item:{id}`` with ``title``, ``categories`` (``|``-separated) and
``year`` (empty when unknown); every id joins the set ``catalog:items``; ``catalog:meta`` records
the dataset name, its input files' SHA-256 digests (JSON) and the item count.
"""

from __future__ import annotations

import json
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
