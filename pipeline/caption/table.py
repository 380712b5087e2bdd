"""Reader of the caption stage's output, and the list of things a dataset needs captions for.

The caption stage writes ``data/captions/``::

    captions.json    image id -> {key: caption}, key = a text entity's name or an object's "[OBJk]"
    captions.jsonl   one row per (image id, key), with the model and prompt version that wrote it
    manifest.json    backend, model, prompt version, counts, coverage

:class:`CaptionTable` reads it (or a bare caption file in the UMRE ``cap_qwenvl_simply.json``
format). This module imports no model code, so the features stage can use it cheaply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import CaptionParams
from pipeline.data.records import SPLITS, Dataset
from pipeline.io import DataError, read_json

__all__ = [
    "CaptionItem",
    "Coverage",
    "CaptionTable",
    "caption_items",
    "read_caption_mapping",
    "coverage_of",
]

CAPTIONS_JSON = "captions.json"
CAPTIONS_JSONL = "captions.jsonl"
MANIFEST_JSON = "manifest.json"


@dataclass(frozen=True)
class CaptionItem:
    """One thing to describe: a text entity (``key`` = its name) or an object (``key`` = "[OBJk]"),
    with the post text it appears in and, for an object, its box in [0, 1] image coordinates."""

    image_id: str
    key: str
    kind: Literal["entity", "object"]
    text: str
    box: tuple[float, float, float, float] | None = None


def caption_items(dataset: Dataset) -> list[CaptionItem]:
    """Every distinct (image id, key) of the dataset, sorted by (image id, key).

    Keys are the names of the text heads/tails of all splits, plus every object listed in
    ``objects.json`` for each image that a record uses (not only the objects some record names), so
    a caption table covers what any later pairing of the same images could ask for. The post text
    of an image is the text of its first record (splits in order train, valid, test; file order).
    """
    objects = dataset.objects
    texts: dict[str, str] = {}
    entities: set[tuple[str, str]] = set()
    for split in SPLITS:
        for record in dataset.records(split):
            texts.setdefault(record.image_id, " ".join(record.text_tokens))
            for entity in (record.head, record.tail):
                if entity.kind == "text":
                    entities.add((record.image_id, entity.name))
    items = [CaptionItem(image_id, name, "entity", texts[image_id]) for image_id, name in entities]
    for image_id, text in texts.items():
        for key, box in objects.get(image_id, {}).items():
            x1, y1, x2, y2 = (float(v) for v in box)
            items.append(CaptionItem(image_id, key, "object", text, (x1, y1, x2, y2)))
    return sorted(items, key=lambda it: (it.image_id, it.key))


@dataclass(frozen=True)
class Coverage:
    """How many of the wanted (image id, key) pairs have a caption, split by kind."""

    total: int
    found: int
    entities_total: int
    entities_found: int
    objects_total: int
    objects_found: int
    missing: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def fraction(self) -> float:
        return self.found / self.total if self.total else 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "found": self.found,
            "fraction": round(self.fraction, 6),
            "entities": {"total": self.entities_total, "found": self.entities_found},
            "objects": {"total": self.objects_total, "found": self.objects_found},
        }


def coverage_of(captions: dict[str, dict[str, str]], items: Iterable[CaptionItem]) -> Coverage:
    """Coverage of ``items`` by a mapping image id -> {key: caption}."""
    counts = {"entity": [0, 0], "object": [0, 0]}
    missing = []
    for item in items:
        counts[item.kind][0] += 1
        if item.key in captions.get(item.image_id, {}):
            counts[item.kind][1] += 1
        else:
            missing.append((item.image_id, item.key))
    (et, ef), (ot, of) = counts["entity"], counts["object"]
    return Coverage(et + ot, ef + of, et, ef, ot, of, tuple(missing))


def read_caption_mapping(path: str | Path) -> dict[str, dict[str, str]]:
    """Read and check a caption file in the UMRE format: image -> {name or "[OBJk]": text}."""
    path = Path(path)
    raw = read_json(path, "caption file")
    if not isinstance(raw, dict):
        raise DataError(
            f"{path}: expected a JSON object image id -> {{key: caption}}, "
            f"found {type(raw).__name__}"
        )
    for image_id, entries in raw.items():
        if not isinstance(entries, dict):
            raise DataError(
                f"{path}: image {image_id!r}: expected an object {{key: caption}}, "
                f"found {type(entries).__name__}"
            )
        for key, caption in entries.items():
            if not isinstance(caption, str):
                raise DataError(
                    f"{path}: image {image_id!r} key {key!r}: expected a caption string, "
                    f"found {type(caption).__name__} {caption!r}"
                )
    return raw


class CaptionTable:
    """Captions by (image id, key), read from the caption stage's folder or a bare caption file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            manifest_path = self.path / MANIFEST_JSON
            if not manifest_path.is_file():
                raise DataError(f"{self.path}: not a caption stage output (no {MANIFEST_JSON})")
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
            self._captions = read_caption_mapping(self.path / CAPTIONS_JSON)
        else:
            self.manifest = {"backend": "file", "source_file": str(self.path)}
            self._captions = read_caption_mapping(self.path)

    @property
    def backend(self) -> str:
        """``"mllm"``, ``"file"`` or ``"none"`` (no captions: the single-segment ablation)."""
        return self.manifest["backend"]

    @property
    def model(self) -> str | None:
        return self.manifest.get("model")

    @property
    def prompt_version(self) -> str | None:
        return self.manifest.get("prompt_version")

    def check_made_with(self, params: CaptionParams) -> None:
        """Refuse captions from another backend, or another captioning model, than ``params``
        ask for (a caption folder from an earlier run with other settings): ``DataError``."""
        rerun = "; rerun the caption stage with these params (dvc repro caption)"
        if self.backend != params.backend:
            raise DataError(
                f"{self.path}: captions made by caption.backend {self.backend!r}, but the params "
                f"say {params.backend!r}{rerun}"
            )
        if self.backend == "mllm" and self.model != params.model:
            raise DataError(
                f"{self.path}: captions made by caption.model {self.model!r}, but the params say "
                f"{params.model!r}{rerun}"
            )

    def get(self, image_id: str, key: str) -> str | None:
        """The caption of a text entity (by name) or an object ("[OBJk]") in an image, or None."""
        return self._captions.get(image_id, {}).get(key)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._captions.values())

    def image_ids(self) -> list[str]:
        return sorted(self._captions)

    def as_dict(self) -> dict[str, dict[str, str]]:
        """A copy of the whole mapping image id -> {key: caption}."""
        return {image_id: dict(entries) for image_id, entries in self._captions.items()}

    def coverage(self, items: Dataset | Iterable[CaptionItem]) -> Coverage:
        """How many of a dataset's (or an item list's) wanted captions this table has."""
        if isinstance(items, Dataset):
            items = caption_items(items)
        return coverage_of(self._captions, items)
