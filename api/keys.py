"""API keys: random tokens handed out once, stored only as SHA-256 digests with their scopes.

A key is ``rs_<key id>_<secret>``: 12 hex digits that name it (public: the keys file and
``recstream api keys list`` show them) and 256 random bits (``secrets.token_urlsafe(32)``). The
keys file holds one :class:`~schemas.api.ApiKeyRecord` per line (JSON): ``recstream api keys add``
appends one, ``revoke`` rewrites the file without it, and the API reads it; the key itself is
printed once and stored nowhere.

Checking a key looks its record up by id, then compares the SHA-256 of what was sent with the
stored digest in constant time (:func:`hmac.compare_digest`). An unknown id, or text that is not a
key at all, is compared against a digest no key has, so every refusal does the same work and gets
the same answer. A single unsalted SHA-256 is right here (unlike for passwords): the secret is 256
random bits, so no dictionary or brute force can reach it, and a slow hash would only add latency
to every read.

The file holds no secret, but whoever can write it can add keys: it is created 0600, and a file
that its group or others may write is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from api.exceptions import KeysFileError
from schemas.api import ApiKeyRecord, Scope

__all__ = ["KeyRing", "add_key", "digest", "new_key", "read_keys_file", "revoke_key"]

log = logging.getLogger(__name__)

_KEY = re.compile(r"rs_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")
# What an unknown id is compared against: random per process, so no key can match it.
_NO_KEY_DIGEST = secrets.token_hex(32).encode()


def digest(key: str) -> str:
    """Hex SHA-256 of the key as sent (header text may hold any character; none is lost)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key(
    scopes: Iterable[Scope],
    name: str,
    *,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> tuple[str, ApiKeyRecord]:
    """A fresh key and the record to store for it (which holds only its digest)."""
    key_id = secrets.token_hex(6)
    key = f"rs_{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKeyRecord(
        key_id=key_id,
        sha256=digest(key),
        scopes=tuple(scopes),
        name=name,
        created_at=now or datetime.now(UTC),
        expires_at=expires_at,
    )
    return key, record


def _check_file(path: Path) -> os.stat_result:
    try:
        info = path.stat()
    except OSError as exc:
        raise KeysFileError(f"API keys file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeysFileError(f"API keys file {path} is not a regular file")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KeysFileError(
            f"API keys file {path} may be written by its group or others, who could add keys "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod go-w {path}`"
        )
    return info


def read_keys_file(path: Path) -> list[ApiKeyRecord]:
    """Every record of the file, in order; refuses an unsafe, malformed or ambiguous file.

    Errors name the file and the line, never its content.
    """
    _check_file(path)
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"API keys file {path} cannot be read: {type(exc).__name__}") from None
    records: list[ApiKeyRecord] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(ApiKeyRecord.model_validate_json(line))
        except ValidationError:
            raise KeysFileError(f"API keys file {path}, line {number}: not a key record") from None
    ids = [record.key_id for record in records]
    if len(ids) != len(set(ids)):
        raise KeysFileError(f"API keys file {path} lists a key id twice")
    return records


def add_key(path: Path, record: ApiKeyRecord) -> None:
    """Append ``record`` to the keys file, creating it (mode 0600) if needed."""
    if path.exists() and any(r.key_id == record.key_id for r in read_keys_file(path)):
        raise KeysFileError(f"key id {record.key_id} is already in {path}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as out:
        out.write(record.model_dump_json() + "\n")  # one write: a reader sees whole lines


def revoke_key(path: Path, key_id: str) -> ApiKeyRecord:
    """Remove the key ``key_id`` from the file (replaced atomically, same mode); returns it."""
    records = read_keys_file(path)
    gone = [r for r in records if r.key_id == key_id]
    if not gone:
        raise KeysFileError(f"no key {key_id!r} in {path}")
    mode = stat.S_IMODE(path.stat().st_mode)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(r.model_dump_json() + "\n" for r in records if r.key_id != key_id)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return gone[0]


class KeyRing:
    """The keys the API accepts, read from the keys file and re-read when the file changes.

    The file is checked at most once per ``check_every_s`` (a stat), so a revocation or a new
    key takes effect within about a second, without a restart. A file that turns unusable
    (removed, made writable by others, malformed) refuses every key until it is fixed: a
    half-written or tampered list never grants anything.
    """

    def __init__(
        self,
        path: Path,
        *,
        check_every_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._every = check_every_s
        self._clock = clock
        self._by_id = {r.key_id: r for r in read_keys_file(path)}  # at start, errors surface
        self._seen: tuple[int, int, int, int] | None = self._signature(_check_file(path))
        self._checked = clock()

    def __len__(self) -> int:
        return len(self._by_id)

    @staticmethod
    def _signature(info: os.stat_result) -> tuple[int, int, int, int]:
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_mode)

    def _refresh(self) -> None:
        now = self._clock()
        if now - self._checked < self._every:
            return
        self._checked = now
        try:
            seen = self._signature(_check_file(self.path))
            if seen == self._seen:
                return
            self._by_id = {r.key_id: r for r in read_keys_file(self.path)}
            self._seen = seen
            log.info("API keys reloaded: %d keys", len(self._by_id))
        except KeysFileError as exc:
            if self._by_id or self._seen is not None:
                log.error("%s; every key is refused until it is fixed", exc)
            self._by_id, self._seen = {}, None

    def authenticate(self, key: str, now: datetime) -> ApiKeyRecord | None:
        """The record of ``key`` when it is one of ours and has not expired; ``None`` otherwise."""
        self._refresh()
        match = _KEY.fullmatch(key)
        record = self._by_id.get(match.group(1)) if match else None
        expected = record.sha256.encode() if record is not None else _NO_KEY_DIGEST
        same = hmac.compare_digest(digest(key).encode(), expected)
        if not same or record is None or record.expired(now):
            return None
        return record
