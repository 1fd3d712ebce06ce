"""confluent-kafka consumers: change-triggered regeneration and the recommendations cache writer."""

from consumers.cache_writer import CacheWriter, RecsCache
from consumers.coalesce import Coalescer, OffsetTracker
from consumers.exceptions import ConsumerError
from consumers.regen import RegenService, build_pool
from consumers.settings import CacheWriterSettings, RegenSettings

__all__ = [
    "CacheWriter",
    "CacheWriterSettings",
    "Coalescer",
    "ConsumerError",
    "OffsetTracker",
    "RecsCache",
    "RegenService",
    "RegenSettings",
    "build_pool",
]
