"""The ``features`` stage: every split's text and image features, once, as Parquet shards.

The original code redid all preprocessing in every ``__getitem__`` of every epoch (open the JPEG,
crop each object, run the CLIP processor on each crop, load the whole depth map, tokenize). Here
that work happens once per split (through :mod:`pipeline.features.featurize`) and is stored in the
format of :mod:`pipeline.features.dataset`, which also reads it back. ``<out>/report.json`` gives,
per split, truncation and lost markers, missing captions and image problems.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Params, section_hash
from pipeline.data.records import SPLITS, Dataset, Record, label_list, label_map_hash
from pipeline.features.dataset import (
    METADATA_KEY,
    SCHEMA_VERSION,
    cache_settings,
    layout_settings,
)
from pipeline.features.featurize import (
    CaptionReader,
    DepthReader,
    check_record,
    featurize_image,
    featurize_sample,
    images_table,
    samples_table,
)
from pipeline.features.text import EncodedText, TextEncoder
from pipeline.io import atomic_path, recover_swap, swap_into_place, write_json
from pipeline.text import MARKERS, load_tokenizer
from pipeline.vision import pixel_normalization

__all__ = ["build_features"]

log = logging.getLogger(__name__)


def _metadata(
    table: str,
    split: str,
    settings: dict[str, Any],
    tokenizer: Any,
    labels: list[str],
    normalization: tuple[Sequence[float], Sequence[float]],
) -> dict:
    return {
        "label_map": label_map_hash(labels),
        "num_labels": len(labels),
        "schema_version": SCHEMA_VERSION,
        "table": table,
        "split": split,
        "settings": settings,
        "settings_hash": section_hash(settings),
        "markers": list(MARKERS),
        "pad_token_id": int(tokenizer.pad_token_id),
        "pixel_mean": list(normalization[0]),
        "pixel_std": list(normalization[1]),
        "vocab_size": len(tokenizer),
    }


def _write_parquet(table: pa.Table, path: Path, metadata: dict[str, Any]) -> None:
    """Write one shard atomically; identical inputs give identical bytes."""
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            use_dictionary=False,
            write_statistics=False,
            row_group_size=max(1, table.num_rows),
        )


def _images_table(
    dataset: Dataset,
    image_ids: list[str],
    objects: dict[str, dict[str, Sequence[float]]],
    depth: DepthReader | None,
    params: Params,
) -> pa.Table:
    """One image shard's table."""
    depth = depth if params.data.use_depth else None
    images = [
        featurize_image(i, dataset.image_path(i), objects.get(i, {}), depth, params)
        for i in image_ids
    ]
    return images_table(image_ids, images, params)


