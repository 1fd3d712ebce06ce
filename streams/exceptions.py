"""Errors of the streams package."""

from recstream.errors import RecstreamError


class StreamsError(RecstreamError):
    """Base class of the streams package's errors."""


class StoreUnavailable(StreamsError):  # noqa: N818 - reads as a state, like "TimeoutError"
    """Redis stayed unreachable past the retry budget; the worker stops instead of spinning."""


class ErasureFailed(StreamsError):  # noqa: N818 - reads as an outcome, like StoreUnavailable
    """A user's erasure could not be recorded (Kafka did not take the record); nothing was
    deleted, so it can simply be tried again."""
