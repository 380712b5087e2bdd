"""Versioned caption prompts (``pipeline/prompts/*.json``): loading, checking and filling them."""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path

from pipeline.caption.table import CaptionItem
from pipeline.io import DataError, read_json

__all__ = ["PromptTemplate", "PromptSet", "load_prompts", "build_prompt"]


@dataclass(frozen=True)
class PromptTemplate:
    prompt: str
    image: str  # "full": the post's image; "crop": the object's box cut from it


@dataclass(frozen=True)
class PromptSet:
    """A versioned set of prompt templates (``pipeline/prompts/caption_v1.json``)."""

    version: str
    sha256: str  # of the parsed content, so any edit is noticed even without a version bump
    system: str
    entity: PromptTemplate
    object: PromptTemplate


_FIELDS = {"entity": {"text", "name"}, "object": {"text"}}


def load_prompts(path: str | Path) -> PromptSet:
    """Load and check a prompt template file; errors name the file and the field."""
    path = Path(path)
    raw = read_json(path, "prompt template file (param caption.prompts)")
    if not isinstance(raw, dict) or not isinstance(raw.get("version"), str) or not raw["version"]:
        raise DataError(f'{path}: expected an object with a non-empty string "version"')
    templates = {}
    for kind, allowed in _FIELDS.items():
        entry = raw.get(kind)
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise DataError(f'{path}: "{kind}": expected {{"prompt": str, "image": ...}}')
        if entry.get("image") not in ("full", "crop"):
            raise DataError(
                f'{path}: "{kind}.image": expected "full" or "crop", found {entry.get("image")!r}'
            )
        try:
            used = {f for _, f, _, _ in string.Formatter().parse(entry["prompt"]) if f is not None}
        except ValueError as exc:
            raise DataError(f'{path}: "{kind}.prompt": bad template ({exc})') from exc
        if not used <= allowed:
            raise DataError(
                f'{path}: "{kind}.prompt": unknown placeholder(s) {sorted(used - allowed)}; '
                f"allowed: {sorted(allowed)} (write literal braces as {{{{ }}}})"
            )
        templates[kind] = PromptTemplate(entry["prompt"], entry["image"])
    system = raw.get("system", "")
    if not isinstance(system, str):
        raise DataError(f'{path}: "system": expected a string, found {type(system).__name__}')
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()
    return PromptSet(raw["version"], digest, system, templates["entity"], templates["object"])


def build_prompt(item: CaptionItem, prompts: PromptSet) -> str:
    """The question asked about one item: the entity or object template filled with the post."""
    if item.kind == "entity":
        return prompts.entity.prompt.format(text=item.text, name=item.key)
    return prompts.object.prompt.format(text=item.text)
