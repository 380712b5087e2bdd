"""Images and boxes, one rule each for every stage: opening a file, checking a box, box to pixels.

A box is ``[x1, y1, x2, y2]`` in ``[0, 1]`` image coordinates. :func:`clip_box` is the one validity
rule (readers of source files, ``features`` and ``predict`` apply it), and :func:`box_to_pixels` the
one mapping to a pixel rectangle, so the captioner describes the crop the model sees.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from pipeline.io import DataError

__all__ = [
    "IMAGE_ERRORS",
    "BOX_TOLERANCE",
    "BOX_SHAPE",
    "BOX_RANGE",
    "open_image",
    "image_size",
    "image_problem",
    "box_numbers",
    "BoxUnits",
    "fits_unit_square",
    "box_units",
    "clip_box",
    "checked_box",
    "box_to_pixels",
]

# What PIL raises for missing, truncated, corrupt or oversized image files (a header beyond
# Image.MAX_IMAGE_PIXELS only warns up to twice that: here it is an error, in every stage).
IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
# Detector boxes may overshoot the border by rounding; beyond this share of a side it is an error.
BOX_TOLERANCE = 0.01
BOX_SHAPE = "expected 4 numbers x1, y1, x2, y2"
BOX_RANGE = "expected 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1"


def image_problem(exc: BaseException, path: Path) -> str:
    """The error without the path (PIL repeats it), so reports do not depend on where data lives."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    message = str(exc).replace(repr(str(path)), "").replace(str(path), "").strip(" :")
    return message or type(exc).__name__


@contextmanager
def _bombs_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def open_image(path: str | Path) -> Image.Image:
    """Decode an image as RGB; a missing, truncated, corrupt or oversized (decompression bomb)
    file raises ``path: problem``."""
    path = Path(path)
    try:
        with _bombs_are_errors(), Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except IMAGE_ERRORS as exc:
        raise DataError(f"{path}: {image_problem(exc, path)}") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file header only; an unreadable file raises ``path: problem``."""
    path = Path(path)
    try:
        with _bombs_are_errors(), Image.open(path) as image:
            return image.size
    except IMAGE_ERRORS as exc:
        raise DataError(f"{path}: {image_problem(exc, path)}") from exc


def box_numbers(values: Any) -> list[float] | None:
    """The four coordinates as floats, or None unless ``values`` is 4 finite real numbers."""
    if not (isinstance(values, list | tuple) and len(values) == 4):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return None
    coords = [float(v) for v in values]
    return coords if all(math.isfinite(v) for v in coords) else None


BoxUnits = Literal["pixel", "normalized"]


def fits_unit_square(coords: Sequence[float]) -> bool:
    """Every coordinate within ``[0, 1]`` up to :data:`BOX_TOLERANCE`."""
    return all(-BOX_TOLERANCE <= v <= 1 + BOX_TOLERANCE for v in coords)


def box_units(boxes: Iterable[Sequence[float]]) -> BoxUnits:
    """Whether a file's boxes are in pixels or in ``[0, 1]``, decided once for the whole file: by
    the majority of its boxes (a pixel box inside ``[0, 1.01]`` would be under two pixels; a
    normalized box beyond it is off the image), ``normalized`` for a file without boxes."""
    inside = outside = 0
    for coords in boxes:
        if fits_unit_square(coords):
            inside += 1
        else:
            outside += 1
    return "pixel" if outside > inside else "normalized"


def clip_box(coords: Sequence[float]) -> list[float] | None:
    """A ``[0, 1]`` box clipped to the image, or None when a side is empty or a coordinate lies
    more than :data:`BOX_TOLERANCE` outside ``[0, 1]``."""
    if not fits_unit_square(coords):
        return None
    # Sides are checked after clipping: a box wholly inside the tolerance band beyond an edge
    # (x1 = 1.002, x2 = 1.008) clips to an empty side.
    x1, y1, x2, y2 = clipped = [min(max(v, 0.0), 1.0) for v in coords]
    if x2 <= x1 or y2 <= y1:
        return None
    return clipped


def checked_box(values: Any, where: str) -> list[float]:
    """A ``[0, 1]`` box (clipped), or DataError ``where: malformed/bad box (found ..., expected ...)``."""
    coords = box_numbers(values)
    if coords is None:
        raise DataError(f"{where}: malformed box (found {values!r}, {BOX_SHAPE})")
    clipped = clip_box(coords)
    if clipped is None:
        raise DataError(f"{where}: bad box (found {values!r}, {BOX_RANGE})")
    return clipped


def box_to_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A [0, 1] box -> integer pixel box (left, top, right, bottom): ``x * W``, ``y * H`` rounded as
    PIL's ``crop`` rounds a float box (Python's ``round``, half to even; the original cropped with
    the float box), clamped to the image, at least one pixel wide and high."""

    def span(lo: float, hi: float, size: int) -> tuple[int, int]:
        a = min(max(round(lo * size), 0), size - 1)
        b = min(max(round(hi * size), a + 1), size)
        return a, b

    left, right = span(box[0], box[2], width)
    top, bottom = span(box[1], box[3], height)
    return left, top, right, bottom
