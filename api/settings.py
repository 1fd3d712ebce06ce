"""Settings of the read API (``recstream serve api``).

Every field the API owns starts with ``api_`` and reads ``RECSTREAM_API_<SETTING>`` (e.g.
``RECSTREAM_API_PORT``, ``RECSTREAM_API_KEY``), the rule of every service's settings
(recstream/settings.py); command-line flags, generated from these fields, override them. The key
is a secret: it has no flag, so it never shows in a process list.
"""

from __future__ import annotations

from pydantic import Field, SecretStr

from recstream.settings import CommonSettings

__all__ = ["ApiSettings"]


class ApiSettings(CommonSettings):
    """The HTTP service web frontends read recommendations from."""

    api_host: str = Field("127.0.0.1", description="Listen address.")
    api_port: int = Field(8000, ge=0, le=65535, description="Listen port.")
    api_key: SecretStr | None = Field(
        None, description="When set, /v1 requests must send it in the X-API-Key header."
    )
    api_default_k: int = Field(10, ge=1, le=200, description="Items returned when k is not given.")
    api_max_k: int = Field(100, ge=1, le=1000, description="Largest k a client may ask for.")
    api_variant: str = Field("default", description="Variant named on fallback lists.")
