"""pipeline.data.images: the one box check and box -> pixels rule, and image opening."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from pipeline.data.images import (
    BOX_TOLERANCE,
    box_numbers,
    box_units,
    checked_box,
    clip_box,
    image_problem,
    image_size,
    open_image,
)
from pipeline.io import DataError


def test_box_numbers_accepts_four_finite_reals_only():
    assert box_numbers([0, 0.5, 1, 1]) == [0.0, 0.5, 1.0, 1.0]
    assert box_numbers((0.1, 0.2, 0.3, 0.4)) == [0.1, 0.2, 0.3, 0.4]
    for bad in ([0, 0, 1], [0, 0, 1, 1, 1], [0, 0, True, 1], [0, 0, "1", 1], [0, 0, math.nan, 1],
                [0, 0, math.inf, 1], "0 0 1 1", None):  # fmt: skip
        assert box_numbers(bad) is None, bad


def test_clip_box_tolerates_one_percent_and_clips_it():
    assert clip_box([0.1, 0.2, 0.6, 0.9]) == [0.1, 0.2, 0.6, 0.9]
    edge = 1 + BOX_TOLERANCE
    assert clip_box([-0.01, 0.0, edge, 1.005]) == [0.0, 0.0, 1.0, 1.0]
    assert clip_box([0.0, 0.0, edge + 1e-6, 1.0]) is None
    assert clip_box([0.5, 0.1, 0.2, 0.9]) is None  # x2 < x1
    assert clip_box([0.1, 0.3, 0.2, 0.3]) is None  # empty height


def test_clip_box_refuses_a_zero_width_or_height_and_overshoot_beyond_one_percent():
    assert clip_box([0.3, 0.1, 0.3, 0.9]) is None  # x2 == x1: an empty side
    assert clip_box([0.1, 0.4, 0.9, 0.4]) is None  # y2 == y1
    # The tolerance is 1% of a side, written out (not read from BOX_TOLERANCE).
    assert clip_box([0.0, -0.0099, 1.0099, 1.0]) == [0.0, 0.0, 1.0, 1.0]
    assert clip_box([0.0, 0.0, 1.011, 1.0]) is None
    assert clip_box([-0.011, 0.0, 0.5, 1.0]) is None
    # A box wholly in the tolerance band beyond an edge clips to an empty side.
    assert clip_box([1.002, 0.0, 1.008, 1.0]) is None
    assert clip_box([0.1, -0.009, 0.9, -0.001]) is None


def test_box_units_follow_the_majority_and_an_empty_file_is_normalized():
    pixel, unit = [10, 20, 120, 90], [0.1, 0.2, 0.6, 0.9]
    assert box_units([]) == "normalized"
    assert box_units([pixel, pixel, unit]) == "pixel"
    assert box_units([pixel, unit, unit]) == "normalized"
    assert box_units([[0, 0, 1, 1], [0.5, 0.5, 1.01, 1.0]]) == "normalized"


def test_checked_box_names_where_and_what(tmp_path):
    assert checked_box([0, 0, 1.004, 0.9], "f:3: head.box") == [0.0, 0.0, 1.0, 0.9]
    with pytest.raises(
        DataError, match=r"^f:3: head.box: malformed box \(found \[0, 1\], expected 4"
    ):
        checked_box([0, 1], "f:3: head.box")
    with pytest.raises(
        DataError, match=r"^f:3: t: bad box \(found \[0.1, 0.1, 1.5, 0.5\], expected 0 <="
    ):
        checked_box([0.1, 0.1, 1.5, 0.5], "f:3: t")


def test_open_image_decodes_rgb_and_names_the_file(tmp_path):
    Image.new("L", (5, 3), 77).save(tmp_path / "grey.png")
    image = open_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (77, 77, 77)
    assert image_size(tmp_path / "grey.png") == (5, 3)
    (tmp_path / "text.png").write_text("not an image")
    data = (tmp_path / "grey.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("text.png", "cut.png", "missing.png"):
        with pytest.raises(DataError, match=rf"{name}: "):
            open_image(tmp_path / name)
    # The problem is said once, without the path PIL repeats in it, so reports do not depend on
    # where the data lives.
    for name, problem in (
        ("text.png", "cannot identify image file"),
        ("missing.png", "file not found"),
    ):
        for read in (open_image, image_size):
            with pytest.raises(DataError) as error:
                read(tmp_path / name)
            assert str(error.value) == f"{tmp_path / name}: {problem}"


def test_image_problem_is_the_error_type_when_the_message_is_only_the_path(tmp_path):
    path = tmp_path / "x.png"
    assert image_problem(OSError(str(path)), path) == "OSError"
    assert image_problem(SyntaxError(f"{path!s}: "), path) == "SyntaxError"
    assert image_problem(ValueError(f"bad header in {str(path)!r}"), path) == "bad header in"


@pytest.mark.parametrize("size", [(20000, 20000), (12000, 11000)])  # above 2x, and 1x..2x the limit
def test_decompression_bombs_are_errors_naming_the_file(tmp_path, size):
    from test_download import bomb_png

    from pipeline.data.images import image_size, open_image

    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(*size))
    for read in (open_image, image_size):  # every stage reads images through these two
        with pytest.raises(DataError, match=rf"^{path}: .*exceeds limit"):
            read(path)
