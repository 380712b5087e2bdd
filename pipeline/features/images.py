"""Image features of one image: object slots, RGB crops, depth crops (the arrays a batch holds).

- Crops: a box maps to pixels by :func:`pipeline.data.images.box_to_pixels`, is cut with PIL and
  resized bicubic to ``S x S``.
- Depth: the map is min-max normalized to [0, 1] over the whole image (a flat map becomes zeros),
  then the same box, scaled by the map's own ``H, W``, is cut and resized nearest-neighbour (pixel
  centres, like PIL's NEAREST) to ``S x S``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.data.images import box_to_pixels, checked_box
from pipeline.data.records import object_slot
from pipeline.io import DataError

__all__ = ["object_layout", "crop_objects", "normalize_depth", "crop_depth"]


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
