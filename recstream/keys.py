"""Redis key naming, in one place so every service and tool agrees.

Keys are ``{prefix}profile:{user}``, ``{prefix}recs:{user}``, ``{prefix}item:{item}``; the prefix
is the ``RECSTREAM_KEY_PREFIX`` setting (empty by default, as DESIGN.md specifies).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds Redis keys under one prefix (a namespace)."""

    prefix: str = ""

    def profile(self, user_id: str) -> str:
        return f"{self.prefix}profile:{user_id}"

    def profile_items(self, user_id: str) -> str:
        """Hash item -> decayed interaction weight (scaled to the profile's base time)."""
        return f"{self.prefix}profile:{user_id}:items"

    def profile_categories(self, user_id: str) -> str:
        """Hash category -> decayed affinity (scaled to the profile's base time)."""
        return f"{self.prefix}profile:{user_id}:cats"

    def profile_recent(self, user_id: str) -> str:
        """Sorted set item -> newest interaction ts (epoch seconds), bounded."""
        return f"{self.prefix}profile:{user_id}:recent"

    def seen(self, user_id: str) -> str:
        """Set of event ids already folded into the user's profile (idempotency)."""
        return f"{self.prefix}seen:{user_id}"

    def recs(self, user_id: str) -> str:
        return f"{self.prefix}recs:{user_id}"

    def item(self, item_id: str) -> str:
        return f"{self.prefix}item:{item_id}"

    def catalog(self) -> str:
        """Set of every item id in the catalog."""
        return f"{self.prefix}catalog:items"

    def catalog_meta(self) -> str:
        """Hash describing the loaded catalog (dataset name, sha256, item count)."""
        return f"{self.prefix}catalog:meta"

    def popular(self) -> str:
        """Sorted set item -> minus its interaction count in the catalog's dataset.

        Negated so that Redis's ascending order, ties broken by id, is the popularity ranking:
        ``ZRANGE {prefix}catalog:popular 0 9`` lists the ten most popular items.
        """
        return f"{self.prefix}catalog:popular"

    def namespace(self, name: str) -> Keys:
        """Keys of a side namespace nested under this prefix (e.g. a profile rebuild)."""
        return Keys(f"{self.prefix}ns:{name}:")

    def replay_state(self) -> str:
        """Hash of a profile rebuild's progress: phase, per-partition next and end offsets."""
        return f"{self.prefix}replay:state"
