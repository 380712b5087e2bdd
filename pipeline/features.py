"""The feature cache (the ``features`` stage) and the fast loader that reads it back.

The original code redid all preprocessing in every ``__getitem__`` of every epoch (open the JPEG,
crop each object, run the CLIP processor on each crop, load the whole depth map, tokenize). Here
that work happens once per split and is stored as Parquet shards under ``<out>/<split>/``:

- ``samples-NNNNN.parquet``, one row per sample: ``sample_id``, ``image_id``, ``image_index`` (row
  of the split's image table), ``input_ids`` and ``token_type_ids`` (unpadded), ``length``,
  ``marker_positions`` (position of each of the 12 markers of :data:`pipeline.hub.MARKERS`, in that
  order, or -1), ``head_slot`` / ``tail_slot`` (object slot or -1), ``pair_kind`` (index into
  :data:`PAIR_KINDS`) and ``label`` (id in ``relations.json``).
- ``images-NNNNN.parquet``, one row per image of the split (stored once, however many samples use
  it), sorted by image id: ``image_id``, ``num_objects``, ``object_mask`` (bool ``[P]``),
  ``boxes`` (float32 ``[P * 5]``: x1, y1, x2, y2, area), two fixed-size binary columns holding
  C-order arrays: ``object_crops`` (uint8 ``[P, 3, S, S]``) and ``depth_crops`` (little-endian
  float16 ``[P, S, S]``), and ``problem`` (empty, or why the crops are zeros under
  ``data.on_error=skip``).
- ``<out>/report.json``: per split, truncation and lost markers, missing captions, image problems.

Every file's schema metadata (key ``remote.features``) records the schema version, the settings
that shaped its bytes (tokenizer, max_seq, ...) and their hash. :class:`FeatureDataset` refuses a
cache built with other settings and names the setting that differs. It holds a split in memory as
numpy arrays; ``dataset[i]`` is only a reference, and :func:`collate` gathers a whole batch with a
few vectorized index operations (no file opens, no decoding, no per-sample tensors).

Choices the issue left open:
- Input text: ``[CLS] sentence [SEP] captions [SEP]``; the sentence has ``<s1>..</s1>`` /
  ``<s2>..</s2>`` around text head / tail; the caption segment (token type 1) is
  ``<k1>|<o1> head caption </k1>|</o1> <k2>|<o2> tail caption </k2>|</o2>``. A missing caption
  keeps its markers with empty content. No caption segment at all when ``data.use_caption`` is
  false or the caption table's backend is ``"none"``.
- Truncation to ``data.max_seq`` takes from the captions first: caption words are cut longest
  caption first, then (only if even empty marker pairs do not fit) whole caption blocks, tail's
  first; only then is the sentence cut from the right. Every marker lost is counted in the report.
- Crops: a box ``[x1, y1, x2, y2]`` in [0, 1] maps to pixels by rounding ``x * W`` and ``y * H``
  (clamped, at least one pixel), is cut with PIL and resized bicubic to ``S x S``.
- Depth: the map from the depth store is min-max normalized to [0, 1] over the whole image (a flat
  map becomes zeros), then the same box, scaled by the map's own ``H, W``, is cut and resized
  nearest-neighbour (pixel centres, like PIL's NEAREST) to ``S x S``; stored as float16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.config import Params, section_hash
from pipeline.data.records import (
    PAIR_KINDS,
    SPLITS,
    DataError,
    Dataset,
    Record,
    object_slot,
    write_json,
)
from pipeline.hub import MARKERS

__all__ = [
    "SCHEMA_VERSION",
    "CLIP_MEAN",
    "CLIP_STD",
    "DepthReader",
    "CaptionReader",
    "StaleCacheError",
    "cache_settings",
    "TextEncoder",
    "EncodedText",
    "box_to_pixels",
    "crop_objects",
    "normalize_depth",
    "crop_depth",
    "build_features",
    "FeatureDataset",
    "SampleRef",
    "collate",
    "make_loader",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
METADATA_KEY = b"remote.features"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# [head, tail] x [<s>, <k>, <o>]: indices into MARKERS of the opening markers (batch's marker_pos).
OPENING_MARKERS = ((0, 4, 8), (2, 6, 10))
_MARKER_INDEX = {name: i for i, name in enumerate(MARKERS)}


class DepthReader(Protocol):
    """What the features stage needs from a depth store (``pipeline.depth_store.DepthStore``)."""

    def get(self, image_id: str) -> np.ndarray: ...


class CaptionReader(Protocol):
    """What it needs from a caption table (``pipeline.caption_table.CaptionTable``)."""

    @property
    def backend(self) -> str: ...

    def get(self, image_id: str, key: str) -> str | None: ...


class StaleCacheError(RuntimeError):
    """A feature cache built with settings other than the current params."""


def cache_settings(params: Params) -> dict[str, Any]:
    """The params that shape the cache's bytes, by dotted name (``data.pad_to_max`` does not: the
    loader pads)."""
    return {
        "data.max_objects": params.data.max_objects,
        "data.max_seq": params.data.max_seq,
        "data.use_box": params.data.use_box,
        "data.use_caption": params.data.use_caption,
        "data.use_depth": params.data.use_depth,
        "features.crop_size": params.features.crop_size,
        "model.text_model": params.model.text_model,
    }


# --------------------------------------------------------------------------------------------
# Text: word pieces with entity markers, caption segment, truncation
# --------------------------------------------------------------------------------------------


@dataclass
class EncodedText:
    """One sample's text, unpadded, with where each of the 12 markers landed (-1: absent)."""

    input_ids: list[int]
    token_type_ids: list[int]
    marker_positions: list[int]
    caption_tokens_cut: int = 0
    sentence_tokens_cut: int = 0
    markers_dropped: list[str] = field(default_factory=list)


