"""Operator tools: replay topic history to rebuild profiles or re-run regeneration, compare outputs.

The comparison metrics, settings and errors load with the package. The Kafka- and Redis-backed
tools load on first access (``ProfileRebuild`` pulls in Redis and the fold), so the
command line stays fast.
"""

from ops.compare import Comparison, compare, kendall_tau_union, overlap_at_k
from ops.exceptions import OpsError, ReplayError
from ops.settings import OpsSettings
from recstream.lazy import lazy_exports

__all__ = [
    "Comparison",
    "OpsError",
    "OpsSettings",
    "PartitionRange",
    "ProfileRebuild",
    "RegenReplay",
    "ReplayError",
    "TopicReader",
    "changed_users",
    "compare",
    "compare_topics",
    "kendall_tau_union",
    "latest_lists",
    "overlap_at_k",
]

_LAZY = {
    "PartitionRange": "ops.topics",
    "TopicReader": "ops.topics",
    "ProfileRebuild": "ops.rebuild",
    "RegenReplay": "ops.regen",
    "changed_users": "ops.regen",
    "compare_topics": "ops.regen",
    "latest_lists": "ops.regen",
}


__getattr__ = lazy_exports("ops", _LAZY)
