"""The caption row log: append-only JSONL, one whole line per row, safe against kills.

A row is ``{image_id, key, kind, caption, model, prompt_version, settings, input}``; ``settings``
is the hash of the run's options that change an answer and ``input`` that of the item's own inputs
(``pipeline.caption.run.item_inputs``), so rows made with other settings or from other inputs are
never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.caption.prompts import PromptSet
from pipeline.io import DataError

__all__ = ["settings_id", "read_row_log", "append_rows", "row_lines"]

log = logging.getLogger(__name__)


def settings_id(model: str, prompts: PromptSet, max_new_tokens: int, dtype: str) -> str:
    """A short hash of everything that changes an answer; rows of other settings are not reused."""
    payload = json.dumps(
        [model, prompts.version, prompts.sha256, max_new_tokens, dtype], separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


_ROW_KEYS = ("image_id", "key", "caption", "settings")


def read_row_log(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Rows of a caption log. A trailing line without its newline (a write cut by a kill) is not
    trusted: ignored, and cut off the file when ``repair`` (the log's own writer is restarting)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # not started yet, or merged and removed by the last worker
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: ignoring a half-written last row (%d bytes)", path, len(data) - end)
        if repair:
            os.truncate(path, end)
    rows = []
    for lineno, line in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or any(k not in row for k in _ROW_KEYS):
                raise ValueError(f"expected an object with keys {', '.join(_ROW_KEYS)}")
        except ValueError as exc:
            raise DataError(
                f"{path}:{lineno}: corrupt caption row ({exc}); delete this file to start over"
            ) from exc
        rows.append(row)
    return rows


def append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append whole lines and fsync, so after a crash the log holds complete rows only (plus at
    most one cut line, which :func:`read_row_log` drops)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as fh:
        fh.write(row_lines(rows).encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def row_lines(rows: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
