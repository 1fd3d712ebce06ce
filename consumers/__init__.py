"""confluent-kafka consumers: change-triggered regeneration and the recommendations cache writer.

The regeneration core (:func:`model_history`, :class:`RecsPublisher`) is public because the
operator replay (``ops.regen``) regenerates through it too; :class:`DeadReason` lists the
``dlq.reason`` codes of ``profiles.changed.dlq`` and ``recommendations.dlq``.
"""

from consumers.cache_writer import CacheWriter, RecsCache
from consumers.coalesce import Coalescer, OffsetTracker
from consumers.deadletter import DeadReason
from consumers.regen import RegenService, build_pool
from consumers.regenerate import ItemTitles, RecentCounts, RecsPublisher, model_history
from consumers.settings import CacheWriterSettings, RegenSettings

__all__ = [
    "CacheWriter",
    "CacheWriterSettings",
    "Coalescer",
    "DeadReason",
    "ItemTitles",
    "OffsetTracker",
    "RecentCounts",
    "RecsCache",
    "RecsPublisher",
    "RegenService",
    "RegenSettings",
    "build_pool",
    "model_history",
]
