"""Response bodies of the read API that are not wire messages: its error envelope and health.

The API's main body is :class:`~schemas.messages.Recommendations`, the same contract the cache
holds; these models cover the rest, so every response the API sends, and the OpenAPI document
that describes it (:mod:`schemas.openapi`), come from models in this package.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ErrorBody", "ErrorResponse", "Health"]


class _Body(BaseModel):
    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True, extra="forbid")


class ErrorBody(_Body):
    """What went wrong: a stable code for programs, a sentence for people."""

    code: Annotated[str, Field(pattern=r"^[a-z0-9_]+$", max_length=64)] = Field(
        description="Stable and machine-friendly: `bad_user_id`, `bad_k`, `unauthorized`, "
        "`unavailable`, `internal`, or the HTTP reason in snake case (`not_found`, "
        "`method_not_allowed`)."
    )
    message: Annotated[str, Field(max_length=256)]


class ErrorResponse(_Body):
    """The body of every 4xx and 5xx answer."""

    error: ErrorBody

    @classmethod
    def of(cls, code: str, message: str) -> ErrorResponse:
        return cls(error=ErrorBody(code=code, message=message))


class Health(_Body):
    """Whether the service can answer reads: it is up, and Redis answered a ping."""

    ok: bool
    redis: bool
