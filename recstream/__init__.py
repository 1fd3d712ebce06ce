"""recstream: an event-driven streaming recommender.

This package is the ground floor that every other one stands on: the shared settings, the error
base class and Redis key naming. It imports no other recstream package. See docs/architecture.md
for the rooms above it.
"""

from recstream.errors import RecstreamError
from recstream.settings import CommonSettings

__all__ = ["CommonSettings", "RecstreamError", "__version__"]

__version__ = "0.1.0"
