"""Depth maps for every image, from Depth-Anything-V2 or a dataset's shipped maps, into a store.

The store (format and reader in :mod:`pipeline.depth.store`) is a few Parquet shards of ``depth.shard_size``
images each, in sorted image-id order, plus ``skipped.json`` and ``manifest.json``.

Resuming: a shard is written under a temp name and renamed when complete, and records the run's
settings fingerprint (source, model name, dtype, shard size, image list) and a digest of its
inputs. A rerun keeps the shards whose fingerprint and inputs match and computes only the rest; a
shard made with other settings is deleted rather than mixed in. Batching is done inside a shard,
so a shard's bytes do not depend on which run, or which worker, computed it.

Scale-out: ``shard=i, num_shards=n`` computes store shards ``i, i+n, i+2n, ...`` into the same
folder. The worker that finds every shard complete writes the manifest; if the workers ran on
different machines, copy their shard files into one folder and run once more without sharding to
write it (nothing is recomputed). Under ``accelerate launch`` the stage reads ``RANK`` and
``WORLD_SIZE`` as the defaults of ``--shard`` / ``--num-shards`` and uses GPU ``LOCAL_RANK``.

Numbers: on CPU the model runs in float32 whatever ``depth.dtype`` says; on GPU ``depth.dtype``
float16/bfloat16 enables autocast. Byte-identical reruns assume the same device, torch thread count
and library versions: float results (and pyarrow's writer) are deterministic only under those.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DepthParams, params_to_dict
from pipeline.data.images import image_problem, open_image
from pipeline.data.records import Dataset
from pipeline.depth.model import image_tensor, infer_depth, load_depth_model, place_depth_model
from pipeline.depth.store import (
    FORMAT,
    MANIFEST,
    SCHEMA,
    SHARD_META_KEY,
    SKIPPED,
    encode_depth,
    read_shard_info,
    shard_name,
)
from pipeline.device import select_device
from pipeline.io import DataError, atomic_path, file_sha256, write_json

__all__ = ["DepthRunResult", "run_depth", "load_shipped_depth", "write_shard"]

log = logging.getLogger(__name__)

# Fixed writer settings: the same rows always give the same bytes (with the same pyarrow version),
# which is what lets a resumed or sharded run reproduce an uninterrupted one exactly.
_PARQUET_SETTINGS: dict[str, Any] = {
    "row_group_size": 1,
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,
    "write_statistics": False,
    "version": "2.6",
    "data_page_version": "1.0",
    "write_page_index": False,
    "write_page_checksum": False,
}


@dataclass
class DepthRunResult:
    """What one run did: shards and images it computed (and skipped), whether the store is done."""

    total_shards: int
    shards_computed: list[int] = field(default_factory=list)
    images_computed: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    complete: bool = False


# --- inputs --------------------------------------------------------------------------------------


def load_shipped_depth(path: Path) -> np.ndarray:
    """A depth map shipped as ``.npy`` (float ``[H, W]``); a bad file raises ``path: problem``."""
    try:
        depth = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: {image_problem(exc, path)}") from exc
    if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.floating):
        raise DataError(
            f"{path}: expected a 2-D float depth map, found {depth.dtype} {depth.shape}"
        )
    if not np.isfinite(depth).all():
        bad = int((~np.isfinite(depth)).sum())
        raise DataError(
            f"{path}: {bad} of {depth.size} depth values are NaN or infinite (expected finite)"
        )
    return depth.astype(np.float32)


def _input_path(dataset: Dataset, source: str, image_id: str) -> Path:
    return dataset.depth_path(image_id) if source == "dataset" else dataset.image_path(image_id)


def _fingerprint(depth: DepthParams, image_ids: Sequence[str]) -> str:
    """What decides a shard's content; a store with another fingerprint is started over."""
    settings: dict[str, Any] = {
        "format": FORMAT,
        "source": depth.source,
        "shard_size": depth.shard_size,
    }
    if depth.source == "model":
        # The requested dtype, not the effective one: a CPU run may finish a GPU run's store.
        settings |= {"model": depth.model, "dtype": depth.dtype}
    settings["images"] = hashlib.sha256("\n".join(image_ids).encode()).hexdigest()
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _inputs_digest(dataset: Dataset, source: str, image_ids: Sequence[str]) -> str:
    """Ids and content hashes of a shard's inputs: a replaced or repaired file redoes its shard,
    even one of the same size (a regenerated dataset's depth maps all have the same size)."""
    parts = []
    for image_id in image_ids:
        path = _input_path(dataset, source, image_id)
        parts.append(f"{image_id}\t{file_sha256(path) if path.is_file() else '-'}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


# --- the run -------------------------------------------------------------------------------------


@dataclass
class _ShardInputs:
    index: int
    ids: list[str]  # the images that loaded, in sorted order
    items: list[Any]  # model inputs [3, h, w] (model source) or float32 maps (dataset source)
    skipped: list[dict[str, str]]


def run_depth(
    dataset: Dataset,
    out_dir: str | Path,
    depth: DepthParams,
    on_error: Literal["raise", "skip"],
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = False,
    on_shard_written: Callable[[int], None] | None = None,
) -> DepthRunResult:
    """Fill ``out_dir`` with depth maps of every image in ``dataset``, resuming what is done.

    Computes the store shards assigned to worker ``shard`` of ``num_shards``, then writes the
    manifest if every shard of the store is complete. ``on_shard_written(index)`` runs after each
    shard lands on disk.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), found {shard}")
    if depth.shard_size < 1 or depth.batch_size < 1:
        raise ValueError("depth.shard_size and depth.batch_size must be at least 1")
    if depth.source == "dataset" and not dataset.depth_dir.is_dir():
        raise DataError(
            f"{dataset.depth_dir}: not found: depth.source 'dataset' reads the depth maps a "
            f"dataset ships, and this one ({dataset.manifest.get('source')}) ships none; set "
            "depth.source: model (Depth-Anything-V2, depth.model)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_ids = dataset.image_ids()
    plan = [image_ids[i : i + depth.shard_size] for i in range(0, len(image_ids), depth.shard_size)]
    fingerprint = _fingerprint(depth, image_ids)
    _drop_stale(out_dir, fingerprint, len(plan))
    # A manifest is written only once every shard is done, and workers never delete shards: a
    # shard found missing later, by a worker with nothing to do, was lost since (see below).
    was_finished = (out_dir / MANIFEST).is_file()

    digests: dict[int, str] = {}  # each shard's inputs are read once a run

    def inputs_digest(index: int) -> str:
        if index not in digests:
            digests[index] = _inputs_digest(dataset, depth.source, plan[index])
        return digests[index]

    def is_done(index: int) -> bool:
        info = read_shard_info(out_dir / shard_name(index))
        return (
            info is not None
            and info["fingerprint"] == fingerprint
            and info["inputs"] == inputs_digest(index)
            # Switching to on_error=raise retries images that an earlier run skipped.
            and not (on_error == "raise" and info["skipped"])
        )

    result = DepthRunResult(total_shards=len(plan))
    todo = [k for k in range(shard, len(plan), num_shards) if not is_done(k)]
    log.info(
        "depth: %d shards in the store; worker %d/%d has %d to compute (%d images)",
        len(plan), shard, num_shards, len(todo), sum(len(plan[k]) for k in todo),
    )  # fmt: skip
    if todo:
        _unfinish(out_dir)
        _compute_shards(dataset, out_dir, depth, on_error, plan, todo, fingerprint,
                        inputs_digest, progress, result, on_shard_written)  # fmt: skip

    done = [k for k in range(len(plan)) if is_done(k)]
    if len(done) == len(plan):
        _write_manifest(dataset, out_dir, depth, plan, fingerprint)
        result.complete = True
    else:
        if was_finished and not todo:
            _unfinish(out_dir)  # a finished store that lost a shard (or its inputs) is no more
        log.info(
            "depth: %d of %d shards done; run the other workers, or rerun without --shard, "
            "to finish the store", len(done), len(plan),
        )  # fmt: skip
    return result


def _unfinish(out_dir: Path) -> None:
    """Mark the store unfinished: readers refuse it until the manifest is written again."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    (out_dir / SKIPPED).unlink(missing_ok=True)


def _drop_stale(out_dir: Path, fingerprint: str, num_shards: int) -> None:
    """Delete shards (and the manifest) made with other settings, so nothing stale is mixed in."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            stale = json.loads(manifest.read_text()).get("fingerprint") != fingerprint
        except ValueError:
            stale = True
        if stale:
            _unfinish(out_dir)
    stale_shards = []
    for path in sorted(out_dir.glob("shard-*.parquet")):
        info = read_shard_info(path)
        index = int(path.stem.split("-")[1]) if path.stem.split("-")[1].isdigit() else -1
        # Unreadable files are left for their own worker to overwrite; only a different
        # fingerprint (or an index past the end) proves a shard belongs to another run.
        if (info is not None and info.get("fingerprint") != fingerprint) or index >= num_shards:
            stale_shards.append(path)
    if stale_shards:
        log.warning(
            "depth: %s holds %d shards made with other settings (model, dtype, source, shard size "
            "or image list); starting over", out_dir, len(stale_shards),
        )  # fmt: skip
        for path in stale_shards:
            path.unlink(missing_ok=True)


def _compute_shards(
    dataset: Dataset,
    out_dir: Path,
    depth: DepthParams,
    on_error: str,
    plan: list[list[str]],
    todo: list[int],
    fingerprint: str,
    inputs_digest: Callable[[int], str],
    progress: bool,
    result: DepthRunResult,
    on_shard_written: Callable[[int], None] | None,
) -> None:
    from tqdm.auto import tqdm

    model = None
    if depth.source == "model":
        model = load_depth_model(depth.model)
        device = select_device()
        model = place_depth_model(model, device)
        log.info("depth: %s on %s (dtype %s)", depth.model, device, depth.dtype)
        if device.type == "cpu" and depth.dtype != "float32":
            log.info("depth: no GPU, so depth.dtype=%s is ignored (float32 on CPU)", depth.dtype)

    def load(index: int) -> _ShardInputs:
        inputs = _ShardInputs(index, [], [], [])
        for image_id in plan[index]:
            path = _input_path(dataset, depth.source, image_id)
            try:
                if depth.source == "dataset":
                    item = load_shipped_depth(path)
                else:
                    item = image_tensor(open_image(path))
            except DataError as exc:
                if on_error == "raise":
                    raise
                problem = str(exc).removeprefix(f"{path}: ")
                log.warning("depth: skipping %s", exc)
                rel = path.relative_to(dataset.root).as_posix()
                inputs.skipped.append({"image_id": image_id, "path": rel, "problem": problem})
                continue
            inputs.ids.append(image_id)
            inputs.items.append(item)
        return inputs

    bar = tqdm(
        total=sum(len(plan[k]) for k in todo), unit="img", desc="depth", disable=not progress
    )
    # Decoding the next shard's images overlaps with the model running on this one (resizing and
    # normalizing run on the model's device). Memory: two shards of decoded images (uint8).
    with bar, ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, todo[0])
        for position, index in enumerate(todo):
            inputs = pending.result()
            if position + 1 < len(todo):
                pending = pool.submit(load, todo[position + 1])
            bar.update(len(inputs.skipped))
            if depth.source == "model":
                maps = infer_depth(model, inputs.items, depth.batch_size, depth.dtype, bar.update)
            else:
                maps = inputs.items
                bar.update(len(maps))
            info = {
                "fingerprint": fingerprint,
                "inputs": inputs_digest(index),
                "shard": index,
                "skipped": inputs.skipped,
            }
            write_shard(out_dir / shard_name(index), inputs.ids, maps, info)
            result.shards_computed.append(index)
            result.images_computed += len(inputs.ids)
            result.skipped.extend(inputs.skipped)
            if on_shard_written is not None:
                on_shard_written(index)


def _write_manifest(
    dataset: Dataset,
    out_dir: Path,
    depth: DepthParams,
    plan: list[list[str]],
    fingerprint: str,
) -> None:
    shards, skipped = [], []
    for index, ids in enumerate(plan):
        info = read_shard_info(out_dir / shard_name(index))
        skipped.extend(info["skipped"])
        shards.append({"file": shard_name(index), "images": len(ids) - len(info["skipped"])})
    count = sum(s["images"] for s in shards)
    write_json(out_dir / SKIPPED, skipped)
    manifest = {
        "format": FORMAT,
        "source": depth.source,
        "model": depth.model if depth.source == "model" else "dataset",
        "params": params_to_dict(depth),
        "values": (
            "raw model output (relative inverse depth, larger = nearer) at the model's output size"
            if depth.source == "model"
            else "the dataset's shipped depth maps (larger = nearer) at their own size"
        )
        + "; stored as float16 of depth/scale, scale a power of two",
        "count": count,
        "skipped": len(skipped),
        "fingerprint": fingerprint,
        "dataset": dataset.manifest.get("source"),
        "shards": shards,
    }
    write_json(out_dir / MANIFEST, manifest)
    log.info("depth: store %s complete: %d images, %d skipped", out_dir, count, len(skipped))


def write_shard(
    path: Path, image_ids: list[str], maps: list[np.ndarray], info: dict[str, Any]
) -> None:
    """Write one shard atomically; ``info`` goes into its metadata (see :mod:`pipeline.depth.store`)."""
    encoded = [encode_depth(m) for m in maps]
    table = pa.table(
        {
            "image_id": pa.array(image_ids, pa.string()),
            "height": pa.array([m.shape[0] for m in maps], pa.int32()),
            "width": pa.array([m.shape[1] for m in maps], pa.int32()),
            "scale": pa.array([s for s, _ in encoded], pa.float32()),
            "depth": pa.array([v.ravel() for _, v in encoded], pa.list_(pa.float16())),
        },
        schema=SCHEMA,
    )
    meta = json.dumps(info, sort_keys=True).encode()
    table = table.replace_schema_metadata({SHARD_META_KEY: meta})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **_PARQUET_SETTINGS)
