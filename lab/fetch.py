"""Download the MovieLens datasets the project knows from their publisher, verified, with terms.

``recstream data fetch NAME`` downloads the official GroupLens archive over HTTPS into
``{data_dir}/.downloads/<archive>.part`` (resuming an interrupted download with an HTTP Range
request the server must confirm: 206 and a matching Content-Range, otherwise it starts again),
checks the whole archive against a SHA-256 pinned here (a mismatch deletes it and unpacks
nothing), unpacks it into a staging folder inside the data directory (no absolute paths, no
``..``, no links; a size cap against zip bombs), checks the files the loaders read against their
own pinned digests, writes ``PROVENANCE.json`` (URL, archive digest, time, licence) beside them
and only then renames the folder into place, so a dataset folder is either complete or absent.

A variant (``ml-latest-small-llamarec``) is derived from its base dataset when loaded, so fetching
it fetches the base.

The pinned digests (each from two independent projects that pin the official archives):
tensorflow/datasets ``tensorflow_datasets/url_checksums/movielens.txt`` (commit 1c076ac3c19c:
size and SHA-256 of both zips) and ankane/disco-cli ``src/download.rs`` (commit 42f5617a6681:
the same two SHA-256). The per-file digests are those of ``../shared/data/*/SOURCE.md``, the same
values published next to downloads of the official archives (for ml-100k's README, u.data,
u.item and u.user; for all five files of ml-latest-small).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import HTTPRedirectHandler, OpenerDirector, Request, build_opener

from inference.integrity import sha256_file
from lab.datasets import NAMED, VARIANTS
from lab.exceptions import DatasetError
from lab.settings import FetchSettings, check_url

__all__ = [
    "ARCHIVES",
    "PROVENANCE_NAME",
    "Archive",
    "archive_for",
    "download",
    "fetch",
    "fetch_archive",
    "unpack",
    "verify_folder",
]

Say = Callable[[str], None]
PROVENANCE_NAME = "PROVENANCE.json"
DOWNLOADS = ".downloads"
# Far above both archives' contents (16 MB and 3.3 MB): a bound against a zip bomb.
MAX_UNPACKED_BYTES = 1 << 30
_CHUNK = 1 << 16

_CITATION = (
    'F. Maxwell Harper and Joseph A. Konstan. 2015. "The MovieLens Datasets: History and '
    'Context". ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4, Article 19. '
    "https://doi.org/10.1145/2827872"
)


@dataclass(frozen=True)
class Archive:
    """One official archive: where it is, its pinned digests, and the terms it comes under.

    ``name`` is both the archive's top folder and the dataset folder under the data directory;
    ``files`` are the pinned SHA-256 of files inside it (relative to that folder).
    """

    name: str
    filename: str
    sha256: str
    size: int
    files: Mapping[str, str]
    homepage: str
    licence: str

    @property
    def citation(self) -> str:
        return _CITATION


ARCHIVES: dict[str, Archive] = {
    "ml-100k": Archive(
        name="ml-100k",
        filename="ml-100k.zip",
        sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        size=4_924_029,
        files={
            "README": "4883b8cf340ed0059971b33f56ad3adc88a40792108ebca3d24aafc4c82e8b52",
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
            "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
        },
        homepage="https://grouplens.org/datasets/movielens/100k/",
        licence=(
            "MovieLens 100K, GroupLens Research, University of Minnesota. Terms (its README):\n"
            "- research use only; no endorsement by the University of Minnesota or GroupLens may "
            "be implied;\n"
            "- acknowledge the data in any publication that uses it (cite below);\n"
            "- you may NOT redistribute the data without separate permission;\n"
            "- no commercial or revenue-bearing use without permission from GroupLens."
        ),
    ),
    "ml-latest-small": Archive(
        name="ml-latest-small",
        filename="ml-latest-small.zip",
        sha256="696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
        size=978_202,
        files={
            "README.txt": "63d22ac138e80fae37021797ed8e1b9424b5239dc576a137422adf783ae3f404",
            "links.csv": "97ad18e4e56a09363c65676b6cb3482ce3e2cea2372a24620c1599c843325f31",
            "movies.csv": "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07",
            "ratings.csv": "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646",
            "tags.csv": "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d",
        },
        homepage="https://grouplens.org/datasets/movielens/latest/",
        licence=(
            "MovieLens Latest Small (a development dataset that GroupLens may change), GroupLens "
            "Research, University of Minnesota. Terms (its README.txt):\n"
            "- research use; no endorsement by the University of Minnesota or GroupLens may be "
            "implied;\n"
            "- acknowledge the data in any publication that uses it (cite below);\n"
            "- redistribution, transformations included, only under these same terms;\n"
            "- no commercial or revenue-bearing use without permission from a GroupLens faculty "
            "member."
        ),
    ),
}


def archive_for(name: str) -> Archive:
    """The archive that holds dataset ``name`` (a variant's is its base's)."""
    base = VARIANTS.get(name, (name, 0))[0]
    if base not in ARCHIVES:
        known = ", ".join(NAMED)
        raise DatasetError(f"unknown dataset {name!r}: `recstream data fetch` knows {known}")
    return ARCHIVES[base]


def fetch(
    name: str,
    settings: FetchSettings | None = None,
    *,
    force: bool = False,
    say: Say = print,
) -> Path:
    """Fetch dataset ``name`` (or its base) into the configured data directory; its folder."""
    settings = settings or FetchSettings()
    return fetch_archive(
        archive_for(name),
        settings.data_dir,
        settings.data_base_url,
        timeout_s=settings.data_timeout_s,
        force=force,
        say=say,
    )


def fetch_archive(
    archive: Archive,
    data_dir: Path,
    base_url: str,
    *,
    timeout_s: float = 60.0,
    force: bool = False,
    say: Say = print,
) -> Path:
    """Download, verify and unpack ``archive`` into ``data_dir / archive.name``; that folder.

    A folder that is already there and verifies is kept (nothing is downloaded); one that does not
    verify is replaced only with ``force``.
    """
    dest = data_dir / archive.name
    if dest.exists() and not force:
        problems = verify_folder(dest, archive)
        if problems:
            raise DatasetError(
                f"{dest} exists but does not verify ({problems[0]}); replace it with "
                f"`recstream data fetch {archive.name} --force`"
            )
        say(f"{archive.name}: already in {dest} (verified)")
        return dest
    data_dir.mkdir(parents=True, exist_ok=True)
    part = data_dir / DOWNLOADS / f"{archive.filename}.part"
    url = f"{base_url.rstrip('/')}/{archive.filename}"
    download(url, part, archive.size, timeout_s=timeout_s, say=say)
    digest = sha256_file(part)
    if digest != archive.sha256:
        part.unlink()
        raise DatasetError(
            f"{url}: SHA-256 {digest} is not the pinned {archive.sha256}; refused, nothing was "
            "unpacked (the download was deleted)"
        )
    folder = unpack(part, archive, data_dir, url=url)
    part.unlink()
    say(f"{archive.name}: verified and unpacked into {folder}")
    return folder


def _opener() -> OpenerDirector:
    return build_opener(_NoDowngrade())


class _NoDowngrade(HTTPRedirectHandler):
    """Follow a redirect only to a URL the download would accept in the first place."""

    def redirect_request(  # noqa: PLR0917 - urllib's signature
        self,
        req: Request,
        fp: object,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> Request | None:
        try:
            check_url(newurl)
        except ValueError as exc:
            raise DatasetError(f"refused a redirect from {req.full_url}: {exc}") from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)  # type: ignore[arg-type]  # fp is the response, typeshed says IO


def _range_start(content_range: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes <start>-<end>/<total>`` header."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    first = content_range[6:].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else None


def download(url: str, part: Path, size: int, *, timeout_s: float = 60.0, say: Say = print) -> None:
    """Stream ``url`` into ``part`` until it holds ``size`` bytes, resuming what is there.

    An interrupted download keeps its ``.part`` and raises :class:`DatasetError`; running again
    resumes it. A server that ignores the Range request (200 instead of 206, or another
    Content-Range) gets the whole file again from the start.
    """
    check_url(url)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size:
        return
    headers = {"User-Agent": "recstream-data-fetch"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = _opener().open(Request(url, headers=headers), timeout=timeout_s)
    except HTTPError as exc:
        if exc.code == 416 and have:  # our .part is not a prefix the server knows: start again
            part.unlink()
            download(url, part, size, timeout_s=timeout_s, say=say)
            return
        raise DatasetError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, URLError) else exc
        raise DatasetError(f"{url}: cannot download ({reason})") from None
    with response:
        resumed = bool(have) and response.status == 206
        resumed = resumed and _range_start(response.headers.get("Content-Range")) == have
        if have and not resumed:
            say(f"{url}: the server did not resume; downloading from the start")
            have = 0
        elif have:
            say(f"{url}: resuming after {have} of {size} bytes")
        else:
            say(f"downloading {url} ({size / 1e6:.1f} MB)")
        written = have
        with part.open("ab" if resumed else "wb") as out:
            try:
                while chunk := response.read(_CHUNK):
                    written += len(chunk)
                    if written > size:
                        break
                    out.write(chunk)
            except (http.client.HTTPException, OSError) as exc:
                raise DatasetError(
                    f"{url}: download interrupted after {written} of {size} bytes ({exc!r}); "
                    "run the same command again to resume"
                ) from None
    if written > size:
        part.unlink()
        raise DatasetError(f"{url}: more than the expected {size} bytes; refused and deleted")
    if written < size:
        raise DatasetError(
            f"{url}: download interrupted after {written} of {size} bytes; run the same "
            "command again to resume"
        )


def _members(zf: zipfile.ZipFile, top: str) -> list[zipfile.ZipInfo]:
    """The regular files under ``top/``; refuse the archive if any entry could escape."""
    members: list[zipfile.ZipInfo] = []
    declared = 0
    for info in zf.infolist():
        name = info.filename
        pure = PurePosixPath(name)
        mode = info.external_attr >> 16
        if (
            name.startswith(("/", "\\"))
            or "\\" in name
            or ":" in pure.parts[0]
            or ".." in pure.parts
            or (mode & 0o170000) not in (0, 0o100000, 0o040000)  # only files and folders
        ):
            raise DatasetError(f"archive entry {name!r} is unsafe (absolute, '..' or a link)")
        if info.is_dir() or pure.parts[0] != top:
            continue  # e.g. __MACOSX/ metadata: never unpacked
        declared += info.file_size
        if declared > MAX_UNPACKED_BYTES:
            raise DatasetError(f"archive unpacks to more than {MAX_UNPACKED_BYTES} bytes; refused")
        members.append(info)
    if not members:
        raise DatasetError(f"archive has no files under {top}/")
    return members


def unpack(zip_path: Path, archive: Archive, data_dir: Path, *, url: str) -> Path:
    """Unpack a verified archive into ``data_dir / archive.name`` atomically; that folder."""
    staging = Path(tempfile.mkdtemp(prefix=f".{archive.name}-", dir=data_dir))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for info in _members(zf, archive.name):
                    target = staging.joinpath(*PurePosixPath(info.filename).parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, target.open("xb") as out:
                        copied = 0
                        while chunk := src.read(_CHUNK):
                            copied += len(chunk)
                            if copied > info.file_size:
                                raise DatasetError(f"{info.filename} is larger than declared")
                            out.write(chunk)
        except (zipfile.BadZipFile, FileExistsError) as exc:
            raise DatasetError(f"{zip_path.name} is not a well-formed zip archive: {exc}") from exc
        folder = staging / archive.name
        problems = verify_folder(folder, archive)
        if problems:
            raise DatasetError(f"{archive.filename}: {problems[0]}; nothing was installed")
        _write_provenance(folder, archive, url)
        dest = data_dir / archive.name
        if dest.exists():
            # --force: the old folder moves into the staging area and goes with it.
            dest.rename(staging / f"{archive.name}.replaced")
        os.rename(folder, dest)
        return dest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_folder(folder: Path, archive: Archive) -> list[str]:
    """What is wrong with ``folder`` against the pinned per-file digests (empty: it verifies)."""
    problems = []
    for rel, expected in archive.files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{rel} does not match its pinned SHA-256")
    return problems


def _write_provenance(folder: Path, archive: Archive, url: str) -> None:
    record = {
        "dataset": archive.name,
        "url": url,
        "archive_sha256": archive.sha256,
        "archive_bytes": archive.size,
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "homepage": archive.homepage,
        "files_sha256": dict(archive.files),
        "licence": archive.licence,
        "citation": archive.citation,
    }
    (folder / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def provenance(folder: Path) -> dict[str, object] | None:
    """The provenance ``fetch`` recorded beside a dataset, if it was fetched by it."""
    path = folder / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
