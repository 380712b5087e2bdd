"""The caption stage: a short description of every text entity and visual object.

Three backends (``caption.backend``):

- ``mllm``: a multimodal LLM (any transformers image-text-to-text model with a chat template; the
  paper used Qwen2.5-VL-7B-Instruct) answers one prompt per item from ``pipeline/prompts/*.json``,
  greedily, in left-padded batches. Rows are appended to ``captions.jsonl`` as they are made, so a
  killed run resumes where it stopped. ``--shard i --num-shards n`` splits the work: each worker
  appends to ``shards/part-i-of-n.jsonl``; the worker that finds every item done (or a later run
  without shards) merges all rows into the output.
- ``file``: imports a caption file in the UMRE format (image -> {entity name or "[OBJk]": text}).
- ``none``: no captions (the paper's "without caption" ablation); writes an empty table.

The output folder is read by :class:`pipeline.caption.table.CaptionTable`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.caption.captioner import Captioner, crop_box
from pipeline.caption.prompts import PromptSet, build_prompt, load_prompts
from pipeline.caption.rowlog import append_rows, read_row_log, row_lines, settings_id
from pipeline.caption.table import (
    CAPTIONS_JSON,
    CAPTIONS_JSONL,
    MANIFEST_JSON,
    CaptionItem,
    caption_items,
    coverage_of,
    read_caption_mapping,
)
from pipeline.config import CaptionParams
from pipeline.data.images import open_image
from pipeline.data.records import Dataset, parse_object_name
from pipeline.io import DataError, atomic_write_text, file_sha256, write_json

__all__ = [
    "shard_items",
    "generate_captions",
    "ImportedCaptions",
    "import_caption_file",
    "run_caption",
]

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
UNKNOWN_REPORT_LIMIT = 100  # entries listed in the manifest; the count is always exact


def shard_items(items: Sequence[CaptionItem], shard: int, num_shards: int) -> list[CaptionItem]:
    """Shard ``shard`` of ``num_shards``: a contiguous block of the sorted item list, so one
    image's items stay together; block sizes differ by at most one."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"--shard must be in [0, {num_shards}) and --num-shards >= 1")
    n = len(items)
    return list(items[shard * n // num_shards : (shard + 1) * n // num_shards])


def _log_path(out: Path, shard: int, num_shards: int) -> Path:
    if num_shards == 1:
        return out / CAPTIONS_JSONL
    return out / SHARDS_DIR / f"part-{shard:03d}-of-{num_shards:03d}.jsonl"


def _all_logs(out: Path) -> list[Path]:
    return [out / CAPTIONS_JSONL, *sorted((out / SHARDS_DIR).glob("part-*.jsonl"))]


def item_inputs(dataset: Dataset, items: Sequence[CaptionItem]) -> dict[tuple[str, str], str]:
    """A short hash of what each item's prompt is made of (its kind, post text, box and image
    file content), by (image id, key): a row is reused only for the same inputs, so a dataset
    regenerated with the same image ids and entity names is captioned again."""
    images: dict[str, str] = {}
    inputs = {}
    for it in items:
        if it.image_id not in images:
            path = dataset.image_path(it.image_id)
            images[it.image_id] = file_sha256(path) if path.is_file() else "-"
        payload = json.dumps([it.kind, it.text, it.box, images[it.image_id]], separators=(",", ":"))
        inputs[it.image_id, it.key] = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return inputs


def _reusable(row: dict[str, Any], settings: str, inputs: dict[tuple[str, str], str]) -> bool:
    return row["settings"] == settings and row.get("input") == inputs.get(
        (row["image_id"], row["key"])
    )


def _rows_by_item(
    out: Path, settings: str, inputs: dict[tuple[str, str], str]
) -> dict[tuple[str, str], dict[str, Any]]:
    """Rows of these settings and inputs in the main log and every shard log, by (image id,
    key)."""
    done: dict[tuple[str, str], dict[str, Any]] = {}
    for path in _all_logs(out):
        for row in read_row_log(path):
            if _reusable(row, settings, inputs):
                done.setdefault((row["image_id"], row["key"]), row)
    return done


# ---------------------------------------------------------------------------------------------
# Generation


def _batches(items: Sequence[CaptionItem], size: int) -> Iterator[list[CaptionItem]]:
    # Batches are cut from the full item list, not from what is left, so a resumed run forms the
    # same batches as an uninterrupted one wherever a batch was not half done.
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _item_image(
    item: CaptionItem, dataset: Dataset, prompts: PromptSet, cache: dict[str, Image.Image]
) -> Image.Image:
    """The image a prompt is about: the post's image, or the object's crop of it."""
    if item.image_id not in cache:
        cache[item.image_id] = open_image(dataset.image_path(item.image_id))
    image = cache[item.image_id]
    template = prompts.entity if item.kind == "entity" else prompts.object
    if template.image == "crop" and item.box is not None:
        return crop_box(image, item.box)
    return image


def generate_captions(
    dataset: Dataset,
    out: Path,
    captioner: Captioner,
    prompts: PromptSet,
    *,
    batch_size: int,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
) -> tuple[
    list[CaptionItem], dict[tuple[str, str], str], dict[tuple[str, str], dict[str, Any]], int
]:
    """Caption this shard's items that no log of the same settings and inputs has yet, appending
    rows to the shard's log. Returns (all items, their :func:`item_inputs`, rows by (image id,
    key) of these settings and inputs, rows made now).

    ``after_batch(rows_made_so_far)`` runs after each batch is on disk (tests stop runs with it).
    """
    from tqdm.auto import tqdm

    items = caption_items(dataset)
    inputs = item_inputs(dataset, items)
    mine = shard_items(items, shard, num_shards)
    settings = settings_id(captioner.name, prompts, captioner.max_new_tokens, captioner.dtype)
    target = _log_path(out, shard, num_shards)

    own_rows = read_row_log(target, repair=True)
    kept = [r for r in own_rows if _reusable(r, settings, inputs)]
    if len(kept) < len(own_rows):
        made_by = sorted(
            {f"{r.get('model')} {r.get('prompt_version')}" for r in own_rows}
            - {f"{captioner.name} {prompts.version}"}
        )
        log.info(
            "%s: dropping %d row(s) made with other settings or inputs (model and prompt "
            "version: %s)",
            target, len(own_rows) - len(kept), ", ".join(made_by) or "same, other options or inputs",
        )  # fmt: skip
        atomic_write_text(target, row_lines(kept))

    done = _rows_by_item(out, settings, inputs)

    pending = sum((it.image_id, it.key) not in done for it in mine)
    log.info(
        "caption: %d item(s) in shard %d/%d, %d already done, %d to generate with %s (%s) on %s",
        len(mine), shard, num_shards, len(mine) - pending, pending, captioner.name, prompts.version,
        captioner.device,
    )  # fmt: skip
    made = 0
    bar = tqdm(total=pending, unit="item", desc="caption", disable=not progress or pending == 0)
    with bar:
        for batch in _batches(mine, batch_size):
            todo = [it for it in batch if (it.image_id, it.key) not in done]
            if not todo:
                continue
            cache: dict[str, Image.Image] = {}
            images = [_item_image(it, dataset, prompts, cache) for it in todo]
            answers = captioner.describe(
                [build_prompt(it, prompts) for it in todo], images, prompts.system
            )
            rows = [
                {
                    "image_id": it.image_id,
                    "key": it.key,
                    "kind": it.kind,
                    "caption": answer,
                    "model": captioner.name,
                    "prompt_version": prompts.version,
                    "settings": settings,
                    "input": inputs[it.image_id, it.key],
                }
                for it, answer in zip(todo, answers, strict=True)
            ]
            append_rows(target, rows)
            for row in rows:
                done[(row["image_id"], row["key"])] = row
            made += len(rows)
            bar.update(len(rows))
            if after_batch is not None:
                after_batch(made)
    return items, inputs, done, made


# ---------------------------------------------------------------------------------------------
# File import


@dataclass(frozen=True)
class Unknown:
    image_id: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"image {self.image_id!r} key {self.key!r}: {self.reason}"


@dataclass(frozen=True)
class ImportedCaptions:
    """A caption file matched against the dataset's items."""

    found: dict[tuple[str, str], str]  # (image id, key) -> caption, for items only
    unused: int  # captions of entities the post names but no record pairs (harmless, dropped)
    unknown: list[Unknown]  # entries that match nothing in the dataset (reported, dropped)


def import_caption_file(path: Path, items: Sequence[CaptionItem]) -> ImportedCaptions:
    """Match a UMRE-style caption file to ``items``. An entry is unknown when its image is used by
    no record, when an "[OBJk]" key is not in objects.json for the image, or when a name key is
    neither a head/tail entity nor a substring of the image's post text."""
    mapping = read_caption_mapping(path)
    wanted: dict[str, set[str]] = {}
    texts: dict[str, str] = {}
    for item in items:
        wanted.setdefault(item.image_id, set()).add(item.key)
        texts[item.image_id] = item.text
    found: dict[tuple[str, str], str] = {}
    unused, unknown = 0, []
    for image_id in sorted(mapping):
        for key in sorted(mapping[image_id]):
            if image_id not in wanted:
                unknown.append(Unknown(image_id, key, "no record of the dataset uses this image"))
            elif key in wanted[image_id]:
                found[(image_id, key)] = mapping[image_id][key]
            elif parse_object_name(key) is not None:
                unknown.append(Unknown(image_id, key, "objects.json has no such object for it"))
            elif key in texts[image_id]:
                unused += 1
            else:
                unknown.append(Unknown(image_id, key, "no such entity in the image's post text"))
    return ImportedCaptions(found, unused, unknown)


# ---------------------------------------------------------------------------------------------
# The stage


def _write_output(
    out: Path, items: Sequence[CaptionItem], rows: Sequence[dict[str, Any]], manifest: dict
) -> None:
    """Write the sorted log, the compiled mapping and the manifest (each atomically), then drop
    shard logs; the manifest goes last, so a folder with a manifest is complete."""
    rows = sorted(rows, key=lambda r: (r["image_id"], r["key"]))
    mapping: dict[str, dict[str, str]] = {}
    for row in rows:
        mapping.setdefault(row["image_id"], {})[row["key"]] = row["caption"]
    # Coverage counts real captions: empty ones filled in for missing items do not count.
    real: dict[str, dict[str, str]] = {}
    for row in rows:
        if not row.get("filled"):
            real.setdefault(row["image_id"], {})[row["key"]] = row["caption"]
    coverage = coverage_of(real, items)
    (out / MANIFEST_JSON).unlink(missing_ok=True)
    atomic_write_text(out / CAPTIONS_JSONL, row_lines(rows))
    write_json(out / CAPTIONS_JSON, mapping)
    write_json(
        out / MANIFEST_JSON,
        {**manifest, "items": len(items), "captions": len(rows), "coverage": coverage.to_json()},
    )
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)


def _base_manifest(backend: str) -> dict[str, Any]:
    return {
        "backend": backend,
        "model": None,
        "prompt_version": None,
        "prompt_sha256": None,
        "settings": None,
        "max_new_tokens": None,
        "dtype": None,
        "source_file": None,
        "filled": 0,
        "unused": 0,
        "unknown": {"count": 0, "entries": []},
    }


# The backends run_caption runs (tests/test_config.py: the same names params accept).
BACKENDS = ("mllm", "file", "none")


def run_caption(
    dataset: Dataset,
    out: str | Path,
    params: CaptionParams,
    *,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    captioner: Captioner | None = None,
    after_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the caption stage into ``out``; returns the manifest (a summary for a shard run)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Unfinished until this run writes its manifest: a killed run leaves no earlier run's
    # manifest beside its own rows, which readers would take for a complete output.
    (out / MANIFEST_JSON).unlink(missing_ok=True)
    if params.backend == "mllm":
        return _run_mllm(dataset, out, params, shard, num_shards, progress, captioner, after_batch)
    if num_shards != 1:
        raise ValueError(f"--num-shards applies to caption.backend mllm only, not {params.backend}")
    items = caption_items(dataset)
    if params.backend == "none":
        manifest = _base_manifest("none")
        _write_output(out, items, [], manifest)
        return json.loads((out / MANIFEST_JSON).read_text())
    if params.backend == "file":
        return _run_file(dataset, out, params, items)
    raise ValueError(f"caption.backend {params.backend!r}: this code implements {BACKENDS}")


def _run_mllm(
    dataset: Dataset,
    out: Path,
    params: CaptionParams,
    shard: int,
    num_shards: int,
    progress: bool,
    captioner: Captioner | None,
    after_batch: Callable[[int], None] | None,
) -> dict[str, Any]:
    if params.batch_size < 1 or params.max_new_tokens < 1:
        raise ValueError("caption.batch_size and caption.max_new_tokens must be at least 1")
    prompts = load_prompts(params.prompts)
    if captioner is None:
        captioner = Captioner.load(
            params.model, dtype=params.dtype, max_new_tokens=params.max_new_tokens
        )
    items, inputs, done, made = generate_captions(
        dataset, out, captioner, prompts,
        batch_size=params.batch_size, shard=shard, num_shards=num_shards,
        progress=progress, after_batch=after_batch,
    )  # fmt: skip
    settings = settings_id(captioner.name, prompts, captioner.max_new_tokens, captioner.dtype)
    if num_shards > 1:
        done = _rows_by_item(out, settings, inputs)  # other workers may have finished meanwhile
    missing = sum((it.image_id, it.key) not in done for it in items)
    if missing and num_shards == 1:
        raise RuntimeError(f"{missing} item(s) have no caption after generation")
    if missing:
        log.info(
            "caption: shard %d/%d done; %d item(s) of other shards still missing (the last "
            "worker to finish, or a run without --num-shards, writes the output)",
            shard, num_shards, missing,
        )  # fmt: skip
        mine = shard_items(items, shard, num_shards)
        return {
            "shard": shard,
            "num_shards": num_shards,
            "items": len(mine),
            "generated": made,
            "missing": missing,
        }
    rows = [done[(it.image_id, it.key)] for it in items]
    manifest = _base_manifest("mllm") | {
        "model": captioner.name,
        "prompt_version": prompts.version,
        "prompt_sha256": prompts.sha256,
        "settings": settings,
        "max_new_tokens": captioner.max_new_tokens,
        "dtype": captioner.dtype,
    }
    _write_output(out, items, rows, manifest)
    log.info("caption: %d caption(s) written to %s (%d generated now)", len(rows), out, made)
    return json.loads((out / MANIFEST_JSON).read_text())


def _run_file(
    dataset: Dataset, out: Path, params: CaptionParams, items: list[CaptionItem]
) -> dict[str, Any]:
    path = Path(params.file) if params.file else dataset.captions_path
    if not path.is_file():
        hint = "set caption.file" if not params.file else "check caption.file"
        raise DataError(f"{path}: caption file not found ({hint}, or use backend mllm or none)")
    imported = import_caption_file(path, items)
    found, unknown = imported.found, imported.unknown
    for entry in unknown[:20]:
        log.warning("%s: caption for an unknown item, ignored: %s", path, entry)
    if len(unknown) > 20:
        log.warning("%s: %d more unknown item(s), see the manifest", path, len(unknown) - 20)
    missing = [it for it in items if (it.image_id, it.key) not in found]
    log.info(
        "%s: %d of %d item(s) have a caption; %d caption(s) of entities no record pairs dropped",
        path, len(items) - len(missing), len(items), imported.unused,
    )  # fmt: skip
    if missing and params.on_missing == "fail":
        listed = "; ".join(f"image {it.image_id!r} key {it.key!r}" for it in missing[:10])
        raise DataError(
            f"{path}: {len(missing)} of {len(items)} item(s) have no caption, e.g. {listed} "
            "(set caption.on_missing: fill to use empty captions for them)"
        )
    rows = []
    for item in items:
        caption = found.get((item.image_id, item.key))
        row = {"image_id": item.image_id, "key": item.key, "kind": item.kind}
        row |= {"caption": caption or "", "filled": caption is None}
        rows.append(row | {"model": None, "prompt_version": None, "settings": None})
    manifest = _base_manifest("file") | {
        "source_file": str(path),
        "filled": len(missing),
        "unused": imported.unused,
        "unknown": {
            "count": len(unknown),
            "entries": [
                {"image_id": u.image_id, "key": u.key, "reason": u.reason}
                for u in unknown[:UNKNOWN_REPORT_LIMIT]
            ],
        },
    }
    _write_output(out, items, rows, manifest)
    return json.loads((out / MANIFEST_JSON).read_text())
