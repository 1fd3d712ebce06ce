"""Errors of the read API."""

from __future__ import annotations

from recstream.errors import ConfigError, RecstreamError

__all__ = ["IngestFailed", "KeysFileError", "UnsafeExposureError"]


class KeysFileError(ConfigError):
    """The API keys file is missing, unreadable, writable by others or malformed."""


class UnsafeExposureError(ConfigError):
    """The API would serve a non-loopback address without keys (or a removed setting is set)."""


class IngestFailed(RecstreamError):  # noqa: N818 - the name of what happened, like ErasureFailed
    """Kafka refused a request's events or did not acknowledge them in time (answered 503)."""
