"""Tampering helpers shared by the artifact tests: a copied folder with one file changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def copy_artifact(src: Path, dst: Path) -> Path:
    """A full copy of an artifact folder, to tamper with without touching the original."""
    shutil.copytree(src, dst)
    return dst


def flip_last_byte(path: Path) -> None:
    """Change one byte of ``path`` in place (its SHA-256 no longer matches the manifest)."""
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))


def resealed(src: Path, dst: Path, config: dict[str, Any]) -> Path:
    """A copy of an artifact with ``config.json`` replaced and its manifest written and signed
    again (by the environment's signing key): what an older training made, or anyone holding
    the key could."""
    from inference.integrity import signing_key, write_manifest
    from inference.settings import ArtifactSigning

    copy_artifact(src, dst)
    (dst / "config.json").write_text(json.dumps(config), encoding="utf-8")
    manifest = json.loads((dst / "manifest.json").read_text(encoding="utf-8"))
    extra = {k: v for k, v in manifest.items() if k not in {"files", "manifest_version"}}
    write_manifest(dst, extra, signing_key(ArtifactSigning()))
    return dst
