"""Errors of the operator tools (``recstream replay ...``)."""

from recstream.errors import RecstreamError

__all__ = ["OpsError", "ReplayError"]


class OpsError(RecstreamError):
    """Base class of the operator tools' errors."""


class ReplayError(OpsError):
    """A replay cannot start, cannot reach Kafka or Redis, or would corrupt existing state."""