def _inputs_fingerprint(settings: dict[str, Any], inputs: Iterable[Path | None]) -> str:
    """Identifies settings + input files (path, size, mtime), so a resumed run reuses only shards
    written from the same inputs."""
    listing: list[Any] = [settings, SCHEMA_VERSION]
    for root in inputs:
        if root is None:
            listing.append(None)
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        listing += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def build_features(
    dataset: Dataset,
    out_dir: str | Path,
    params: Params,
    depth: DepthReader | None,
    captions: CaptionReader | None,
    *,
    tokenizer: Any = None,
    input_paths: Sequence[Path | None] = (),
) -> dict[str, Any]:
    """Write the feature cache of every split to ``out_dir`` (atomically) and return the report.

    ``depth`` may be None when ``data.use_depth`` is false; ``captions`` None means no captions.
    A run killed midway resumes from the finished image shards of ``<out_dir>.partial`` when the
    settings and the files under ``input_paths`` (the stage's deps) are unchanged.
    """
    out_dir = Path(out_dir)
    data, features = params.data, params.features
    if data.use_depth and depth is None:
        raise ValueError("data.use_depth is true but no depth store was given")
    if tokenizer is None:
        tokenizer = load_tokenizer(params.model.text_model)
    encoder = TextEncoder(tokenizer, data.max_seq)
    settings = cache_settings(params)
    normalization = pixel_normalization(params.model.vision_model)
    use_captions = params.use_captions and captions is not None and captions.backend != "none"
    image_shard_size = features.image_shard_size

    recover_swap(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    layout = layout_settings(params)
    fingerprint = _inputs_fingerprint({**settings, **layout}, [dataset.root, *input_paths])
    stamp = partial / ".inputs"
    if not (stamp.is_file() and stamp.read_text() == fingerprint):
        if partial.exists():
            log.info("%s: left by a run with other params or inputs: discarded", partial)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        stamp.write_text(fingerprint)

    objects = dataset.objects
    label_ids = dataset.relations
    labels = label_list(label_ids)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "settings": settings,
        "caption_segment": use_captions,
        "splits": {},
    }
    for split in SPLITS:
        split_dir = partial / split
        split_dir.mkdir(exist_ok=True)
        records = dataset.records(split)
        image_ids = sorted({r.image_id for r in records})
        image_index = {image_id: i for i, image_id in enumerate(image_ids)}
        meta = _metadata("images", split, settings, tokenizer, labels, normalization)
        starts = range(0, max(len(image_ids), 1), image_shard_size)
        reused = 0
        for k, start in enumerate(starts):
            path = split_dir / f"images-{k:05d}.parquet"
            if path.is_file():  # finished by a killed run with the same inputs
                reused += 1
                continue
            chunk = image_ids[start : start + image_shard_size]
            _write_parquet(_images_table(dataset, chunk, objects, depth, params), path, meta)
        if reused:
            log.info(
                "%s: %d of %d image shards reused from %s (same params and inputs)",
                split,
                reused,
                len(starts),
                partial,
            )
        problems = [
            (image_id, problem)
            for path in sorted(split_dir.glob("images-*.parquet"))
            for image_id, problem in zip(
                *pq.read_table(path, columns=["image_id", "problem"]).to_pydict().values(),
                strict=True,
            )
            if problem
        ]
        # As in download: a record whose image does not decode is left out (skip mode; raise
        # mode stopped above). A missing depth map only zeros the depth channel.
        undecodable = {i for i, problem in problems if problem.startswith("image ")}
        kept = [r for r in records if r.image_id not in undecodable]
        stats = _SplitStats(len(kept), len(image_ids))
        samples = []
        for record in kept:
            check_record(record, label_ids, objects)
            samples.append(featurize_sample(record, encoder, captions if use_captions else None))
            stats.count(samples[-1].text)
            if samples[-1].captions is not None:
                stats.count_missing(record, samples[-1].captions)
        meta = _metadata("samples", split, settings, tokenizer, labels, normalization)
        for k, start in enumerate(range(0, max(len(kept), 1), features.shard_size)):
            table = samples_table(
                samples[start : start + features.shard_size], image_index, label_ids
            )
            _write_parquet(table, split_dir / f"samples-{k:05d}.parquet", meta)
        report["splits"][split] = {
            **stats.to_json(),
            "samples_left_out_for_undecodable_images": len(records) - len(kept),
            "image_problems": {
                "count": len(problems),
                "first": [{"image_id": i, "problem": p} for i, p in problems[:20]],
            },
        }
        if stats.samples_with_dropped_markers:
            log.warning(
                "%s: %d samples lost entity markers to truncation at data.max_seq=%d: %s",
                split,
                stats.samples_with_dropped_markers,
                data.max_seq,
                dict(stats.markers_dropped),
            )
    write_json(partial / "report.json", report)
    stamp.unlink()
    swap_into_place(partial, out_dir)
    return report


class _SplitStats:
    """Counts for the stage report: truncation, lost markers, missing captions, lengths."""

    def __init__(self, samples: int, images: int):
        self.samples, self.images = samples, images
        self.lengths: list[int] = []
        self.caption_cut_samples = self.sentence_cut_samples = 0
        self.samples_with_dropped_markers = 0
        self.markers_dropped: Counter[str] = Counter({m: 0 for m in MARKERS})
        self.captions_missing = {"text": 0, "object": 0}

    def count(self, encoded: EncodedText) -> None:
        self.lengths.append(len(encoded.input_ids))
        self.caption_cut_samples += encoded.caption_tokens_cut > 0
        self.sentence_cut_samples += encoded.sentence_tokens_cut > 0
        self.samples_with_dropped_markers += bool(encoded.markers_dropped)
        self.markers_dropped.update(encoded.markers_dropped)

    def count_missing(self, record: Record, captions: tuple[str | None, ...]) -> None:
        for entity, caption in zip((record.head, record.tail), captions, strict=True):
            if caption is None:
                self.captions_missing[entity.kind] += 1

    def to_json(self) -> dict[str, Any]:
        lengths = np.asarray(self.lengths or [0])
        return {
            "samples": self.samples,
            "images": self.images,
            "length": {"max": int(lengths.max()), "mean": round(float(lengths.mean()), 3)},
            "captions_missing": self.captions_missing,
            "truncated": {
                "caption_samples": self.caption_cut_samples,
                "sentence_samples": self.sentence_cut_samples,
            },
            "samples_with_dropped_markers": self.samples_with_dropped_markers,
            "markers_dropped": {m: self.markers_dropped[m] for m in MARKERS},
        }
