"""The stream processor: a Faust agent that folds clickstream events into Redis profiles."""

from streams.exceptions import CatalogError, ReplayError, StoreUnavailable, StreamsError
from streams.fold import FoldParams, Weights
from streams.profile import read_profile, read_profile_async
from streams.settings import StreamsSettings

__all__ = [
    "CatalogError",
    "FoldParams",
    "ReplayError",
    "StoreUnavailable",
    "StreamsError",
    "StreamsSettings",
    "Weights",
    "read_profile",
    "read_profile_async",
]
