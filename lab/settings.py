"""Settings of the lab's dataset download (``recstream data fetch``): ``RECSTREAM_DATA_*``."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator

from recstream.settings import CommonSettings, is_loopback

OFFICIAL_BASE_URL = "https://files.grouplens.org/datasets/movielens"


class FetchSettings(CommonSettings):
    """Where archives are downloaded from and how long a stalled read may take."""

    data_base_url: str = Field(
        OFFICIAL_BASE_URL,
        description="Folder URL the archives are downloaded from (a mirror); HTTPS, or plain "
        "HTTP on a loopback address only (the tests' local server).",
    )
    data_timeout_s: float = Field(60.0, gt=0, description="Socket timeout of the download.")

    @field_validator("data_base_url")
    @classmethod
    def _https_or_loopback(cls, url: str) -> str:
        check_url(url)
        return url.rstrip("/")


def check_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is HTTPS, or plain HTTP to a loopback address.

    The archive's SHA-256 is checked whatever the transport; HTTPS also keeps what is being
    downloaded private and a redirect from being a downgrade.
    """
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return
    raise ValueError(f"{url!r}: only https:// URLs (or http:// to a loopback address) are allowed")
