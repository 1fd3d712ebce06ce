"""Errors of the consumers package."""

from recstream.errors import RecstreamError

__all__ = ["ConsumerError"]


class ConsumerError(RecstreamError):
    """A consumer cannot reach its broker or store, or is misconfigured."""
