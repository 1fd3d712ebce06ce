"""The catalog item: what the lab reads from a dataset and what serving embeds and shows.

It lives with the contracts because both sides reach it: the offline lab builds items from
dataset files, and serving (text embeddings, the index) reads them without importing the lab.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Item"]


@dataclass(frozen=True, slots=True)
class Item:
    """One catalog item."""

    item_id: str
    title: str
    categories: tuple[str, ...] = ()
    year: int | None = None
    description: str = ""