def _shrink_longest_first(lengths: list[int], cap: int) -> list[int]:
    """Cut one token at a time from the longest entry (the later one on ties) until the sum fits."""
    out = list(lengths)
    excess = sum(out) - max(cap, 0)
    while excess > 0:
        longest = max(range(len(out)), key=lambda i: (out[i], i))
        out[longest] -= 1
        excess -= 1
    return out


class TextEncoder:
    """Builds ``[CLS] sentence-with-markers [SEP] caption-segment [SEP]`` as word-piece ids."""

    def __init__(self, tokenizer: Any, max_seq: int):
        ids = tokenizer.convert_tokens_to_ids(list(MARKERS))
        if tokenizer.unk_token_id in ids:
            missing = [m for m, i in zip(MARKERS, ids, strict=True) if i == tokenizer.unk_token_id]
            raise ValueError(
                f"tokenizer lacks the entity markers {missing}: use hub.load_tokenizer"
            )
        min_seq = 2 + 4  # [CLS] [SEP] and room for the two sentence marker pairs
        if max_seq < min_seq:
            raise ValueError(f"data.max_seq must be at least {min_seq}, found {max_seq}")
        self.tokenizer = tokenizer
        self.max_seq = max_seq
        self.marker_ids = dict(zip(MARKERS, ids, strict=True))
        self._marker_names = {i: m for m, i in self.marker_ids.items()}
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self._pieces: dict[str, list[int]] = {}

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text (no special tokens); remembered across calls. A marker or
        special token written in the text itself (a post that says ``<s1>``, a caption with
        ``[SEP]``) is split into ordinary word pieces, so only the encoder places markers."""
        missing = sorted({t for t in texts if t not in self._pieces})
        if missing:
            encoded = self.tokenizer(missing, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
            self._pieces.update(zip(missing, encoded, strict=True))
        return [self._pieces[t] for t in texts]

    def sentence(self, record: Record) -> list[int]:
        """The record's words as word pieces, ``<s1>``/``<s2>`` pairs around text head / tail."""
        words = self.pieces(record.text_tokens)
        spans = []  # (start, end, n) for each text entity, n = 1 head, 2 tail
        for n, entity in ((1, record.head), (2, record.tail)):
            if entity.kind != "text":
                continue
            start, end = entity.span
            if not 0 <= start <= end <= len(words):
                raise DataError(
                    f"record {record.id}: {entity.name!r} span [{start}, {end}) is outside its "
                    f"{len(words)} tokens"
                )
            spans.append((start, end, n))
        ids: list[int] = []
        for pos in range(len(words) + 1):
            # Keep the pairs nested: at a shared end the later-opened span closes first; at a
            # shared start the longer span opens first.
            for _, _, n in sorted((s for s in spans if s[1] == pos), key=lambda s: (-s[0], -s[2])):
                ids.append(self.marker_ids[f"</s{n}>"])
            for _, _, n in sorted((s for s in spans if s[0] == pos), key=lambda s: (-s[1], s[2])):
                ids.append(self.marker_ids[f"<s{n}>"])
            if pos < len(words):
                ids.extend(words[pos])
        return ids

    def encode(self, record: Record, captions: tuple[str | None, str | None] | None) -> EncodedText:
        """Encode one record; ``captions`` = (head's, tail's) caption, or None for no segment."""
        sentence = self.sentence(record)
        blocks = []  # (opening id, caption ids, closing id), head's then tail's
        if captions is not None:
            for n, entity, caption in (
                (1, record.head, captions[0]),
                (2, record.tail, captions[1]),
            ):
                letter = "k" if entity.kind == "text" else "o"
                content = self.pieces([caption])[0] if caption else []
                blocks.append(
                    (self.marker_ids[f"<{letter}{n}>"], content, self.marker_ids[f"</{letter}{n}>"])
                )
        markers_before = sentence + [marker for o, _, c in blocks for marker in (o, c)]

        budget = self.max_seq - 2  # [CLS] ... [SEP]
        caption_cut = 0
        if blocks:
            room = budget - 1 - len(sentence)  # the segment's own [SEP] takes one
            # Captions give way before the sentence: first whole blocks if even their marker
            # pairs cannot fit (tail's first), then caption words, longest caption first.
            while blocks and 2 * len(blocks) > room:
                caption_cut += len(blocks.pop()[1])
            lengths = [len(content) for _, content, _ in blocks]
            kept = _shrink_longest_first(lengths, room - 2 * len(blocks))
            caption_cut += sum(lengths) - sum(kept)
            blocks = [(o, c[:k], e) for (o, c, e), k in zip(blocks, kept, strict=True)]
        sentence_cut = max(0, len(sentence) - budget)
        sentence = sentence[:budget]

        input_ids = [self.cls_id, *sentence, self.sep_id]
        token_type_ids = [0] * len(input_ids)
        if blocks:
            segment = [
                i for opening, content, closing in blocks for i in (opening, *content, closing)
            ]
            input_ids += [*segment, self.sep_id]
            token_type_ids += [1] * (len(segment) + 1)

        positions = [-1] * len(MARKERS)
        for pos, token in enumerate(input_ids):
            name = self._marker_names.get(token)
            if name is not None and positions[_MARKER_INDEX[name]] < 0:
                positions[_MARKER_INDEX[name]] = pos
        dropped = Counter(self._marker_names[i] for i in markers_before if i in self._marker_names)
        dropped.subtract(self._marker_names[i] for i in input_ids if i in self._marker_names)
        return EncodedText(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            marker_positions=positions,
            caption_tokens_cut=caption_cut,
            sentence_tokens_cut=sentence_cut,
            markers_dropped=sorted(dropped.elements(), key=_MARKER_INDEX.__getitem__),
        )


