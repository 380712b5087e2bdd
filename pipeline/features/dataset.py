"""The feature cache's format and its reader: what ``train``, ``evaluate`` and ``predict`` load.

A split of the cache (the ``features`` stage's ``<out>/<split>/``) is two kinds of Parquet shards:

- ``samples-NNNNN.parquet``, one row per sample (:data:`SAMPLES_SCHEMA`): ``sample_id``,
  ``image_id``, ``image_index`` (row of the split's image table), ``input_ids`` and
  ``token_type_ids`` (unpadded), ``length``, ``marker_positions`` (position of each marker of the
  metadata's ``markers`` list, in that order, or -1), ``head_slot`` / ``tail_slot`` (object slot or
  -1), ``pair_kind`` (index into ``PAIR_KINDS``) and ``label`` (id in ``relations.json``);
- ``images-NNNNN.parquet``, one row per image of the split (:func:`images_schema`), sorted by image
  id: ``image_id``, ``num_objects``, ``object_mask`` (bool ``[P]``), ``boxes`` (float32 ``[P * 5]``:
  x1, y1, x2, y2, area), two ``fixed_shape_tensor`` columns whose type carries dtype and shape:
  ``object_crops`` (uint8 ``[P, 3, S, S]``) and ``depth_crops`` (float16 ``[P, S, S]``), and
  ``problem`` (empty, or why the crops are zeros under ``data.on_error=skip``).

Every file's schema metadata (key :data:`METADATA_KEY`) records the schema version, the settings
that shaped it (:func:`cache_settings`), the marker list, the pad token, and the vision tower's
pixel normalization (``pixel_mean``, ``pixel_std``: its timm ``pretrained_cfg``, resolved by the
writer, so this reader needs no model code).
:meth:`FeatureDataset.load` refuses a cache built with other settings and names the setting that
differs. A dataset holds a split in memory as numpy arrays and gathers a whole batch with a few
vectorized index operations (no file opens, no decoding, no per-sample tensors), which torch's
DataLoader asks for through ``__getitems__``. ``predict`` builds the same tables in memory and
reads them here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import Params
from pipeline.data.records import label_map_hash
from pipeline.io import StaleCacheError

__all__ = [
    "SCHEMA_VERSION",
    "METADATA_KEY",
    "OPENING_MARKERS",
    "SAMPLES_SCHEMA",
    "images_schema",
    "cache_settings",
    "layout_settings",
    "FeatureDataset",
    "make_loader",
]

SCHEMA_VERSION = 3  # 2: the label map in the metadata; 3: crops as tensors, pixel mean/std
METADATA_KEY = b"remote.features"
# The batch's marker_pos: [head, tail] x [<s>, <k>, <o>], the opening markers by name.
OPENING_MARKERS = (("<s1>", "<k1>", "<o1>"), ("<s2>", "<k2>", "<o2>"))

SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("image_id", pa.string()),
        ("image_index", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("token_type_ids", pa.list_(pa.int8())),
        ("length", pa.int32()),
        ("marker_positions", pa.list_(pa.int16(), 12)),
        ("head_slot", pa.int8()),
        ("tail_slot", pa.int8()),
        ("pair_kind", pa.int8()),
        ("label", pa.int16()),
    ]
)


def images_schema(slots: int, size: int) -> pa.Schema:
    """The image table's schema for ``slots`` object slots and ``size`` x ``size`` crops."""
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("num_objects", pa.int8()),
            ("object_mask", pa.list_(pa.bool_(), slots)),
            ("boxes", pa.list_(pa.float32(), slots * 5)),
            ("object_crops", pa.fixed_shape_tensor(pa.uint8(), (slots, 3, size, size))),
            ("depth_crops", pa.fixed_shape_tensor(pa.float16(), (slots, size, size))),
            ("problem", pa.string()),
        ]
    )


def cache_settings(params: Params) -> dict[str, Any]:
    """The params that shape the cache, by dotted name: its bytes, and through
    ``model.vision_model`` the pixel normalization (``data.pad_to_max`` does not: the loader
    pads)."""
    return {
        "data.max_objects": params.data.max_objects,
        "data.max_seq": params.data.max_seq,
        "data.use_box": params.data.use_box,
        "data.use_caption": params.data.use_caption,
        "data.use_depth": params.data.use_depth,
        "features.crop_size": params.features.crop_size,
        "features.crop_resize": params.features.crop_resize,
        "features.depth_scale": params.features.depth_scale,
        "model.text_model": params.model.text_model,
        "model.vision_model": params.model.vision_model,
    }


def layout_settings(params: Params) -> dict[str, Any]:
    """The features stage's other params, by dotted name: they decide how rows are split into
    files and whether a bad image stops the build, not a row's bytes, so the loader does not
    check them; a killed build resumes only when they, too, are unchanged."""
    return {
        "features.shard_size": params.features.shard_size,
        "features.image_shard_size": params.features.image_shard_size,
        "data.on_error": params.data.on_error,
    }


def _read_checked(
    path: Path, expected: dict[str, Any], labels: Sequence[str]
) -> tuple[pa.Table, dict[str, Any]]:
    """Read one shard after checking its metadata against the current settings and label map."""
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
    if meta.get("label_map") != label_map_hash(labels):
        raise StaleCacheError(
            f"{path}: cache built for another label map ({meta.get('num_labels')} labels, "
            f"hash {meta.get('label_map')}), expected {len(labels)} labels (hash "
            f"{label_map_hash(labels)}): rerun the features stage on this dataset "
            "(dvc repro features)"
        )
    return pq.read_table(path), meta


