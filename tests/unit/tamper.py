"""Tampering helpers shared by the artifact tests: a copied folder with one file changed."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_artifact(src: Path, dst: Path) -> Path:
    """A full copy of an artifact folder, to tamper with without touching the original."""
    shutil.copytree(src, dst)
    return dst


def flip_last_byte(path: Path) -> None:
    """Change one byte of ``path`` in place (its SHA-256 no longer matches the manifest)."""
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
