"""Errors of the read API."""

from __future__ import annotations

from recstream.errors import ConfigError

__all__ = ["KeysFileError", "UnsafeExposureError"]


class KeysFileError(ConfigError):
    """The API keys file is missing, unreadable, writable by others or malformed."""


class UnsafeExposureError(ConfigError):
    """The API would serve a non-loopback address without keys (or a removed setting is set)."""
