"""recstream: an event-driven streaming recommender.

This package holds what every service shares: settings, the error base class, Redis key naming,
logging and the command-line entry point. Each service lives in its own top-level package
(`schemas`, `streams`, `consumers`, `inference`).
"""

from recstream.errors import RecstreamError
from recstream.settings import CommonSettings

__all__ = ["CommonSettings", "RecstreamError", "__version__"]

__version__ = "0.1.0"
