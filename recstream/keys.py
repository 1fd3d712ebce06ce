"""Redis key naming, in one place so every service and tool agrees.

Ids come from producers and may hold any character (``:``, ``{``, ``%``, line separators), so they
never reach a key raw: each id is escaped with ``urllib.parse.quote(id, safe="")``, which leaves
only ``[A-Za-z0-9_.~-]`` and ``%XX`` and is reversible (:meth:`Keys.user_of`). An escaped id
holds no ``:``, ``{`` or ``}``, so no id can name, or be a prefix of, another id's keys.

Every key of one user carries the user's escaped id as a Redis Cluster hash tag,
``{prefix}u:{<enc>}:<kind>``, so a user's keys share one hash slot (a script or transaction over
them is valid in a cluster). The per-user kinds are :data:`USER_KINDS`; Lua scripts receive the
per-user base (:meth:`Keys.user_base`) from Python and append a kind, and never build a key from
a raw id. Item keys are ``{prefix}item:<enc>``. The prefix is ``RECSTREAM_KEY_PREFIX`` (empty by
default); it may not contain ``{`` or ``}``, which would move the hash tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

__all__ = ["USER_KINDS", "Keys", "escape", "unescape"]

USER_KINDS: Final = ("profile", "items", "cats", "recent", "seen", "recs")
"""The suffixes of a user's keys (``{prefix}u:{<enc>}:<kind>``), in the order Lua scripts use."""


def escape(identifier: str) -> str:
    """An id as it appears inside a key: percent-escaped, no byte but ``[A-Za-z0-9_.~-%]``."""
    return quote(identifier, safe="")


def unescape(escaped: str) -> str:
    """The id :func:`escape` turned into ``escaped``."""
    return unquote(escaped, errors="strict")


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds Redis keys under one prefix (a namespace)."""

    prefix: str = ""

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"key prefix {self.prefix!r} may not contain '{{' or '}}'")

    def user_base(self, user_id: str) -> str:
        """``{prefix}u:{<enc>}:``: every key of the user is this plus one of :data:`USER_KINDS`."""
        return f"{self.prefix}u:{{{escape(user_id)}}}:"

    def profile(self, user_id: str) -> str:
        return f"{self.user_base(user_id)}profile"

    def profile_items(self, user_id: str) -> str:
        """Hash item -> decayed interaction weight (scaled to the profile's base time)."""
        return f"{self.user_base(user_id)}items"

    def profile_categories(self, user_id: str) -> str:
        """Hash category -> decayed affinity (scaled to the profile's base time)."""
        return f"{self.user_base(user_id)}cats"

    def profile_recent(self, user_id: str) -> str:
        """Sorted set item -> newest interaction ts (epoch seconds), bounded."""
        return f"{self.user_base(user_id)}recent"

    def seen(self, user_id: str) -> str:
        """Sorted set of event ids already folded into the user's profile (idempotency)."""
        return f"{self.user_base(user_id)}seen"

    def recs(self, user_id: str) -> str:
        return f"{self.user_base(user_id)}recs"

    def privacy_ledger(self, user_id: str) -> str:
        """Hash of the user's spent privacy budget (``inference.privacy.PrivacyLedger``).

        Not in :data:`USER_KINDS`: the fold never touches it, and it outlives an idle profile
        (a budget that expired with the profile would be spent again).
        """
        return f"{self.user_base(user_id)}privacy"

    def erased(self, user_id: str) -> str:
        """Hash ``topic:partition`` -> end offset when the user was erased (plus ``erased_at_ms``).

        The erasure marker (``streams.erasure``): the fold skips the user's events below these
        offsets, so an erased history is never folded again. Not in :data:`USER_KINDS` and never
        given the idle TTL: it must outlive the events it stands for.
        """
        return f"{self.user_base(user_id)}erased"

    def user_keys(self, user_id: str) -> list[str]:
        """Every key of the user, one per :data:`USER_KINDS` (for export, erasure, tests)."""
        base = self.user_base(user_id)
        return [base + kind for kind in USER_KINDS]

    def user_pattern(self, kind: str) -> str:
        """SCAN ``MATCH`` pattern of every user's ``kind`` key under this prefix only."""
        if kind not in USER_KINDS:
            raise ValueError(f"unknown user key kind {kind!r}")
        return f"{_glob_escape(self.prefix)}u:{{*}}:{kind}"

    def user_match_nested(self, user_id: str) -> str:
        """SCAN ``MATCH`` pattern of every key of this user under this prefix and every
        namespace nested in it (:meth:`namespace`), whatever the kind.

        The escaped id holds no glob metacharacter and no ``{``/``}``, and a prefix may hold no
        brace, so ``u:{<enc>}:`` occurs in a key only as this user's hash tag: no other user's
        key matches.
        """
        return f"{_glob_escape(self.prefix)}*u:{{{_glob_escape(escape(user_id))}}}:*"

    def user_of(self, key: str | bytes) -> str:
        """The user id of one of this prefix's user keys (inverse of :meth:`user_base`)."""
        text = key.decode() if isinstance(key, bytes) else key
        head = f"{self.prefix}u:{{"
        end = text.find("}", len(head))
        if not text.startswith(head) or end < 0:
            raise ValueError(f"{text!r} is not a user key under prefix {self.prefix!r}")
        return unescape(text[len(head) : end])

    def item(self, item_id: str) -> str:
        return f"{self.prefix}item:{escape(item_id)}"

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

    def stream_offsets(self, group: str) -> str:
        """Hash ``topic:partition`` -> next offset to read, written by the fold of ``group``.

        The stream worker (consumer group ``group``) resumes from these, not from Kafka's
        commits: they are written in the same script as the profiles they account for.
        """
        return f"{self.prefix}streams:{escape(group)}:offsets"

    def trending(self, day: int) -> str:
        """Hash item id -> how many profiles took the item up on ``day`` (whole UTC days since
        the epoch, by event time): the stream worker's recent-popularity counts. No user id."""
        return f"{self.trending_base()}{int(day)}"

    def trending_base(self) -> str:
        """What :meth:`trending` puts before the day (the fold script appends it)."""
        return f"{self.prefix}streams:trend:"

    def returning(self) -> str:
        """Sorted set user id -> when the regeneration service makes the user's list again for
        their return (event time, epoch seconds; ``consumers.returning``). Erasure removes the
        user from it."""
        return f"{self.prefix}regen:returning"

    def pending_changes(self, group: str, topic: str, partition: int) -> str:
        """Hash user -> change notice decided by ``group``'s fold, until Kafka has it (JSON)."""
        return f"{self.prefix}streams:{escape(group)}:pending:{escape(topic)}:{int(partition)}"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
