"""The one door from a model name to a loadable source.

A name in params is one of:
- ``"tiny"`` (or ``"tiny-<variant>"``): a small model built from a config with seeded random
  weights, so every code path runs offline;
- a local folder (``./models/bert``, ``/abs/path``): loaded with the library's own loader;
- anything else: a hub id (``bert-base-uncased``) or, for the vision tower, a timm model name.

Each model family (text tower, vision tower, depth, captioner) resolves names here and keeps its own
tiny config beside its loader (the text tokenizer's is in :mod:`pipeline.text`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ModelSource", "resolve", "is_tiny", "no_folder_error"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["tiny", "local", "hub"]
    name: str
    path: Path | None = None


def is_tiny(name: str) -> bool:
    return name == "tiny" or name.startswith("tiny-")


def resolve(name: str) -> ModelSource:
    """Classify a model name; a path-like name must exist, a hub id must be well-formed."""
    if not name:
        raise ValueError("model name is empty (use 'tiny', a local folder, or a hub id)")
    if is_tiny(name):
        return ModelSource("tiny", name)
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or path.exists()
    if looks_like_path:
        if not path.is_dir():
            raise FileNotFoundError(f"{name}: model folder not found")
        return ModelSource("local", name, path.resolve())
    if not _HUB_ID.match(name):
        raise ValueError(f"{name!r} is neither 'tiny', an existing folder, nor a valid hub id")
    return ModelSource("hub", name)


def no_folder_error(name: str | Path, exc: Exception) -> FileNotFoundError:
    """The error for a model name that is no local folder and that the Hub did not give either
    (offline, no such repository, not a valid id): ``models/bset`` (a typo) is a well-formed Hub id
    too, so the missing folder is named first."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FileNotFoundError(
        f"{name}: no such model folder, and fetching it as a Hub model failed "
        f"({type(exc).__name__}: {reason})"
    )
