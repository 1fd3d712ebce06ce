"""Settings of the read API (``recstream serve api``).

Every field reads ``RECSTREAM_<FIELD>`` from the environment, e.g. ``RECSTREAM_API_PORT`` or
``RECSTREAM_API_KEY``; command-line flags override them.
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
