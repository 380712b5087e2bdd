"""One record and one image to the arrays of the feature tables: the code the features stage and
``predict`` share, so a prediction sees exactly what training and evaluation saw."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from pipeline.config import Params
from pipeline.data.images import open_image
from pipeline.data.records import PAIR_KINDS, Entity, Record
from pipeline.features.dataset import SAMPLES_SCHEMA, images_schema
from pipeline.features.images import (
    check_depth_map,
    crop_depth,
    crop_objects,
    normalize_depth,
    object_layout,
)
from pipeline.features.text import EncodedText, TextEncoder
from pipeline.io import DataError

__all__ = [
    "DepthReader",
    "CaptionReader",
    "SampleFeatures",
    "ImageFeatures",
    "check_record",
    "featurize_sample",
    "featurize_image",
    "samples_table",
    "images_table",
]


class DepthReader(Protocol):
    """What featurizing needs from a depth source (``pipeline.depth.store.DepthStore``)."""

    def get(self, image_id: str) -> np.ndarray: ...


class CaptionReader(Protocol):
    """What it needs from a caption source (``pipeline.caption.table.CaptionTable``)."""

    @property
    def backend(self) -> str: ...

    def get(self, image_id: str, key: str) -> str | None: ...


@dataclass(frozen=True)
class SampleFeatures:
    """One record's text features and the captions that went into them (None: no segment)."""

    record: Record
    text: EncodedText
    captions: tuple[str | None, str | None] | None


@dataclass(frozen=True)
class ImageFeatures:
    """One image's object slots: mask ``[P]``, boxes ``[P, 5]``, crops ``[P, 3, S, S]`` (uint8),
    depth crops ``[P, S, S]`` (float16), and why the crops are zeros (``""`` when they are not)."""

    object_mask: np.ndarray
    boxes: np.ndarray
    object_crops: np.ndarray
    depth_crops: np.ndarray
    problem: str


def check_record(
    record: Record, label_ids: dict[str, int], objects: dict[str, dict[str, Any]]
) -> None:
    """A record's label is known and its objects have boxes; else DataError naming the record."""
    if record.relation not in label_ids:
        raise DataError(f"record {record.id}: relation {record.relation!r} not in relations.json")
    for entity in (record.head, record.tail):
        if entity.kind == "object" and entity.name not in objects.get(record.image_id, {}):
            raise DataError(
                f"record {record.id}: {entity.name} has no box in objects.json "
                f"for image {record.image_id!r}"
            )


def featurize_sample(
    record: Record, encoder: TextEncoder, captions: CaptionReader | None
) -> SampleFeatures:
    """The record's word pieces with markers and, when ``captions`` is given, its caption segment."""
    pair = None
    if captions is not None:
        pair = tuple(captions.get(record.image_id, e.name) for e in (record.head, record.tail))
    return SampleFeatures(record, encoder.encode(record, pair), pair)


