"""Interaction datasets: MovieLens by name, or any folder in the generic format.

A dataset is read by name (``ml-100k``, ``ml-latest-small``, resolved under the data directory
setting, where ``recstream data fetch`` downloads them) or by path to a folder holding
``interactions.csv`` (``user_id,item_id,timestamp[,event_type][,value]``; timestamp in epoch
seconds or RFC 3339) and an optional ``items.csv`` (``item_id,title[,categories][,description]``;
categories ``|``-separated).
Interactions come back ordered by time, ties keeping file order, and every input file's SHA-256 is
recorded so results can name exactly what they were computed from.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from inference.integrity import sha256_file
from lab.exceptions import DatasetError
from schemas.catalog import Item

__all__ = [
    "NAMED",
    "Dataset",
    "Interaction",
    "Item",
    "core_filter",
    "fetch_command",
    "load_dataset",
    "resolve",
    "sha256_file",
]

NAMED = ("ml-100k", "ml-latest-small", "ml-latest-small-llamarec")
# Variants read another dataset's files and filter them; name -> (source folder, min count).
VARIANTS = {"ml-latest-small-llamarec": ("ml-latest-small", 5)}
# The files each named dataset's loader reads (tags.csv is optional).
_READ = {"ml-100k": ("u.data", "u.item"), "ml-latest-small": ("ratings.csv", "movies.csv")}
_YEAR = re.compile(r"\((\d{4})\)\s*$")
_ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


@dataclass(frozen=True, slots=True)
class Interaction:
    """One user-item interaction; ``value`` is the rating where the dataset has one."""

    user_id: str
    item_id: str
    ts: float
    event_type: str | None = None
    value: float | None = None


@dataclass
class Dataset:
    """Interactions in time order (ties in file order), the catalog, and input-file digests."""

    name: str
    interactions: list[Interaction]
    items: dict[str, Item]
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        return list(dict.fromkeys(i.user_id for i in self.interactions))

    def histories(self) -> dict[str, list[Interaction]]:
        """Each user's interactions in time order."""
        out: dict[str, list[Interaction]] = {}
        for it in self.interactions:
            out.setdefault(it.user_id, []).append(it)
        return out


def resolve(name_or_path: str | Path, data_dir: Path) -> tuple[str, Path]:
    """Map a dataset name or folder path to ``(name, folder)``; raise if it does not exist."""
    text = str(name_or_path)
    if text in NAMED:
        base = VARIANTS.get(text, (text, 0))[0]
        folder = data_dir / base
        if not folder.is_dir():
            raise DatasetError(
                f"dataset {text!r} not found under {data_dir} (RECSTREAM_DATA_DIR); "
                f"download it with `{fetch_command(text)}`"
            )
        missing = [name for name in _READ[base] if not (folder / name).is_file()]
        if missing:
            raise DatasetError(
                f"dataset {text!r} in {folder} lacks {', '.join(missing)}; download it again "
                f"with `{fetch_command(text)} --force`"
            )
        return text, folder
    folder = Path(text).expanduser()
    if not (folder / "interactions.csv").is_file():
        raise DatasetError(
            f"{text!r} is neither a known dataset ({', '.join(NAMED)}) nor a folder with "
            "interactions.csv"
        )
    return folder.name, folder


def fetch_command(name: str) -> str:
    """The command that downloads the named dataset (a variant's base) into the data directory."""
    return f"recstream data fetch {name}"


def load_dataset(name_or_path: str | Path, data_dir: Path) -> Dataset:
    """Load a dataset by name or folder; interactions sorted by time, ties in file order."""
    name, folder = resolve(name_or_path, data_dir)
    if name == "ml-100k" and str(name_or_path) == "ml-100k":
        ds = _load_ml100k(folder)
    elif name == "ml-latest-small" and str(name_or_path) == "ml-latest-small":
        ds = _load_ml_latest(folder)
    elif str(name_or_path) in VARIANTS:
        ds = _load_ml_latest(folder)
        ds.interactions.sort(key=lambda it: it.ts)
        ds = core_filter(ds, VARIANTS[str(name_or_path)][1], str(name_or_path))
    else:
        ds = _load_generic(folder)
    ds.interactions.sort(key=lambda it: it.ts)  # stable: ties keep file order
    return ds


