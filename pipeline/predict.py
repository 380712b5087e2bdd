"""Label new (text, image, entity pair) inputs with a trained model folder.

Input: JSONL, one object per line::

    {"id": "optional, echoed back",
     "text_tokens": ["Bill", "Cosby", "visits", ...]   or   "text": "Bill Cosby visits ...",
     "image": "photos/1.jpg",                    # relative to the input file's folder
     "head": {"span": [0, 2]},                   # text entity: token span [start, end)
     "tail": {"box": [0.1, 0.2, 0.5, 0.9]},      # visual object: box in [0, 1] image coordinates
     "objects": [[x1, y1, x2, y2], ...],         # optional: the image's other objects
     "head_caption": "...", "tail_caption": "...",   # optional captions
     "depth": "maps/1.npy"}                      # optional: a float [H, W] depth map

- ``"text"`` is split on whitespace; spans index those tokens.
- Object slots: ``objects`` in their order, then the head's and the tail's box unless equal to one
  already listed. An image is needed only when some box is given.
- Captions: none unless given (missing ones leave their markers empty, as in training).
- Depth, when the model uses it: the line's ``"depth"`` map if given, else the depth model named in
  the saved params when ``depth.source`` is ``"model"``, else zeros (with a warning).

Every sample goes through the features stage's own code (:mod:`pipeline.features.featurize`:
markers, truncation, crops, depth crops) into in-memory tables that the feature reader loads as it
loads the cache, so predictions match what training and evaluation saw.

Output: JSONL, one line per input line: ``{"line", "id", "label", "probabilities": {label: p}}``,
plus ``"markers_lost_to_truncation": [...]`` when the text is longer than ``data.max_seq`` and an
entity's markers fell off its end (the model did not see that entity).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.images import checked_box, image_size, open_image
from pipeline.data.records import NONE_LABEL, Entity, Record, object_name
from pipeline.depth.model import load_depth_model, predict_depth
from pipeline.depth.run import load_shipped_depth
from pipeline.depth.store import store_rounding
from pipeline.device import select_device
from pipeline.features.dataset import FeatureDataset
from pipeline.features.featurize import (
    featurize_image,
    featurize_sample,
    images_table,
    samples_table,
)
from pipeline.features.text import TextEncoder
from pipeline.inference import load_for_inference, predict_dataset
from pipeline.io import DataError, atomic_write_text, not_utf8
from pipeline.model.saved import TrainedModel, model_folder, read_trained_params
from pipeline.text import MARKERS
from pipeline.vision import pixel_normalization

__all__ = ["PredictInput", "read_inputs", "predict_file", "predict_inputs"]

log = logging.getLogger(__name__)

_KEYS = {
    "id",
    "text_tokens",
    "text",
    "image",
    "head",
    "tail",
    "objects",
    "head_caption",
    "tail_caption",
    "depth",
}


@dataclass(frozen=True)
class PredictInput:
    """One validated input line; entities refer to tokens (span) or object slots (box)."""

    where: str  # "file:line", for error messages
    line: int
    id: str | None
    tokens: tuple[str, ...]
    image: Path | None
    boxes: tuple[tuple[float, float, float, float], ...]  # object slots, in order
    head: Entity
    tail: Entity
    head_caption: str | None
    tail_caption: str | None
    depth: Path | None
    depth_map: np.ndarray | None = field(default=None, repr=False, compare=False)  # read, checked


def _box(value: Any, where: str, what: str) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = checked_box(value, f"{where}: {what}")
    return x1, y1, x2, y2


def _optional_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: {key!r}: expected a string, found {value!r}")
    return value


def _parse_line(obj: Any, where: str, line: int, base: Path, max_objects: int) -> PredictInput:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    if ("text" in obj) == ("text_tokens" in obj):
        raise DataError(f"{where}: give exactly one of 'text' (a string) or 'text_tokens' (a list)")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text': expected a string, found {obj['text']!r}")
        tokens = tuple(obj["text"].split())
    else:
        value = obj["text_tokens"]
        if not (isinstance(value, list) and all(isinstance(t, str) for t in value)):
            raise DataError(f"{where}: 'text_tokens': expected a list of strings, found {value!r}")
        tokens = tuple(value)
    if not tokens:
        raise DataError(f"{where}: the text is empty")

    raw_objects = obj.get("objects", [])
    if not isinstance(raw_objects, list):
        raise DataError(f"{where}: 'objects': expected a list of boxes, found {raw_objects!r}")
    boxes = [_box(b, where, f"objects[{i}]") for i, b in enumerate(raw_objects)]

    entities = []
    for role in ("head", "tail"):
        value = obj.get(role)
        if not isinstance(value, dict) or len(value.keys() & {"span", "box"}) != 1:
            raise DataError(
                f'{where}: {role!r}: expected {{"span": [start, end]}} or '
                f'{{"box": [x1, y1, x2, y2]}}, found {value!r}'
            )
        if "span" in value:
            span = value["span"]
            valid = (
                isinstance(span, list)
                and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                and 0 <= span[0] < span[1] <= len(tokens)
            )
            if not valid:
                raise DataError(
                    f"{where}: {role}.span: expected [start, end) with 0 <= start < end <= "
                    f"{len(tokens)} (the number of tokens), found {span!r}"
                )
            name = " ".join(tokens[span[0] : span[1]])
            entities.append(Entity("text", name, (span[0], span[1])))
        else:
            box = _box(value["box"], where, f"{role}.box")
            if box not in boxes:
                boxes.append(box)
            entities.append(Entity("object", object_name(boxes.index(box))))
    if len(boxes) > max_objects:
        raise DataError(
            f"{where}: {len(boxes)} objects, but the model has {max_objects} object slots"
        )

    image = None
    if obj.get("image") is not None:
        image = base / _optional_str(obj, "image", where)
    if boxes and image is None:
        raise DataError(f"{where}: 'image' is required when boxes are given")
    if image is not None:  # checked whether or not boxes use it: a bad file is a bad line
        if not image.is_file():
            raise DataError(f"{where}: image {image}: file not found")
        try:
            open_image(image)  # decoded as training decoded it: truncated files and bombs fail
        except DataError as exc:
            raise DataError(f"{where}: image {image}: cannot decode it ({exc})") from exc
    depth = depth_map = None
    if obj.get("depth") is not None:
        depth = base / _optional_str(obj, "depth", where)
        if not depth.is_file():
            raise DataError(f"{where}: depth map {depth}: file not found")
        try:  # checked whether or not boxes use it, as the image
            depth_map = load_shipped_depth(depth)
        except DataError as exc:
            raise DataError(f"{where}: depth map {exc}") from exc
    sample_id = obj.get("id")
    return PredictInput(
        where=where,
        line=line,
        id=None if sample_id is None else str(sample_id),
        tokens=tokens,
        image=image,
        boxes=tuple(boxes),
        head=entities[0],
        tail=entities[1],
        head_caption=_optional_str(obj, "head_caption", where),
        tail_caption=_optional_str(obj, "tail_caption", where),
        depth=depth,
        depth_map=depth_map,
    )


def read_inputs(path: str | Path, max_objects: int) -> list[PredictInput]:
    """Parse and validate an input JSONL; a bad line raises ``DataError("file:line: problem")``."""
    path = Path(path)
    inputs = []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"{path}:{line_no}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: {not_utf8(raw, exc, 'UTF-8 JSON')[1]}") from exc
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        inputs.append(_parse_line(obj, where, line_no, path.parent, max_objects))
    if not inputs:
        raise DataError(f"{path}: no input lines")
    return inputs


class _LineCaptions:
    """The captions given in the lines, as the features code reads captions."""

    def __init__(self, backend: str, captions: dict[str, dict[str, str]]):
        self._backend, self._captions = backend, captions

    @property
    def backend(self) -> str:
        return self._backend

    def get(self, image_id: str, key: str) -> str | None:
        return self._captions.get(image_id, {}).get(key)


class _LineDepth:
    """The depth maps of the lines, as the features code reads a depth store."""

    def __init__(self, maps: dict[str, np.ndarray]):
        self._maps = maps

    def get(self, image_id: str) -> np.ndarray:
        return self._maps[image_id]


def _depth_maps(inputs: Sequence[PredictInput], image_ids: list[str], params: Any) -> dict:
    """One depth map per image id with objects: the line's own, the depth model's, or zeros."""
    maps: dict[str, np.ndarray] = {}
    by_model, zeros = [], 0
    for item, image_id in zip(inputs, image_ids, strict=True):
        if not item.boxes:
            continue
        if item.depth_map is not None:
            maps[image_id] = store_rounding(item.depth_map)
        elif params.depth.source == "model":
            by_model.append((item, image_id))
        else:
            width, height = image_size(item.image)
            maps[image_id] = np.zeros((height, width), dtype=np.float32)
            zeros += 1
    if zeros:
        log.warning(
            "%d input lines have objects but no 'depth' map, and the model's depth came from its "
            "dataset (depth.source=%s): their depth channel is zeros, unlike in training",
            zeros,
            params.depth.source,
        )
    if by_model:
        model = load_depth_model(params.depth.model).to(select_device())
        images = [open_image(item.image) for item, _ in by_model]
        predicted = predict_depth(model, images, params.depth.batch_size, params.depth.dtype)
        for (_, image_id), depth_map in zip(by_model, predicted, strict=True):
            maps[image_id] = store_rounding(depth_map)
    return maps


def _record(item: PredictInput, image_id: str) -> Record:
    """The input as a record; its label is unknown, and the features code needs one."""
    return Record(item.where, item.tokens, image_id, item.head, item.tail, NONE_LABEL)


def predict_inputs(
    trained: TrainedModel, inputs: Sequence[PredictInput], batch_size: int
) -> list[dict[str, Any]]:
    """Labels and class probabilities for validated inputs."""
    params = trained.params
    image_ids = [f"input-{index:07d}" for index in range(len(inputs))]  # captions are per line
    captions = None
    if params.use_captions:
        captions = _LineCaptions(
            params.caption.backend,
            {
                image_id: {
                    entity.name: caption
                    for entity, caption in (
                        (item.head, item.head_caption),
                        (item.tail, item.tail_caption),
                    )
                    if caption is not None
                }
                for item, image_id in zip(inputs, image_ids, strict=True)
            },
        )
    unused = sum(item.image is not None and not item.boxes for item in inputs)
    if unused:
        log.warning(
            "%d input lines give an image but no objects: the model sees an image only through "
            "its object boxes, so these lines are predicted from their text",
            unused,
        )
    depth = _LineDepth(_depth_maps(inputs, image_ids, params)) if params.data.use_depth else None
    encoder = TextEncoder(trained.tokenizer, params.data.max_seq)
    samples, images = [], []
    dropped = []
    for item, image_id in zip(inputs, image_ids, strict=True):
        samples.append(featurize_sample(_record(item, image_id), encoder, captions))
        dropped.append(list(samples[-1].text.markers_dropped))
        objects = {object_name(k): list(box) for k, box in enumerate(item.boxes)}
        images.append(featurize_image(image_id, item.image, objects, depth, params))
    label_ids = {label: i for i, label in enumerate(trained.labels)}
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    pixel_mean, pixel_std = pixel_normalization(params.model.vision_model)  # as the cache's
    dataset = FeatureDataset(
        samples_table(samples, index, label_ids),
        images_table(image_ids, images, params),
        params,
        markers=MARKERS,
        pad_token_id=trained.tokenizer.pad_token_id,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        name="predict inputs",
    )
    device = next(trained.model.parameters()).device
    out = predict_dataset(trained.model, dataset, batch_size, device)
    results = []
    for item, probs, lost in zip(inputs, out["probs"], dropped, strict=True):
        result = {
            "line": item.line,
            "id": item.id,
            "label": trained.labels[int(np.argmax(probs))],
            "probabilities": {
                label: round(float(p), 6) for label, p in zip(trained.labels, probs, strict=True)
            },
        }
        if lost:
            # The text is longer than data.max_seq and these markers fell off its end: the
            # model did not see where that entity is, so the label is a guess for it.
            result["markers_lost_to_truncation"] = lost
            log.warning("%s: entity markers %s lost to truncation", item.where, ", ".join(lost))
        results.append(result)
    return results


def predict_file(
    model_dir: str | Path, input_path: str | Path, output_path: str | Path, batch_size: int
) -> list[dict[str, Any]]:
    """Read inputs, label them with the model folder, write the output JSONL atomically. The
    inputs are checked before the weights load (only the folder's params are needed)."""
    folder = model_folder(model_dir)  # a Hub id is looked up once
    inputs = read_inputs(input_path, read_trained_params(folder).data.max_objects)
    trained = load_for_inference(folder)
    results = predict_inputs(trained, inputs, batch_size)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    atomic_write_text(output_path, text)
    return results
