"""Downloads (Google Drive, HTTP(S), local files), checksums and safe archive extraction.

A *source* is ``gdrive:<file id>``, an ``http(s)://`` or ``file://`` URL, or a local path. URLs and
local paths go through the same resumable code (a local path becomes a ``file://`` URL), so tests
serve crafted archives without a network; :class:`Downloader` ``redirect`` maps a source to another
(a mirror, or a local file in tests) while the Drive and HTTP code stays the code that runs.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import DataError, file_sha256, staging_dir

__all__ = [
    "ChecksumError",
    "UnsafeArchiveError",
    "Downloader",
    "Download",
    "verify_sha256",
    "safe_extract",
    "download_url",
    "download_drive",
    "is_archive",
]

log = logging.getLogger(__name__)

MAX_UNCOMPRESSED_BYTES = 64 * 2**30  # refuse archives that would unpack to more than this
_CHUNK = 1 << 20


class ChecksumError(DataError):
    """A file whose sha256 differs from the pinned one."""


class UnsafeArchiveError(DataError):
    """An archive entry that would land outside the target, or an archive too large to unpack."""


def verify_sha256(path: Path, expected: str) -> str:
    """Return the file's sha256; raise :class:`ChecksumError` if ``expected`` is set and differs."""
    found = file_sha256(path)
    if expected and found != expected.strip().lower():
        raise ChecksumError(f"{path}: sha256 mismatch (found {found}, expected {expected})")
    return found


# --- extraction ---------------------------------------------------------------------------------
def is_archive(path: Path) -> bool:
    return Path(path).is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path))


ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def looks_like_archive(path: Path) -> bool:
    """Named like an archive, or starting as a zip does: a file that claims to be an archive
    (one that :func:`is_archive` refuses is then damaged, not something else)."""
    path = Path(path)
    if path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return True
    with path.open("rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _check_name(archive: Path, name: str) -> None:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} has an absolute path (expected a path inside the archive)"
        )
    if ".." in norm.split("/"):
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} points outside the target (found '..', expected a path "
            "inside the archive)"
        )


def _check_tar_member(archive: Path, member: tarfile.TarInfo) -> None:
    _check_name(archive, member.name)
    if member.issym() or member.islnk():
        link = member.linkname.replace("\\", "/")
        # A symlink is relative to its own folder, a hard link to the archive root.
        base = posixpath.dirname(member.name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, link))
        if link.startswith("/") or resolved == ".." or resolved.startswith("../"):
            raise UnsafeArchiveError(
                f"{archive}: link {member.name!r} -> {member.linkname!r} points outside the target"
            )
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(
            f"{archive}: entry {member.name!r} is a special file (expected files and folders)"
        )


def safe_extract(archive: Path, target: Path, max_bytes: int = MAX_UNCOMPRESSED_BYTES) -> Path:
    """Unpack a .zip or .tar(.gz/.bz2/.xz) into ``target``: every entry is checked first, the
    files land in a temp folder beside ``target`` and move into place only when complete."""
    archive, target = Path(archive), Path(target)
    try:
        _extract(archive, target, max_bytes)
    except tarfile.FilterError as exc:  # the "data" filter: e.g. a chain of links that leaves
        raise UnsafeArchiveError(f"{archive}: {exc} (expected entries inside the target)") from exc
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        # EOFError is a truncated gzip/bz2/xz stream (click would print only "Aborted.").
        kind = "zlib.error" if isinstance(exc, zlib.error) else type(exc).__name__
        raise DataError(
            f"{archive}: corrupt or truncated archive (found {kind}: {exc}); download or copy "
            "it again"
        ) from exc
    return target


def _extract(archive: Path, target: Path, max_bytes: int) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_name(archive, info.filename)
            _check_size(archive, sum(i.file_size for i in infos), max_bytes)
            with staging_dir(target) as tmp:
                zf.extractall(tmp)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for member in members:
                _check_tar_member(archive, member)
            _check_size(archive, sum(m.size for m in members if m.isfile()), max_bytes)
            with staging_dir(target) as tmp:
                # The "data" filter re-checks every entry as it is written (defence in depth).
                tf.extractall(tmp, filter="data")
    else:
        with archive.open("rb") as fh:
            head = fh.read(8)
        raise DataError(f"{archive}: not a zip or tar archive (found first bytes {head!r})")


def _check_size(archive: Path, total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise UnsafeArchiveError(
            f"{archive}: unpacks to {total} bytes (expected at most {max_bytes})"
        )


# --- downloads ----------------------------------------------------------------------------------
def _progress(total: int | None, initial: int, desc: str):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (DVC logs, CI).
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=desc, disable=None)


