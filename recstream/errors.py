"""The one base class of every error recstream raises on purpose.

Each package (`streams`, `consumers`, `inference`, `schemas`) defines its own errors in its
`exceptions.py`, all deriving from :class:`RecstreamError`, so callers can catch the project's
errors without catching programming mistakes.
"""


class RecstreamError(Exception):
    """Base class of all errors raised deliberately by recstream."""


class ConfigError(RecstreamError):
    """A setting is missing, malformed or inconsistent."""


class StackError(RecstreamError):
    """The local Kafka/Redis stack cannot be provisioned, started or reached."""
