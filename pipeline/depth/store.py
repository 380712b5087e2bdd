"""The depth store: its on-disk format and its reader (imports no model code).

Layout of a store folder (the depth stage's output)::

    <store>/shard-00000.parquet   rows: image_id, height, width, scale, depth
    <store>/shard-00001.parquet   ...one shard per `depth.shard_size` images, sorted by image id
    <store>/skipped.json          images left out under data.on_error=skip: image_id, path, problem
    <store>/manifest.json         written last, once every shard is complete: model, params, count

Values: what the depth source gave, at its own resolution -- Depth-Anything's raw relative inverse
depth (larger = nearer, not normalized) at the model's output size, or a dataset's shipped map at
its size. Each map is stored as float16 of ``map / scale`` with ``scale`` a power of two at or above
the map's largest magnitude, so any magnitude keeps float16's 11 significant bits and the reader's
``float16 * scale`` is exact: ``get`` returns the raw values rounded to float16 precision.

Each row is its own Parquet row group, so ``get`` reads one image, not a whole shard. Each shard
carries JSON metadata (key ``remote.depth``): the run's settings fingerprint, a digest of its
inputs, and the images it skipped, so a rerun can tell a finished shard from a stale one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SKIPPED",
    "SCHEMA",
    "SHARD_META_KEY",
    "DepthStore",
    "shard_name",
    "encode_depth",
    "decode_depth",
    "store_rounding",
    "read_shard_info",
]

FORMAT = "remote-depth-store/1"
MANIFEST = "manifest.json"
SKIPPED = "skipped.json"
SHARD_META_KEY = b"remote.depth"

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("scale", pa.float32()),
        ("depth", pa.list_(pa.float16())),
    ]
)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def encode_depth(depth: np.ndarray) -> tuple[float, np.ndarray]:
    """``(scale, float16 values)`` with ``scale`` a power of two; ``values * scale`` ~ ``depth``."""
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"a depth map must be 2-D [H, W], found shape {depth.shape}")
    if not np.isfinite(depth).all():
        raise ValueError("depth map has NaN or infinite values")
    peak = float(np.abs(depth).max()) if depth.size else 0.0
    # frexp: peak = m * 2**e with 0.5 <= m < 1, so depth / 2**e lies in [-1, 1].
    scale = float(2.0 ** np.frexp(peak)[1]) if peak > 0 else 1.0
    return scale, (depth / np.float32(scale)).astype(np.float16)


def decode_depth(height: int, width: int, scale: float, values: np.ndarray) -> np.ndarray:
    return (values.astype(np.float32) * np.float32(scale)).reshape(height, width)


def store_rounding(depth: np.ndarray) -> np.ndarray:
    """The values a store returns for this map (float16 relative to a power of two)."""
    scale, values = encode_depth(depth)
    return decode_depth(*values.shape, scale, values)


def read_shard_info(path: Path) -> dict[str, Any] | None:
    """A shard's metadata from its footer; None when the file is missing or not a readable shard."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[SHARD_META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


class DepthStore:
    """Read access to a finished depth store: ``get(image_id)`` -> float32 ``[H, W]``.

    The index (image id -> shard, row group) is built once from the shards' ``image_id`` columns;
    maps are read on demand, one row group each. Safe to pickle into data-loader workers.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.path}: not a finished depth store (no {MANIFEST}); run the depth stage, "
                "or rerun it without --shard to finish a sharded run"
            )
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format")
            raise ValueError(f"{manifest_path}: expected format {FORMAT!r}, found {found!r}")
        self._index: dict[str, tuple[str, int, int]] = {}
        for entry in self.manifest["shards"]:
            self._index_shard(entry["file"])
        if len(self._index) != self.manifest["count"]:
            raise ValueError(
                f"{manifest_path}: lists {self.manifest['count']} images but the shards hold "
                f"{len(self._index)}"
            )
        self._files: dict[str, pq.ParquetFile] = {}

    def _index_shard(self, name: str) -> None:
        shard = pq.ParquetFile(self.path / name)
        ids = shard.read(columns=["image_id"]).column(0).to_pylist()
        row = 0
        for group in range(shard.metadata.num_row_groups):
            for offset in range(shard.metadata.row_group(group).num_rows):
                image_id = ids[row]
                if image_id in self._index:
                    raise ValueError(f"{self.path}: image {image_id!r} appears twice ({name})")
                self._index[image_id] = (name, group, offset)
                row += 1

    def _file(self, name: str) -> pq.ParquetFile:
        if name not in self._files:
            self._files[name] = pq.ParquetFile(self.path / name, memory_map=True)
        return self._files[name]

    def get(self, image_id: str) -> np.ndarray:
        """The depth map of one image, float32 ``[H, W]``, larger = nearer."""
        try:
            name, group, offset = self._index[image_id]
        except KeyError:
            raise KeyError(
                f"image {image_id!r} is not in depth store {self.path} ({len(self)} images"
                f"{'; see skipped.json' if self.manifest.get('skipped') else ''})"
            ) from None
        rows = self._file(name).read_row_group(group, columns=["height", "width", "scale", "depth"])
        values = rows.column("depth")[offset].values.to_numpy(zero_copy_only=False)
        return decode_depth(
            rows.column("height")[offset].as_py(),
            rows.column("width")[offset].as_py(),
            rows.column("scale")[offset].as_py(),
            values,
        )

    def ids(self) -> list[str]:
        return sorted(self._index)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """Images the depth stage left out (data.on_error=skip): image_id, path, problem."""
        return json.loads((self.path / SKIPPED).read_text())

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return (
            f"DepthStore({str(self.path)!r}, images={len(self)}, model={self.manifest['model']!r})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles do not cross process boundaries; each worker reopens on demand.
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