def featurize_image(
    image_id: str,
    image_path: Path | None,
    objects: dict[str, Sequence[float]],
    depth: DepthReader | None,
    params: Params,
) -> ImageFeatures:
    """Crops, depth crops and boxes of one image's objects. An unreadable image or a map missing
    from ``depth`` is a DataError, or, under ``data.on_error=skip``, zeros plus a problem note (the
    features builder then leaves out the records of an image that does not decode)."""
    size, slots = params.features.crop_size, params.data.max_objects
    layout, mask = object_layout(objects, slots, image_id)
    crops = np.zeros((slots, 3, size, size), dtype=np.uint8)
    depth_crops = np.zeros((slots, size, size), dtype=np.float32)
    problem = []
    if mask.any():
        image = None
        try:
            if image_path is None:
                raise DataError("has objects but no image file")  # "image has objects ..."
            image = open_image(image_path)
            crops = crop_objects(image, layout, mask, size, params.features.crop_resize)
        except DataError as exc:
            problem.append(f"image {exc}")
        if depth is not None:
            try:
                depth_map = depth.get(image_id)
                if params.features.depth_scale == "minmax":
                    depth_map = normalize_depth(depth_map, image_id)
                else:
                    depth_map = check_depth_map(depth_map, image_id)
                if image is not None:  # the map is read at the image's size
                    depth_crops = crop_depth(depth_map, layout, mask, size, image.size)
            except KeyError as exc:
                problem.append(f"no depth map ({exc.args[0]})")
    if problem and params.data.on_error == "raise":
        raise DataError(
            f"image {image_id!r}: {'; '.join(problem)} "
            "(with data.on_error=skip a record whose image does not decode is left out, and a "
            "missing depth map becomes zeros)"
        )
    area = (layout[:, 2] - layout[:, 0]) * (layout[:, 3] - layout[:, 1])
    boxes = np.concatenate([layout, area[:, None]], axis=1).astype(np.float32)
    return ImageFeatures(
        object_mask=mask,
        boxes=boxes if params.data.use_box else np.zeros_like(boxes),
        object_crops=crops,
        depth_crops=depth_crops.astype("<f2"),
        problem="; ".join(problem),
    )


def _slot(entity: Entity) -> int:
    return entity.slot if entity.kind == "object" else -1


def samples_table(
    samples: Sequence[SampleFeatures], image_index: dict[str, int], label_ids: dict[str, int]
) -> pa.Table:
    """Sample rows in the cache's format (:data:`pipeline.features.dataset.SAMPLES_SCHEMA`)."""
    records = [s.record for s in samples]
    encoded = [s.text for s in samples]
    columns = {
        "sample_id": [r.id for r in records],
        "image_id": [r.image_id for r in records],
        "image_index": [image_index[r.image_id] for r in records],
        "input_ids": [e.input_ids for e in encoded],
        "token_type_ids": [e.token_type_ids for e in encoded],
        "length": [len(e.input_ids) for e in encoded],
        "marker_positions": [e.marker_positions for e in encoded],
        "head_slot": [_slot(r.head) for r in records],
        "tail_slot": [_slot(r.tail) for r in records],
        "pair_kind": [PAIR_KINDS.index(r.pair_kind) for r in records],
        "label": [label_ids[r.relation] for r in records],
    }
    return pa.table(
        [pa.array(columns[f.name], f.type) for f in SAMPLES_SCHEMA], schema=SAMPLES_SCHEMA
    )


def _tensor_column(arrays: Sequence[np.ndarray], tensor_type: pa.DataType) -> pa.Array:
    """Same-shape arrays as one ``fixed_shape_tensor`` column (``from_numpy_ndarray`` refuses an
    empty split's zero rows)."""
    if not arrays:
        return pa.array([], tensor_type)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.stack(arrays))


def images_table(
    image_ids: Sequence[str], images: Sequence[ImageFeatures], params: Params
) -> pa.Table:
    """Image rows in the cache's format (:func:`pipeline.features.dataset.images_schema`)."""
    slots, size = params.data.max_objects, params.features.crop_size
    schema = images_schema(slots, size)
    boxes = np.concatenate([i.boxes.reshape(-1) for i in images]) if images else []
    columns = {
        "image_id": pa.array(list(image_ids), pa.string()),
        "num_objects": pa.array([int(i.object_mask.sum()) for i in images], pa.int8()),
        "object_mask": pa.array([i.object_mask.tolist() for i in images], schema.field(2).type),
        "boxes": pa.FixedSizeListArray.from_arrays(pa.array(boxes, pa.float32()), slots * 5),
        "object_crops": _tensor_column([i.object_crops for i in images], schema.field(4).type),
        "depth_crops": _tensor_column([i.depth_crops for i in images], schema.field(5).type),
        "problem": pa.array([i.problem for i in images], pa.string()),
    }
    return pa.table([columns[f.name] for f in schema], schema=schema)
