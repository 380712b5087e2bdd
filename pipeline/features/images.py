"""Image features of one image: object slots, RGB crops, depth crops (the arrays a batch holds).

- RGB crops (``features.crop_resize``): a box maps to pixels by
  :func:`pipeline.data.images.box_to_pixels` and is cut with PIL; ``clip`` (the original's CLIP
  feature extractor at size and crop size ``S``) resizes it bicubic so its **short** side is ``S``
  (the long side ``int(S * long / short)``) and keeps the centre ``S x S`` (offsets
  ``(h - S) // 2``, ``(w - S) // 2``); ``stretch`` resizes the whole crop to ``S x S``.
- Depth crops (``features.depth_scale``): ``raw`` keeps the depth model's values (the original),
  ``minmax`` scales each map to [0, 1] first (a flat map becomes zeros). The map is read as the
  original upsampled it to the image's own ``H x W`` (bilinear, ``align_corners=True``); the box is
  cut as rows ``int(H y1):int(H y2)``, columns ``int(W x1):int(W x2)`` (at least one pixel) and
  resized nearest-neighbour to ``S x S`` with source index ``floor(i * extent / S)``. Only the
  ``S x S`` sampled pixels are interpolated, never the whole upsampled map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.data.images import box_to_pixels, checked_box
from pipeline.data.records import object_slot
from pipeline.io import DataError

__all__ = [
    "object_layout",
    "resize_crop",
    "crop_objects",
    "normalize_depth",
    "check_depth_map",
    "crop_depth",
]


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
        boxes[slot] = checked_box(box, f"objects.json: image {image_id!r} {name}")
        mask[slot] = True
    return boxes, mask


def resize_crop(crop: Image.Image, size: int, mode: str) -> Image.Image:
    """One RGB crop to ``size x size``: ``clip`` (short side to ``size``, centre crop) or
    ``stretch``; both bicubic."""
    if mode == "stretch":
        return crop.resize((size, size), Image.Resampling.BICUBIC)
    if mode != "clip":
        raise ValueError(f"features.crop_resize {mode!r}: expected 'clip' or 'stretch'")
    width, height = crop.size
    short, long = (width, height) if width <= height else (height, width)
    resized_long = int(size * long / short)
    new_size = (size, resized_long) if width <= height else (resized_long, size)
    if new_size != crop.size:
        crop = crop.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (crop.width - size) // 2, (crop.height - size) // 2
    return crop.crop((left, top, left + size, top + size))


def crop_objects(
    image: Image.Image, boxes: np.ndarray, mask: np.ndarray, size: int, mode: str
) -> np.ndarray:
    """RGB crops of the occupied slots, resized by :func:`resize_crop`: uint8 ``[P, 3, size, size]``."""
    image = image.convert("RGB")
    crops = np.zeros((len(boxes), 3, size, size), dtype=np.uint8)
    for slot in np.flatnonzero(mask):
        pixels = box_to_pixels(boxes[slot], image.width, image.height)
        crops[slot] = np.asarray(resize_crop(image.crop(pixels), size, mode)).transpose(2, 0, 1)
    return crops


def check_depth_map(depth_map: np.ndarray, image_id: str = "?") -> np.ndarray:
    """The map as float32 ``[h, w]``; a DataError naming the image if it is not a finite 2-D map."""
    depth_map = np.asarray(depth_map, dtype=np.float32)
    if depth_map.ndim != 2 or depth_map.size == 0:
        raise DataError(f"depth map of {image_id!r}: expected [H, W], found {depth_map.shape}")
    if not np.isfinite(depth_map).all():
        raise DataError(f"depth map of {image_id!r}: has NaN or infinite values")
    return depth_map


def normalize_depth(depth_map: np.ndarray, image_id: str = "?") -> np.ndarray:
    """Min-max normalize a depth map to [0, 1] (float32); a flat map becomes zeros."""
    depth_map = check_depth_map(depth_map, image_id)
    low, high = float(depth_map.min()), float(depth_map.max())
    if high <= low:
        return np.zeros_like(depth_map)
    return ((depth_map - low) / (high - low)).astype(np.float32)


def _cut(lo: float, hi: float, size: int, out: int) -> np.ndarray:
    """Pixel indices of ``int(size * lo):int(size * hi)`` (at least one pixel, inside the image)
    resized nearest to ``out``: ``start + floor(i * extent / out)``."""
    start = min(int(size * lo), size - 1)
    extent = max(min(int(size * hi), size) - start, 1)
    return start + (np.arange(out) * extent) // out


def _align_corners(index: np.ndarray, target: int, source: int) -> tuple[np.ndarray, ...]:
    """For pixels ``index`` of a ``target``-long axis bilinearly upsampled (``align_corners=True``)
    from a ``source``-long one: the two source pixels and the weight of the second."""
    position = index * ((source - 1) / (target - 1)) if target > 1 else np.zeros(len(index))
    low = np.minimum(np.floor(position).astype(np.int64), source - 1)
    high = np.minimum(low + 1, source - 1)
    return low, high, (position - low).astype(np.float32)


def crop_depth(
    depth_map: np.ndarray,
    boxes: np.ndarray,
    mask: np.ndarray,
    size: int,
    image_size: tuple[int, int],
) -> np.ndarray:
    """Each occupied slot's box cut from ``depth_map`` read at the image's ``(width, height)``
    ``image_size``, as the module docstring says: float32 ``[P, size, size]``."""
    width, height = image_size
    map_height, map_width = depth_map.shape
    crops = np.zeros((len(boxes), size, size), dtype=np.float32)
    for slot in np.flatnonzero(mask):
        x1, y1, x2, y2 = boxes[slot]
        top, bottom, wy = _align_corners(_cut(y1, y2, height, size), height, map_height)
        left, right, wx = _align_corners(_cut(x1, x2, width, size), width, map_width)
        wy, wx = wy[:, None], wx[None, :]
        upper = depth_map[np.ix_(top, left)] * (1 - wx) + depth_map[np.ix_(top, right)] * wx
        lower = depth_map[np.ix_(bottom, left)] * (1 - wx) + depth_map[np.ix_(bottom, right)] * wx
        crops[slot] = upper * (1 - wy) + lower * wy
    return crops