def core_filter(ds: Dataset, min_count: int, name: str) -> Dataset:
    """Keep titled items, then drop items and users with < ``min_count`` interactions until stable.

    This is the LlamaRec preprocessing of ml-latest-small (items with metadata, 5-core). LlamaRec
    filters once (items, then users); iterating until nothing changes guarantees that every kept
    user and item has at least ``min_count`` interactions. On ml-latest-small both rules keep
    610 users, 3,650 items and 90,274 ratings.
    """
    kept = [it for it in ds.interactions if it.item_id in ds.items and ds.items[it.item_id].title]
    while True:
        item_n = Counter(it.item_id for it in kept)
        user_n = Counter(it.user_id for it in kept)
        nxt = [
            it for it in kept if item_n[it.item_id] >= min_count and user_n[it.user_id] >= min_count
        ]
        if len(nxt) == len(kept):
            break
        kept = nxt
    item_ids = {it.item_id for it in kept}
    items = {k: v for k, v in ds.items.items() if k in item_ids}
    return Dataset(name, kept, items, dict(ds.sha256))


def _digests(*paths: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in paths if p.exists()}


def _split_title(title: str) -> tuple[str, int | None]:
    match = _YEAR.search(title)
    return (title, int(match.group(1))) if match else (title, None)


def _load_ml100k(folder: Path) -> Dataset:
    data, item_file = folder / "u.data", folder / "u.item"
    interactions = []
    with data.open(encoding="latin-1") as fh:
        for line in fh:
            user, item, rating, ts = line.split("\t")
            interactions.append(Interaction(user, item, float(ts), "rating", float(rating)))
    items: dict[str, Item] = {}
    with item_file.open(encoding="latin-1") as fh:
        for line in fh:
            parts = line.rstrip("\n").split("|")
            if len(parts) < 24:
                continue
            flags = parts[5:24]
            cats = tuple(g for g, flag in zip(_ML100K_GENRES, flags, strict=True) if flag == "1")
            title, year = _split_title(parts[1])
            if year is None and parts[2]:
                year = int(parts[2][-4:])
            items[parts[0]] = Item(parts[0], title, cats, year)
    return Dataset("ml-100k", interactions, items, _digests(data, item_file))


def _load_ml_latest(folder: Path) -> Dataset:
    ratings, movies, tags = folder / "ratings.csv", folder / "movies.csv", folder / "tags.csv"
    interactions = []
    with ratings.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            interactions.append(
                Interaction(
                    row["userId"],
                    row["movieId"],
                    float(row["timestamp"]),
                    "rating",
                    float(row["rating"]),
                )
            )
    tag_text: dict[str, list[str]] = {}
    if tags.exists():
        with tags.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                bucket = tag_text.setdefault(row["movieId"], [])
                tag = row["tag"].strip()
                if tag and tag.lower() not in (t.lower() for t in bucket):
                    bucket.append(tag)
    items: dict[str, Item] = {}
    with movies.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            genres = row["genres"]
            cats = () if genres == "(no genres listed)" else tuple(genres.split("|"))
            title, year = _split_title(row["title"].strip())
            desc = ", ".join(tag_text.get(row["movieId"], [])[:20])
            items[row["movieId"]] = Item(row["movieId"], title, cats, year, desc)
    return Dataset("ml-latest-small", interactions, items, _digests(ratings, movies, tags))


def _parse_ts(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DatasetError(f"timestamp {text!r} is neither epoch seconds nor RFC 3339") from exc
    if stamp.tzinfo is None:
        raise DatasetError(f"timestamp {text!r} has no UTC offset")
    return stamp.timestamp()


def _load_generic(folder: Path) -> Dataset:
    inter_file, items_file = folder / "interactions.csv", folder / "items.csv"
    interactions = []
    with inter_file.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        required = {"user_id", "item_id", "timestamp"}
        if not required <= set(reader.fieldnames or ()):
            raise DatasetError(f"{inter_file} needs columns {sorted(required)}")
        for line_no, row in enumerate(reader, start=2):
            try:
                value = float(row["value"]) if row.get("value") not in (None, "") else None
                interactions.append(
                    Interaction(
                        row["user_id"],
                        row["item_id"],
                        _parse_ts(row["timestamp"]),
                        row.get("event_type") or None,
                        value,
                    )
                )
            except (DatasetError, ValueError) as exc:
                raise DatasetError(f"{inter_file}:{line_no}: {exc}") from exc
    items: dict[str, Item] = {}
    if items_file.exists():
        with items_file.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                title, year = _split_title(row.get("title", "").strip())
                cats = tuple(c for c in (row.get("categories") or "").split("|") if c)
                items[row["item_id"]] = Item(
                    row["item_id"], title, cats, year, row.get("description") or ""
                )
    else:
        for it in interactions:
            items.setdefault(it.item_id, Item(it.item_id, it.item_id))
    return Dataset(folder.name, interactions, items, _digests(inter_file, items_file))