class FeatureDataset(torch.utils.data.Dataset):
    """One split of features (samples and image tables), held in memory as numpy arrays.

    :meth:`batch` gathers the batch dict of docs/ARCHITECTURE.md with a few vectorized index
    operations; the DataLoader calls it as ``__getitems__``. ``dataset[i]`` is one sample's dict,
    without the batch dimension. Build it from the cache with :meth:`load`, or from tables made in
    memory (``predict``).
    """

    def __init__(
        self,
        samples: pa.Table,
        images: pa.Table,
        params: Params,
        *,
        markers: Sequence[str],
        pad_token_id: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        name: str = "features",
    ):
        self.split = name
        self.max_seq = params.data.max_seq
        self.pad_to_max = params.data.pad_to_max
        self.pad_token_id = int(pad_token_id)
        slots = params.data.max_objects
        self.opening_markers = [[list(markers).index(m) for m in row] for row in OPENING_MARKERS]

        def column(table: pa.Table, name: str) -> np.ndarray:
            return table.column(name).to_numpy()

        self.sample_ids: list[str] = samples.column("sample_id").to_pylist()
        self.lengths = column(samples, "length").astype(np.int64)
        self.input_ids = self._padded(samples.column("input_ids"), np.int64, self.pad_token_id)
        self.token_type_ids = self._padded(samples.column("token_type_ids"), np.int64, 0)
        positions = samples.column("marker_positions").combine_chunks().flatten().to_numpy()
        self.marker_positions = positions.astype(np.int64).reshape(-1, len(markers))
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
        # [I, P, 3, S, S] uint8 and [I, P, S, S] float16, zero-copy from a single shard
        self.object_crops = images.column("object_crops").combine_chunks().to_numpy_ndarray()
        self.depth_crops = images.column("depth_crops").combine_chunks().to_numpy_ndarray()
        if len(self.image_index) and self.image_index.max() >= len(self.image_ids):
            raise StaleCacheError(f"{name}: samples point past the image table; rebuild the cache")
        std = torch.tensor(pixel_std).view(3, 1, 1)
        self._scale = 1 / (255 * std)
        self._shift = -torch.tensor(pixel_mean).view(3, 1, 1) / std

    @classmethod
    def load(
        cls, features_dir: str | Path, split: str, params: Params, labels: Sequence[str]
    ) -> FeatureDataset:
        """One split of the cache, after checking every shard was built with these params and
        this label map (``labels``: names in id order, as the model's or the dataset's)."""
        folder = Path(features_dir) / split
        sample_files = sorted(folder.glob("samples-*.parquet"))
        image_files = sorted(folder.glob("images-*.parquet"))
        if not sample_files or not image_files:
            raise FileNotFoundError(
                f"{folder}: no feature shards (samples-*.parquet, images-*.parquet): "
                "run the features stage first (dvc repro features)"
            )
        expected = cache_settings(params)
        samples, meta = zip(
            *(_read_checked(p, expected, labels) for p in sample_files), strict=True
        )
        images, _ = zip(*(_read_checked(p, expected, labels) for p in image_files), strict=True)
        return cls(
            pa.concat_tables(samples),
            pa.concat_tables(images),
            params,
            markers=meta[0]["markers"],
            pad_token_id=meta[0]["pad_token_id"],
            pixel_mean=meta[0]["pixel_mean"],
            pixel_std=meta[0]["pixel_std"],
            name=str(folder),
        )

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

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index`` as :meth:`batch` gives it, without the batch dimension (its text
        unpadded unless ``data.pad_to_max``)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        sample = self.batch([index])
        return {key: value[0] for key, value in sample.items() if torch.is_tensor(value)}

    def batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor | bool]:
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
        # the tower's normalization (x / 255 - mean) / std as one multiply-add
        pixels.index_copy_(0, rows, crops.mul_(self._scale).add_(self._shift))
        depth = torch.zeros(len(idx) * slots, size, size)
        depth.index_copy_(0, rows, torch.from_numpy(self.depth_crops[source]).float())
        return {
            "input_ids": torch.from_numpy(self.input_ids[idx, :width]),
            "token_type_ids": torch.from_numpy(self.token_type_ids[idx, :width]),
            "attention_mask": torch.from_numpy(
                (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
            ),
            "marker_pos": torch.from_numpy(self.marker_positions[idx][:, self.opening_markers]),
            "object_slot": torch.from_numpy(self.object_slots[idx]),
            "pixel_values": pixels.view(len(idx), slots, 3, size, size),
            "depth_values": depth.view(len(idx), slots, size, size),
            "boxes": torch.from_numpy(self.boxes[images]),
            "num_objects": torch.from_numpy(self.num_objects[images]),
            "labels": torch.from_numpy(self.labels[idx]),
            "pair_kind": torch.from_numpy(self.pair_kinds[idx]),
            # Known here without reading a device: the model skips masks when nothing is padded.
            "text_padded": bool(lengths.min() < width),
        }

    # torch's DataLoader fetches a whole batch of indices through this, in one call
    __getitems__ = batch


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    *,
    sampler: torch.utils.data.Sampler[int] | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over (a subset of) a :class:`FeatureDataset` that fetches each batch with one
    ``__getitems__`` call; the order is the sampler's (in index order without one).
    ``pin_memory`` (for a GPU): page-locked batches, so copies to the device do not block."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=torch.utils.data.default_convert,  # the batch comes ready: passed on as it is
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
