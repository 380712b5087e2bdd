"""File plumbing every stage shares: the project's errors, atomic writes, folder swaps, hashing.

A stage never leaves a half-written output that a rerun would trust: a file is written under a temp
name in its own folder, fsynced and renamed into place (:func:`atomic_path`); a folder is built
beside its final name and swapped in with two renames (:func:`staging_dir`, :func:`swap_into_place`),
and a swap cut by a kill between the renames is finished by :func:`recover_swap`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "StaleCacheError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "read_utf8",
    "not_utf8",
    "file_sha256",
    "tree_sha256",
    "link_or_copy",
    "staging_dir",
    "swap_into_place",
    "recover_swap",
]


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the problem."""


class StaleCacheError(RuntimeError):
    """An earlier stage's output made with settings other than the current params."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield the temp path ``.<name>.tmp`` beside ``path`` to write to; on success it is fsynced
    and renamed onto ``path``, on error removed. Readers see the old file or the whole new one,
    never a part. One writer per path: the fixed temp name means a rerun after a kill overwrites
    the leftover instead of leaving a stray file in the output folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole file atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a whole UTF-8 text file atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Indented JSON with sorted keys, so equal objects give equal bytes; written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def not_utf8(data: bytes, exc: UnicodeDecodeError, expected: str = "UTF-8 text") -> tuple[int, str]:
    """Where ``data`` stops being UTF-8 (``exc`` from decoding it): the line, counted from 1, and
    the problem, naming the byte and its column."""
    line_start = data.rfind(b"\n", 0, exc.start) + 1
    problem = (
        f"not UTF-8 (found byte 0x{data[exc.start]:02x} at column {exc.start - line_start + 1}, "
        f"expected {expected})"
    )
    return data.count(b"\n", 0, exc.start) + 1, problem


def read_utf8(path: str | Path, expected: str = "UTF-8 text") -> str:
    """A file's text, as ``read_text`` gives it; a byte that is not UTF-8 raises
    ``DataError("file:line: not UTF-8 (found byte ... at column ...)")``."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, problem = not_utf8(data, exc, expected)
        raise DataError(f"{path}:{line}: {problem}") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")  # read_text's universal newlines


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; a missing file, bytes that are not UTF-8 or bad JSON raise DataError
    naming the file (and line)."""
    path = Path(path)
    try:
        return json.loads(read_utf8(path, "UTF-8 JSON"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: {what} not found") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a file, read in chunks (archives can be many GB)."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def tree_sha256(root: str | Path, pattern: str = "*") -> str:
    """One sha256 over every file under ``root`` whose name matches ``pattern``: relative paths and
    contents, in sorted order."""
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with path.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def link_or_copy(src: str, dst: str) -> None:
    """A ``shutil.copytree`` copy function: hard-link where the file system allows (for files that
    are never rewritten in place), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def swap_into_place(tmp: Path, final: Path) -> None:
    """Replace ``final`` (a folder or nothing) by the fully written folder ``tmp``. A kill between
    the two renames leaves ``.<name>.old``, which :func:`recover_swap` puts back."""
    old = _old_name(final)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(final: Path) -> None:
    """Finish a swap cut by a kill: ``final`` is gone but its previous version is still there."""
    old = _old_name(final)
    if not final.exists() and old.is_dir():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)


def _new_folder(parent: Path, prefix: str, suffix: str) -> Path:
    """A new folder with a unique name in ``parent``, with the mode ``mkdir`` gives (the umask's:
    ``tempfile.mkdtemp`` would make it private, 0700, whatever the umask)."""
    for _ in range(tempfile.TMP_MAX):
        folder = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"{parent}: no unused name {prefix}*{suffix} left")


@contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``out_dir``; on success it replaces ``out_dir``, on error it
    is removed, so a reader never sees a half-written folder. One writer per ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(out_dir)
    # Leftovers of a killed run (same naming scheme) are never trusted: remove them.
    for stale in out_dir.parent.glob(f".{out_dir.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = _new_folder(out_dir.parent, f".{out_dir.name}.", ".partial")
    try:
        yield tmp
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