def download_url(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Fetch an http(s):// or file:// URL to ``dest`` through ``<dest>.part``, resuming a partial
    file with a Range request when the server honours it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "remote-pipeline"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is stale or complete: start over
            part.unlink()
            return download_url(url, dest, timeout)
        raise DataError(f"{url}: download failed (found HTTP {exc.code} {exc.reason})") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DataError(f"{url}: download failed ({exc})") from exc
    except http.client.HTTPException as exc:  # e.g. BadStatusLine: a reply that is not HTTP
        raise DataError(
            f"{url}: download failed (found {type(exc).__name__}: {exc}, expected an HTTP reply)"
        ) from exc
    with response:
        resumed = (
            offset > 0
            and getattr(response, "status", None) == 206
            and (response.headers.get("Content-Range") or "").startswith(f"bytes {offset}-")
        )
        if offset and not resumed:
            log.info("%s: server ignored the resume request, downloading from the start", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        try:
            with (
                part.open("ab" if resumed else "wb") as fh,
                _progress(total, offset, dest.name) as bar,
            ):
                try:
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        fh.write(block)
                        bar.update(len(block))
                except http.client.IncompleteRead as exc:
                    # The whole chunks that arrived before the cut: the next run resumes after them.
                    fh.write(exc.partial)
                    raise
        except (http.client.HTTPException, OSError) as exc:
            # A connection cut mid-body: IncompleteRead (chunked responses) is no OSError.
            raise DataError(
                f"{url}: download interrupted (found {type(exc).__name__}: {exc}); rerun to resume"
            ) from exc
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(
            f"{url}: incomplete download (found {size} bytes, expected {total}); rerun to resume"
        )
    os.replace(part, dest)
    return dest


def download_drive(file_id: str, dest: Path) -> Path:
    """Fetch a Google Drive file with gdown (resumable; gdown keeps its own partial file)."""
    import gdown

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = gdown.download(id=file_id, output=str(dest), quiet=False, resume=True)
    except Exception as exc:  # gdown raises its own types for quota, permissions, network
        raise DataError(f"Google Drive file {file_id}: download failed ({exc})") from exc
    if not result or not dest.is_file():
        raise DataError(
            f"Google Drive file {file_id}: download failed (found no file at {dest}; "
            "expected a public file — check the id, or download it by hand to this path)"
        )
    return dest


def source_url(source: str) -> str:
    """A URL for a URL or a local path (``gdrive:`` sources have none)."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", source):
        return source
    return Path(source).expanduser().resolve().as_uri()


@dataclass(frozen=True)
class Download:
    source: str
    path: Path
    sha256: str
    pinned: bool

    def provenance(self) -> dict[str, object]:
        return {"source": self.source, "sha256": self.sha256, "pinned": self.pinned}


@dataclass
class Downloader:
    """Fetches each source once into ``cache_dir/downloads/<source hash>/``, then reuses it."""

    cache_dir: Path
    # source -> the source actually fetched (a mirror; a local file in tests).
    redirect: Mapping[str, str] = field(default_factory=dict)
    fetch_url: Callable[[str, Path], Path] = download_url
    fetch_drive: Callable[[str, Path], Path] = download_drive

    def fetch(self, source: str, name: str, sha256: str = "") -> Download:
        """Download ``source`` as ``name`` (unless cached) and verify the pinned sha256."""
        # One cache folder per source, so a changed id or URL never reuses another file.
        key = hashlib.sha256(source.encode()).hexdigest()[:12]
        dest = Path(self.cache_dir) / "downloads" / key / name
        if dest.is_file() and sha256 and file_sha256(dest) != sha256.strip().lower():
            log.warning("%s: cached file does not match the pinned sha256, downloading again", dest)
            dest.unlink()
        if not dest.is_file():
            actual = self.redirect.get(source, source)
            log.info("downloading %s -> %s", actual, dest)
            if actual.startswith("gdrive:"):
                self.fetch_drive(actual.removeprefix("gdrive:"), dest)
            else:
                self.fetch_url(source_url(actual), dest)
        try:
            found = verify_sha256(dest, sha256)
        except ChecksumError:
            # Keep the bad file for inspection, out of the way of the next run.
            os.replace(dest, dest.with_name(dest.name + ".mismatch"))
            raise
        return Download(source, dest, found, bool(sha256))

    def extract(self, download: Download) -> Path:
        """Unpack a downloaded archive into the cache, keyed by its checksum (reused if present)."""
        target = Path(self.cache_dir) / "extracted" / download.sha256[:16]
        if not target.is_dir():
            log.info("extracting %s -> %s", download.path, target)
            safe_extract(download.path, target)
        return target


def url_join(base: str, file_name: str) -> str:
    """``base/file_name`` with the file name URL-encoded (MNRE's "mnre_val .txt" has a space)."""
    return base.rstrip("/") + "/" + urllib.parse.quote(file_name)
