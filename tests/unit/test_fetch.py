"""`recstream data fetch`: the real download path against a local HTTP server, never the internet.

The server serves a small archive shaped like the official ml-100k.zip; its digests are pinned in
a test ``Archive``, so every step runs as it does for GroupLens: the download (and its resume),
the archive check, the safe unpacking, the per-file check and the provenance record.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from lab import fetch as fetch_mod
from lab.datasets import load_dataset
from lab.exceptions import DatasetError
from lab.fetch import ARCHIVES, PROVENANCE_NAME, Archive, archive_for, fetch_archive, verify_folder
from lab.settings import FetchSettings
from recstream.settings import CommonSettings, default_data_dir

U_DATA = b"1\t10\t5\t881250949\n2\t10\t3\t881250950\n1\t20\t4\t881250951\n"
U_ITEM = (
    "10|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "20|Misérables (1995)|01-Jan-1995||http://x|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
).encode("latin-1")


def _zip(entries: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name in links:  # a symlink entry: mode 0o120777 in the high bits
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16) & 0xFFFF0000
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _archive(payload: bytes, **files: bytes) -> Archive:
    pinned = files or {"u.data": U_DATA, "u.item": U_ITEM}
    return replace(
        ARCHIVES["ml-100k"],
        sha256=_sha(payload),
        size=len(payload),
        files={name.replace("_", "."): _sha(data) for name, data in pinned.items()},
    )


GOOD = _zip({"ml-100k/u.data": U_DATA, "ml-100k/u.item": U_ITEM, "ml-100k/README": b"terms\n"})


@dataclass
class Server:
    """What the local server serves and what it saw: one archive, optional misbehaviour."""

    payload: bytes = GOOD
    cut_at: int | None = None  # send only this many bytes of the body, then hang up
    honour_range: bool = True
    redirect_to: str | None = None
    requests: list[dict[str, str]] = field(default_factory=list)
    bytes_sent: int = 0
    url: str = ""


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's naming
            state.requests.append(dict(self.headers.items()))
            if state.redirect_to:
                self.send_response(302)
                self.send_header("Location", state.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, start = state.payload, 0
            wanted = self.headers.get("Range")
            if wanted and state.honour_range:
                start = int(wanted.removeprefix("bytes=").rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            chunk = body[start : state.cut_at if state.cut_at is not None else len(body)]
            self.wfile.write(chunk)
            state.bytes_sent += len(chunk)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/movielens"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _fetch(server: Server, data_dir: Path, archive: Archive | None = None) -> Path:
    return fetch_archive(
        archive or _archive(server.payload), data_dir, server.url, timeout_s=10, say=lambda _: None
    )


def _leftovers(data_dir: Path) -> list[str]:
    """Staging folders or partial downloads left in the data directory."""
    staged = [p.name for p in data_dir.glob(".ml-100k-*")]
    parts = [p.name for p in (data_dir / ".downloads").glob("*")]
    return staged + parts


def test_happy_path_downloads_verifies_unpacks_and_records_provenance(
    server: Server, tmp_path: Path
) -> None:
    folder = _fetch(server, tmp_path)
    assert folder == tmp_path / "ml-100k"
    assert verify_folder(folder, _archive(GOOD)) == []
    record = json.loads((folder / PROVENANCE_NAME).read_text())
    assert record["url"] == f"{server.url}/ml-100k.zip"
    assert record["archive_sha256"] == _sha(GOOD)
    assert "redistribute" in record["licence"]
    assert "Harper" in record["citation"]
    assert _leftovers(tmp_path) == []
    ds = load_dataset("ml-100k", tmp_path)
    assert len(ds.interactions) == 3
    assert ds.items["20"].title.startswith("Misérables")
    # A second fetch finds the verified folder and downloads nothing.
    _fetch(server, tmp_path)
    assert len(server.requests) == 1


def test_a_tampered_archive_is_refused_and_nothing_is_unpacked(
    server: Server, tmp_path: Path
) -> None:
    pinned = _archive(GOOD)
    tampered = bytearray(GOOD)
    tampered[len(tampered) // 2] ^= 0xFF
    server.payload = bytes(tampered)
    with pytest.raises(DatasetError, match="not the pinned"):
        _fetch(server, tmp_path, pinned)
    assert not (tmp_path / "ml-100k").exists()
    assert _leftovers(tmp_path) == []


def test_a_truncated_download_is_kept_and_the_next_run_resumes_it(
    server: Server, tmp_path: Path
) -> None:
    half = len(GOOD) // 2
    server.cut_at = half
    with pytest.raises(DatasetError, match="interrupted after"):
        _fetch(server, tmp_path)
    part = tmp_path / ".downloads" / "ml-100k.zip.part"
    assert part.stat().st_size == half
    assert not (tmp_path / "ml-100k").exists()

    server.cut_at, server.bytes_sent = None, 0
    folder = _fetch(server, tmp_path)
    assert server.requests[-1]["Range"] == f"bytes={half}-"
    assert server.bytes_sent == len(GOOD) - half  # only the rest travelled
    assert verify_folder(folder, _archive(GOOD)) == []
    assert _leftovers(tmp_path) == []


def test_a_server_that_ignores_the_range_request_gets_a_fresh_download(
    server: Server, tmp_path: Path
) -> None:
    part = tmp_path / ".downloads" / "ml-100k.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that is not a prefix")
    server.honour_range = False
    folder = _fetch(server, tmp_path)
    assert server.bytes_sent == len(GOOD)
    assert verify_folder(folder, _archive(GOOD)) == []


@pytest.mark.parametrize(
    "payload",
    [
        _zip({"ml-100k/u.data": U_DATA, "ml-100k/../escaped": b"x"}),
        _zip({"ml-100k/u.data": U_DATA, "/tmp/absolute": b"x"}),
        _zip({"ml-100k/u.data": U_DATA}, links=("ml-100k/u.item",)),
    ],
    ids=["dot-dot", "absolute", "symlink"],
)
def test_an_archive_with_an_unsafe_entry_is_refused_whole(
    server: Server, tmp_path: Path, payload: bytes
) -> None:
    server.payload = payload
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetError, match="unsafe"):
        _fetch(server, data_dir, _archive(payload, u_data=U_DATA))
    assert not (data_dir / "ml-100k").exists()
    assert not (tmp_path / "escaped").exists()
    assert list(data_dir.iterdir()) == [data_dir / ".downloads"]


def test_an_archive_that_unpacks_to_more_than_the_cap_is_refused(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetch_mod, "MAX_UNPACKED_BYTES", len(U_DATA) + len(U_ITEM) - 1)
    with pytest.raises(DatasetError, match="more than"):
        _fetch(server, tmp_path)
    assert not (tmp_path / "ml-100k").exists()


def test_a_file_that_differs_from_its_pinned_digest_installs_nothing(
    server: Server, tmp_path: Path
) -> None:
    archive = replace(_archive(GOOD), files={"u.data": _sha(b"other")})
    with pytest.raises(DatasetError, match=r"u\.data does not match"):
        _fetch(server, tmp_path, archive)
    assert not (tmp_path / "ml-100k").exists()
    assert [p.name for p in tmp_path.glob(".ml-100k-*")] == []


def test_a_folder_that_does_not_verify_is_replaced_only_with_force(
    server: Server, tmp_path: Path
) -> None:
    folder = _fetch(server, tmp_path)
    (folder / "u.data").write_bytes(b"edited\n")
    with pytest.raises(DatasetError, match="--force"):
        _fetch(server, tmp_path)
    fetch_archive(_archive(GOOD), tmp_path, server.url, force=True, say=lambda _: None)
    assert verify_folder(folder, _archive(GOOD)) == []


def test_a_redirect_to_plain_http_elsewhere_is_refused(server: Server, tmp_path: Path) -> None:
    server.redirect_to = "http://example.org/ml-100k.zip"
    with pytest.raises(DatasetError, match="refused a redirect"):
        _fetch(server, tmp_path)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://files.grouplens.org/datasets/movielens", True),
        ("https://mirror.example/ml/", True),
        ("http://127.0.0.1:8080/ml", True),
        ("http://[::1]:8080/ml", True),
        ("http://localhost/ml", True),
        ("http://files.grouplens.org/datasets/movielens", False),
        ("http://10.0.0.1/ml", False),
        ("ftp://127.0.0.1/ml", False),
        ("file:///tmp/ml", False),
    ],
)
def test_the_base_url_is_https_or_plain_http_to_loopback_only(url: str, allowed: bool) -> None:
    if allowed:
        assert FetchSettings(data_base_url=url).data_base_url == url.rstrip("/")
    else:
        with pytest.raises(ValidationError, match="only https"):
            FetchSettings(data_base_url=url)


def test_the_command_fetches_through_the_settings_and_prints_the_terms(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.main import main

    monkeypatch.setitem(fetch_mod.ARCHIVES, "ml-100k", _archive(GOOD))
    env = {"RECSTREAM_DATA_DIR": str(tmp_path), "RECSTREAM_DATA_BASE_URL": server.url}
    result = CliRunner().invoke(main, ["data", "fetch", "ml-100k"], env=env)
    assert result.exit_code == 0, result.output
    assert "may NOT redistribute" in result.output
    assert "Harper" in result.output
    assert (tmp_path / "ml-100k" / PROVENANCE_NAME).is_file()
    listed = CliRunner().invoke(main, ["data", "list"], env=env)
    assert "ml-100k" in listed.output
    assert "fetched, verified" in listed.output


def test_a_variant_fetches_its_base() -> None:
    assert archive_for("ml-latest-small-llamarec") is ARCHIVES["ml-latest-small"]
    with pytest.raises(DatasetError, match="knows"):
        archive_for("ml-1m")


@pytest.mark.parametrize("name", ["ml-100k", "ml-latest-small", "ml-latest-small-llamarec"])
def test_a_missing_dataset_names_the_command_that_fetches_it(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError, match=f"`recstream data fetch {name}`"):
        load_dataset(name, tmp_path)


def test_an_incomplete_dataset_folder_names_the_forced_fetch(tmp_path: Path) -> None:
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.data").write_bytes(U_DATA)
    with pytest.raises(DatasetError, match=r"lacks u\.item.*fetch ml-100k --force"):
        load_dataset("ml-100k", tmp_path)


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_the_pinned_file_digests_match_the_reference_copies(name: str) -> None:
    # ../shared/data holds copies checked against SOURCE.md; the pins must agree with them.
    folder = CommonSettings().data_dir / name
    assert verify_folder(folder, ARCHIVES[name]) == []


def test_the_data_dir_is_the_setting_then_the_checkout_copy_then_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = tmp_path / "shared" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir(checkout) == tmp_path / "xdg" / "recstream" / "datasets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir(checkout) == tmp_path / "home" / ".cache" / "recstream" / "datasets"
    checkout.mkdir(parents=True)
    assert default_data_dir(checkout) == checkout
    monkeypatch.setenv("RECSTREAM_DATA_DIR", str(tmp_path / "mine"))
    assert CommonSettings().data_dir == tmp_path / "mine"
