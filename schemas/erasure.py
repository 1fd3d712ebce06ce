"""The erasure record (GDPR art. 17): compacted topic ``users.erased``, key = user_id.

Published once per erasure before any data is deleted, it is what every fold honours: the user's
clickstream events at offsets below ``watermarks`` (each clickstream partition's end offset when
the user was erased) were erased and are never folded again; events at or above them are new and
start a new profile. The topic is compacted, so the latest record of every erased user is kept
for as long as the topic exists; the live stream worker keeps the same record in Redis beside the
user's keys (``Keys.erased``), and every rebuild reads the topic from its start.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Id

__all__ = ["ErasureReceipt", "StoredKey", "UserErased", "UserExport"]


class UserErased(BaseModel):
    """One user's erasure: who, when, and where the erased history ends."""

    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    user_id: Id
    erased_at_ms: Annotated[int, Field(ge=0)] = Field(
        description="When the erasure was recorded (epoch milliseconds)."
    )
    topic: Annotated[str, Field(min_length=1, max_length=249)] = Field(
        description="The clickstream topic whose offsets the watermarks are."
    )
    watermarks: dict[int, Annotated[int, Field(ge=0)]] = Field(
        description="Clickstream partition -> its end offset at the erasure: the user's events "
        "below it are erased, the ones at or above it are new."
    )

    def fields(self) -> dict[str, int]:
        """The watermarks as the fold's marker hash holds them (``topic:partition`` -> offset)."""
        return {f"{self.topic}:{p}": offset for p, offset in self.watermarks.items()}


class ErasureReceipt(BaseModel):
    """What one erasure did: the answer of ``DELETE /v1/users/{user_id}`` and of the CLI."""

    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True, extra="forbid")

    user_id: Id
    erased_at_ms: Annotated[int, Field(ge=0)]
    topic: str = Field(description="The clickstream topic of the watermarks.")
    watermarks: dict[int, Annotated[int, Field(ge=0)]] = Field(
        description="Clickstream partition -> end offset at the erasure (see UserErased)."
    )
    deleted_keys: Annotated[int, Field(ge=0)] = Field(
        description="Redis keys deleted, in every namespace (0 when nothing was stored)."
    )
    namespaces: list[str] = Field(description="Key prefixes that held keys of the user.")
    marked: list[str] = Field(
        description="Key prefixes where the erasure marker was written (live, rebuilds running)."
    )
    pending_notices_removed: Annotated[int, Field(ge=0)] = Field(
        description="Change notices of the user removed from the stream worker's pending hashes."
    )


class StoredKey(BaseModel):
    """One Redis key of a user, decoded."""

    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True, extra="forbid")

    key: str
    ttl_s: int | None = Field(description="Seconds until it expires; null: it does not.")
    value: Any = Field(
        description="A hash as an object, a sorted set as [member, score] pairs, a JSON string "
        "decoded."
    )


class UserExport(BaseModel):
    """Everything stored about one user (GDPR art. 15): ``GET /v1/users/{user_id}/export``."""

    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True, extra="forbid")

    user_id: Id
    key_prefix: str
    keys: dict[str, StoredKey] = Field(
        description="Per kind (profile, items, cats, recent, seen, recs, privacy, erased, ...)."
    )
    pending_notices: dict[str, Any] = Field(
        description="Change notices of the user not yet confirmed by Kafka, per pending hash."
    )
