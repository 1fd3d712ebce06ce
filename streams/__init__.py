"""The stream processor: clickstream events folded into Redis profiles, and reading them back.

The fold (:class:`ProfileFolder`) is plain code; the Faust app that feeds it lives in
``streams.app`` and is not imported here, so readers of profiles never load Faust.
"""

from streams.exceptions import StoreUnavailable, StreamsError
from streams.fold import FoldParams, Weights
from streams.folder import ProfileFolder
from streams.profile import read_profile, read_profile_async
from streams.settings import StreamsSettings

__all__ = [
    "FoldParams",
    "ProfileFolder",
    "StoreUnavailable",
    "StreamsError",
    "StreamsSettings",
    "Weights",
    "read_profile",
    "read_profile_async",
]
