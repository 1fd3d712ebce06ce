"""Errors of the inference package."""

from recstream.errors import RecstreamError


class InferenceError(RecstreamError):
    """Base class of the inference package's errors."""


class ArtifactError(InferenceError):
    """A model artifact is missing, incomplete or fails its integrity check."""