# --------------------------------------------------------------------------------------------
# Images: object crops, depth crops, boxes
# --------------------------------------------------------------------------------------------


def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A [0, 1] box -> integer pixel box (left, top, right, bottom), rounded, clamped to the
    image, at least one pixel wide and high."""

    def span(lo: float, hi: float, size: int) -> tuple[int, int]:
        a = min(max(math.floor(lo * size + 0.5), 0), size - 1)
        b = min(max(math.floor(hi * size + 0.5), a + 1), size)
        return a, b

    left, right = span(box[0], box[2], width)
    top, bottom = span(box[1], box[3], height)
    return left, top, right, bottom


def object_layout(
    objects: dict[str, Sequence[float]], max_objects: int, image_id: str
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[P, 4]`` (float64, [0, 1]) and the occupied-slot mask ``[P]`` of one image."""
    boxes = np.zeros((max_objects, 4), dtype=np.float64)
    mask = np.zeros(max_objects, dtype=bool)
    for name, box in objects.items():
        slot = object_slot(name)
        if slot >= max_objects:
            raise DataError(
                f"objects.json: image {image_id!r} has {name}, "
                f"but data.max_objects is {max_objects}"
            )
        if len(box) != 4:
            raise DataError(
                f"objects.json: image {image_id!r} {name}: expected [x1, y1, x2, y2], found {box}"
            )
        boxes[slot] = np.clip(np.asarray(box, dtype=np.float64), 0.0, 1.0)
        mask[slot] = True
    return boxes, mask


