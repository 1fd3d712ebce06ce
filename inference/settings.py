"""Settings of artifact trust: which keys may sign the artifacts a service loads, and who signs.

Every process that loads an artifact (the regeneration workers, ``recstream eval``, the benches)
verifies its manifest signature against the public keys here; only ``recstream train`` needs the
private key. Both read ``RECSTREAM_ARTIFACT_<SETTING>``: serving is given the verify key(s) and
never the signing key. The regeneration service carries :class:`ArtifactTrust` as its
``regen_artifact`` sub-model (``RECSTREAM_REGEN_ARTIFACT__<SETTING>`` overrides the shared names).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from recstream.settings import ENV_PREFIX

__all__ = ["ARTIFACT_ENV_PREFIX", "ArtifactSigning", "ArtifactTrust"]

ARTIFACT_ENV_PREFIX = f"{ENV_PREFIX}ARTIFACT_"


class ArtifactTrust(BaseSettings):
    """The public keys an artifact's manifest must be signed by, and the unsigned escape hatch."""

    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix=ARTIFACT_ENV_PREFIX, frozen=True, extra="ignore"
    )

    verify_key: str = Field(
        "",
        description="Ed25519 public key(s) that may sign artifacts, base64, comma-separated "
        "(several during a key rotation).",
    )
    verify_key_file: Path | None = Field(
        None, description="File of Ed25519 public keys (base64 or PEM), one per line."
    )
    allow_unsigned: bool = Field(
        False,
        description="Load an artifact without a signature (development only); a signature that "
        "is present is still checked against the verify keys.",
    )


class ArtifactSigning(BaseSettings):
    """The private key ``recstream train`` signs manifests with (never given to a service)."""

    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        env_prefix=ARTIFACT_ENV_PREFIX, frozen=True, extra="ignore"
    )

    signing_key: SecretStr | None = Field(
        None, description="Ed25519 private key (base64 of its 32 raw bytes, or PEM)."
    )
    signing_key_file: Path | None = Field(
        None, description="File holding the Ed25519 private key (mode 0600)."
    )
