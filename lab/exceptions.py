"""Errors of the offline lab."""

from recstream.errors import RecstreamError


class LabError(RecstreamError):
    """Base class of the lab's errors."""


class DatasetError(LabError):
    """A dataset is missing or malformed."""
