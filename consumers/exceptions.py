"""Errors of the consumers: a service that raises one stops non-zero for its supervisor.

Both consumers store a record's offset only after its work is durable (a list published, a list
written, a dead letter delivered), so when one of these ends a service, a restart redoes exactly
the unfinished work.
"""

from __future__ import annotations

from recstream.errors import RecstreamError

__all__ = ["CacheWriteError", "ConsumerError", "DeliveryError", "RedisUnavailableError"]


class ConsumerError(RecstreamError):
    """Base class of the consumers' errors."""


class DeliveryError(ConsumerError):
    """The broker kept refusing a record (a list or a dead letter) past the retry budget."""


class RedisUnavailableError(ConsumerError):
    """Redis stayed unreachable past the regeneration service's retry budget."""


class CacheWriteError(ConsumerError):
    """Redis stayed unreachable or kept failing past the cache writer's retry budget."""