def crop_objects(image: Image.Image, boxes: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """RGB crops of the occupied slots, bicubic-resized: uint8 ``[P, 3, size, size]``."""
    image = image.convert("RGB")
    crops = np.zeros((len(boxes), 3, size, size), dtype=np.uint8)
    for slot in np.flatnonzero(mask):
        pixels = box_to_pixels(boxes[slot], image.width, image.height)
        crop = image.crop(pixels).resize((size, size), Image.Resampling.BICUBIC)
        crops[slot] = np.asarray(crop).transpose(2, 0, 1)
    return crops


def normalize_depth(depth_map: np.ndarray, image_id: str = "?") -> np.ndarray:
    """Min-max normalize a depth map to [0, 1] (float32); a flat map becomes zeros."""
    depth_map = np.asarray(depth_map, dtype=np.float32)
    if depth_map.ndim != 2 or depth_map.size == 0:
        raise DataError(f"depth map of {image_id!r}: expected [H, W], found {depth_map.shape}")
    if not np.isfinite(depth_map).all():
        raise DataError(f"depth map of {image_id!r}: has NaN or infinite values")
    low, high = float(depth_map.min()), float(depth_map.max())
    if high <= low:
        return np.zeros_like(depth_map)
    return ((depth_map - low) / (high - low)).astype(np.float32)


def crop_depth(depth_map: np.ndarray, boxes: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """Each occupied slot's box cut from a (normalized) depth map, nearest-resized at pixel centres:
    float32 ``[P, size, size]``."""
    height, width = depth_map.shape
    crops = np.zeros((len(boxes), size, size), dtype=np.float32)
    centres = 2 * np.arange(size) + 1
    for slot in np.flatnonzero(mask):
        left, top, right, bottom = box_to_pixels(boxes[slot], width, height)
        # floor((i + 0.5) * extent / size) in exact integer arithmetic
        rows = top + centres * (bottom - top) // (2 * size)
        cols = left + centres * (right - left) // (2 * size)
        crops[slot] = depth_map[np.ix_(rows, cols)]
    return crops


# --------------------------------------------------------------------------------------------
# Building the cache
# --------------------------------------------------------------------------------------------


def _metadata(table: str, split: str, settings: dict[str, Any], tokenizer: Any) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "table": table,
        "split": split,
        "settings": settings,
        "settings_hash": section_hash(settings),
        "markers": list(MARKERS),
        "pad_token_id": int(tokenizer.pad_token_id),
        "vocab_size": len(tokenizer),
    }


def _write_parquet(table: pa.Table, path: Path, metadata: dict[str, Any]) -> None:
    """Write one shard atomically; identical inputs give identical bytes."""
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(
        table,
        tmp,
        compression="zstd",
        use_dictionary=False,
        write_statistics=False,
        row_group_size=max(1, table.num_rows),
    )
    os.replace(tmp, path)


def _samples_table(
    records: list[Record],
    encoded: list[EncodedText],
    image_index: dict[str, int],
    label_ids: dict[str, int],
) -> pa.Table:
    def slot(entity: Any) -> int:
        return entity.slot if entity.kind == "object" else -1

    return pa.table(
        {
            "sample_id": pa.array([r.id for r in records], pa.string()),
            "image_id": pa.array([r.image_id for r in records], pa.string()),
            "image_index": pa.array([image_index[r.image_id] for r in records], pa.int32()),
            "input_ids": pa.array([e.input_ids for e in encoded], pa.list_(pa.int32())),
            "token_type_ids": pa.array([e.token_type_ids for e in encoded], pa.list_(pa.int8())),
            "length": pa.array([len(e.input_ids) for e in encoded], pa.int32()),
            "marker_positions": pa.array(
                [e.marker_positions for e in encoded], pa.list_(pa.int16(), len(MARKERS))
            ),
            "head_slot": pa.array([slot(r.head) for r in records], pa.int8()),
            "tail_slot": pa.array([slot(r.tail) for r in records], pa.int8()),
            "pair_kind": pa.array([PAIR_KINDS.index(r.pair_kind) for r in records], pa.int8()),
            "label": pa.array([label_ids[r.relation] for r in records], pa.int16()),
        }
    )


def _images_table(
    dataset: Dataset,
    image_ids: list[str],
    objects: dict[str, dict[str, Sequence[float]]],
    depth: DepthReader | None,
    params: Params,
) -> pa.Table:
    """One image shard. An unreadable image or a map missing from the depth store is an error,
    or, under ``data.on_error=skip``, zeros plus a note in the ``problem`` column."""
    size, slots = params.features.crop_size, params.data.max_objects
    crops, depths, boxes, masks, problems = [], [], [], [], []
    for image_id in image_ids:
        layout, mask = object_layout(objects.get(image_id, {}), slots, image_id)
        crop = np.zeros((slots, 3, size, size), dtype=np.uint8)
        depth_crop = np.zeros((slots, size, size), dtype=np.float32)
        problem = []
        if mask.any():
            path = dataset.image_path(image_id)
            try:
                with Image.open(path) as image:
                    crop = crop_objects(image, layout, mask, size)
            except OSError as exc:
                problem.append(f"image {path}: {exc}")
            if depth is not None:
                try:
                    depth_map = normalize_depth(depth.get(image_id), image_id)
                    depth_crop = crop_depth(depth_map, layout, mask, size)
                except KeyError as exc:
                    problem.append(f"no depth map ({exc.args[0]})")
        if problem and params.data.on_error == "raise":
            raise DataError(
                f"image {image_id!r}: {'; '.join(problem)} "
                "(with data.on_error=skip its crops become zeros instead)"
            )
        crops.append(crop.tobytes())
        depths.append(depth_crop.astype("<f2").tobytes())
        area = (layout[:, 2] - layout[:, 0]) * (layout[:, 3] - layout[:, 1])
        box5 = np.concatenate([layout, area[:, None]], axis=1).astype(np.float32)
        boxes.append(box5.reshape(-1) if params.data.use_box else np.zeros(slots * 5, np.float32))
        masks.append(mask)
        problems.append("; ".join(problem))
    return pa.table(
        {
            "image_id": pa.array(image_ids, pa.string()),
            "num_objects": pa.array([int(m.sum()) for m in masks], pa.int8()),
            "object_mask": pa.array([m.tolist() for m in masks], pa.list_(pa.bool_(), slots)),
            "boxes": pa.FixedSizeListArray.from_arrays(
                pa.array(np.concatenate(boxes) if boxes else [], pa.float32()), slots * 5
            ),
            "object_crops": pa.array(crops, pa.binary(slots * 3 * size * size)),
            "depth_crops": pa.array(depths, pa.binary(slots * size * size * 2)),
            "problem": pa.array(problems, pa.string()),
        }
    )


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
    from pipeline.hub import load_tokenizer

    out_dir = Path(out_dir)
    data, features = params.data, params.features
    if data.use_depth and depth is None:
        raise ValueError("data.use_depth is true but no depth store was given")
    if tokenizer is None:
        tokenizer = load_tokenizer(params.model.text_model)
    encoder = TextEncoder(tokenizer, data.max_seq)
    settings = cache_settings(params)
    use_captions = data.use_caption and captions is not None and captions.backend != "none"
    image_shard_size = features.image_shard_size

    partial = out_dir.with_name(out_dir.name + ".partial")
    # everything that changes an image shard's bytes, beyond the settings the loader checks
    layout = {"shards": [features.shard_size, image_shard_size], "on_error": data.on_error}
    fingerprint = _inputs_fingerprint({**settings, **layout}, [dataset.root, *input_paths])
    stamp = partial / ".inputs"
    if not (stamp.is_file() and stamp.read_text() == fingerprint):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        stamp.write_text(fingerprint)

    objects = dataset.objects
    label_ids = dataset.relations
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
        stats = _SplitStats(len(records), len(image_ids))
        encoded = []
        for record in records:
            _check_record(record, label_ids, objects)
            pair = None
            if use_captions:
                pair = tuple(
                    captions.get(record.image_id, e.name) for e in (record.head, record.tail)
                )
                stats.count_missing(record, pair)
            encoded.append(encoder.encode(record, pair))
            stats.count(encoded[-1])
        meta = _metadata("samples", split, settings, tokenizer)
        for k, start in enumerate(range(0, max(len(records), 1), features.shard_size)):
            stop = start + features.shard_size
            table = _samples_table(records[start:stop], encoded[start:stop], image_index, label_ids)
            _write_parquet(table, split_dir / f"samples-{k:05d}.parquet", meta)

        meta = _metadata("images", split, settings, tokenizer)
        for k, start in enumerate(range(0, max(len(image_ids), 1), image_shard_size)):
            path = split_dir / f"images-{k:05d}.parquet"
            if path.is_file():  # finished by a killed run with the same inputs
                continue
            chunk = image_ids[start : start + image_shard_size]
            table = _images_table(
                dataset, chunk, objects, depth if data.use_depth else None, params
            )
            _write_parquet(table, path, meta)
        problems = [
            (image_id, problem)
            for path in sorted(split_dir.glob("images-*.parquet"))
            for image_id, problem in zip(
                *pq.read_table(path, columns=["image_id", "problem"]).to_pydict().values(),
                strict=True,
            )
            if problem
        ]
        report["splits"][split] = {
            **stats.to_json(),
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
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return report


def _check_record(
    record: Record, label_ids: dict[str, int], objects: dict[str, dict[str, Any]]
) -> None:
    if record.relation not in label_ids:
        raise DataError(f"record {record.id}: relation {record.relation!r} not in relations.json")
    for entity in (record.head, record.tail):
        if entity.kind == "object" and entity.name not in objects.get(record.image_id, {}):
            raise DataError(
                f"record {record.id}: {entity.name} has no box in objects.json "
                f"for image {record.image_id!r}"
            )


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


# --------------------------------------------------------------------------------------------
# Loading: FeatureDataset + collate
# --------------------------------------------------------------------------------------------


def _read_checked(path: Path, expected: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    """Read one shard after checking its metadata against the current settings."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise StaleCacheError(f"{path}: not a features cache file (no remote.features metadata)")
    meta = json.loads(raw)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise StaleCacheError(
            f"{path}: cache schema version {meta.get('schema_version')}, this code reads "
            f"{SCHEMA_VERSION}: rerun the features stage (dvc repro features)"
        )
    built = meta["settings"]
    for key, value in expected.items():
        if built.get(key) != value:
            raise StaleCacheError(
                f"{path}: cache built with {key}={built.get(key)!r}, params say {key}={value!r}: "
                "rerun the features stage (dvc repro features)"
            )
    return pq.read_table(path), meta


def _fixed_binary(column: pa.ChunkedArray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size binary column -> one numpy array ``[rows, *shape]`` (one copy)."""
    width = int(np.prod(shape)) * np.dtype(dtype).itemsize
    parts = [
        np.frombuffer(c.buffers()[1], dtype=np.uint8, count=len(c) * width, offset=c.offset * width)
        for c in column.chunks
        if len(c)
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return flat.view(dtype).reshape(-1, *shape)


class SampleRef(NamedTuple):
    """What ``FeatureDataset[i]`` returns: a cheap reference; :func:`collate` gathers the data."""

    dataset: FeatureDataset
    index: int


class FeatureDataset(torch.utils.data.Dataset):
    """One split of the feature cache, held in memory as numpy arrays.

    ``dataset[i]`` is a :class:`SampleRef`; :func:`collate` (or :meth:`batch`) turns a list of them
    into the batch dict of docs/ARCHITECTURE.md with a few vectorized gathers.
    """

    def __init__(self, features_dir: str | Path, split: str, params: Params):
        folder = Path(features_dir) / split
        sample_files = sorted(folder.glob("samples-*.parquet"))
        image_files = sorted(folder.glob("images-*.parquet"))
        if not sample_files or not image_files:
            raise FileNotFoundError(
                f"{folder}: no feature shards (samples-*.parquet, images-*.parquet): "
                "run the features stage first (dvc repro features)"
            )
        expected = cache_settings(params)
        samples, meta = zip(*(_read_checked(p, expected) for p in sample_files), strict=True)
        images, _ = zip(*(_read_checked(p, expected) for p in image_files), strict=True)
        samples, images = pa.concat_tables(samples), pa.concat_tables(images)

        self.split = split
        self.max_seq = params.data.max_seq
        self.pad_to_max = params.data.pad_to_max
        self.pad_token_id = int(meta[0]["pad_token_id"])
        slots, size = params.data.max_objects, params.features.crop_size

        def column(table: pa.Table, name: str) -> np.ndarray:
            return table.column(name).to_numpy()

        self.sample_ids: list[str] = samples.column("sample_id").to_pylist()
        self.lengths = column(samples, "length").astype(np.int64)
        self.input_ids = self._padded(samples.column("input_ids"), np.int64, self.pad_token_id)
        self.token_type_ids = self._padded(samples.column("token_type_ids"), np.int64, 0)
        positions = samples.column("marker_positions").combine_chunks().flatten().to_numpy()
        self.marker_positions = positions.astype(np.int64).reshape(-1, len(MARKERS))
        self.object_slots = np.stack(
            [column(samples, "head_slot"), column(samples, "tail_slot")], axis=1
        ).astype(np.int64)
        self.pair_kinds = column(samples, "pair_kind").astype(np.int64)
        self.labels = column(samples, "label").astype(np.int64)
        self.image_index = column(samples, "image_index").astype(np.int64)

        self.image_ids: list[str] = images.column("image_id").to_pylist()
        self.num_objects = column(images, "num_objects").astype(np.int64)
        mask = (
            images.column("object_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        )
        self.object_mask = mask.reshape(-1, slots)
        boxes = images.column("boxes").combine_chunks().flatten().to_numpy()
        self.boxes = boxes.astype(np.float32).reshape(-1, slots, 5)
        self.object_crops = _fixed_binary(
            images.column("object_crops"), "u1", (slots, 3, size, size)
        )
        self.depth_crops = _fixed_binary(images.column("depth_crops"), "<f2", (slots, size, size))
        if len(self.image_index) and self.image_index.max() >= len(self.image_ids):
            raise StaleCacheError(
                f"{folder}: samples point past the image table; rebuild the cache"
            )
        std = torch.tensor(CLIP_STD).view(3, 1, 1)
        self._scale = 1 / (255 * std)
        self._shift = -torch.tensor(CLIP_MEAN).view(3, 1, 1) / std

    def _padded(self, column: pa.ChunkedArray, dtype: type, pad: int) -> np.ndarray:
        """Ragged list column -> ``[N, max_seq]`` padded matrix (so a batch is one slice)."""
        values = column.combine_chunks()
        flat = values.flatten().to_numpy().astype(dtype)
        lengths = self.lengths
        if len(flat) != lengths.sum():
            raise StaleCacheError("features cache: token lists disagree with the length column")
        out = np.full((len(lengths), self.max_seq), pad, dtype=dtype)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        cols = np.arange(len(flat)) - np.repeat(starts, lengths)
        out[rows, cols] = flat
        return out

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> SampleRef:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return SampleRef(self, index % len(self))

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The batch dict of docs/ARCHITECTURE.md for these sample indices."""
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        width = self.max_seq if self.pad_to_max else int(lengths.max())
        images = self.image_index[idx]
        slots, size = self.object_mask.shape[1], self.object_crops.shape[-1]
        # Only occupied slots are converted (most images fill few of the P); the rest stay zeros.
        occupied = np.flatnonzero(self.object_mask[images].reshape(-1))  # rows of [B * P]
        source = (images[occupied // slots], occupied % slots)
        rows = torch.from_numpy(occupied)
        crops = torch.from_numpy(self.object_crops[source]).float()
        pixels = torch.zeros(len(idx) * slots, 3, size, size)
        # CLIP normalization (x / 255 - mean) / std as one multiply-add
        pixels.index_copy_(0, rows, crops.mul_(self._scale).add_(self._shift))
        depth = torch.zeros(len(idx) * slots, size, size)
        depth.index_copy_(0, rows, torch.from_numpy(self.depth_crops[source]).float())
        return {
            "input_ids": torch.from_numpy(self.input_ids[idx, :width]),
            "token_type_ids": torch.from_numpy(self.token_type_ids[idx, :width]),
            "attention_mask": torch.from_numpy(
                (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
            ),
            "marker_pos": torch.from_numpy(self.marker_positions[idx][:, OPENING_MARKERS]),
            "object_slot": torch.from_numpy(self.object_slots[idx]),
            "pixel_values": pixels.view(len(idx), slots, 3, size, size),
            "depth_values": depth.view(len(idx), slots, size, size),
            "boxes": torch.from_numpy(self.boxes[images]),
            "num_objects": torch.from_numpy(self.num_objects[images]),
            "labels": torch.from_numpy(self.labels[idx]),
            "pair_kind": torch.from_numpy(self.pair_kinds[idx]),
        }


def collate(items: Sequence[SampleRef]) -> dict[str, torch.Tensor]:
    """Batch ``FeatureDataset`` items with vectorized gathers (the DataLoader's ``collate_fn``)."""
    if not items:
        raise ValueError("collate: empty batch")
    dataset = items[0].dataset
    if any(item.dataset is not dataset for item in items):
        raise ValueError("collate: all items of a batch must come from the same FeatureDataset")
    return dataset.batch([item.index for item in items])


def make_loader(
    features_dir: str | Path,
    split: str,
    params: Params,
    batch_size: int,
    shuffle: bool,
    seed: int,
    *,
    num_workers: int = 0,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over one split of the cache; its shuffling order depends only on ``seed``."""
    dataset = FeatureDataset(features_dir, split, params)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
