"""Depth stage: a map per image, batching, resume after SIGKILL, sharding, bad input, loading."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.config import DepthParams, default_params
from pipeline.data.records import Dataset, Entity, Record, write_dataset
from pipeline.data.synthetic import generate_synthetic
from pipeline.depth.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_tensor,
    infer_depth,
    input_settings,
    input_size,
    load_depth_model,
    predict_depth,
    prepare_batch,
    tiny_depth_model,
)
from pipeline.depth.run import load_shipped_depth, run_depth
from pipeline.depth.store import (
    MANIFEST,
    DepthStore,
    decode_depth,
    encode_depth,
    read_shard_info,
)
from pipeline.io import DataError

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = default_params()
F16_EPS = 2.0**-11  # float16 relative rounding bound (10 stored mantissa bits)

# (height, width, format, depth magnitude): non-square, both orientations, PNG and JPEG, and shipped
# maps far outside float16's plain range (1e5 overflows it, 1e-7 is subnormal there).
IMAGES = [
    (96, 128, "jpg", 1.0),
    (96, 128, "png", 3.0),
    (80, 100, "png", 1e5),
    (120, 60, "jpg", 1e-7),
    (64, 64, "png", 2.0),
    (96, 128, "jpg", 0.5),
    (70, 140, "png", 10.0),
    (96, 128, "png", 1.5),
]


def make_dataset(root: Path) -> Dataset:
    """A normalized dataset of non-square images with shipped depth maps."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "depth").mkdir()
    records = []
    for i, (h, w, fmt, magnitude) in enumerate(IMAGES):
        image_id = f"img_{i:02d}.{fmt}"
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 255, (h, w))], -1)
        Image.fromarray(pixels.astype(np.uint8)).save(root / "images" / image_id, quality=90)
        depth = magnitude * (1 + yy / h + rng.random((h, w)) * 0.1)
        np.save(root / "depth" / f"img_{i:02d}.npy", depth.astype(np.float32))
        text = Entity("text", "a", (0, 1))
        split = ("train", "valid", "test")[i % 3]
        records.append((split, Record(f"r{i}", ("a", "b"), image_id, text, text, "none")))
    splits = {s: [r for sp, r in records if sp == s] for s in ("train", "valid", "test")}
    write_dataset(root, splits, {}, ["none"], source="test", version="1")
    return Dataset(root)


def params(**overrides) -> DepthParams:
    base = {"source": "model", "model": "tiny", "batch_size": 4, "dtype": "float32"}
    return replace(DEFAULTS.depth, **(base | {"shard_size": 3} | overrides))


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    return make_dataset(tmp_path_factory.mktemp("ds") / "mixed")


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted, unsharded run with the tiny model: 8 images in 3 shards."""
    out = tmp_path_factory.mktemp("ref") / "depth"
    result = run_depth(dataset, out, params(), on_error="raise")
    assert result.complete and result.shards_computed == [0, 1, 2]
    return out


def test_every_image_has_raw_model_depth_with_its_aspect(dataset, reference):
    store = DepthStore(reference)
    assert store.ids() == dataset.image_ids() and len(store) == len(IMAGES)
    model = tiny_depth_model()
    assert input_settings(model) == (56, 14)  # the tiny backbone's image and patch sizes
    for image_id in dataset.image_ids():
        image = Image.open(dataset.image_path(image_id)).convert("RGB")
        depth = store.get(image_id)
        h, w = depth.shape
        height, width = image.height, image.width
        # Aspect kept, both sides at least 56 (short side exactly 56 here), multiples of 14.
        short, long_ = sorted((height, width))
        assert min(h, w) == 56 and max(h, w) == round(56 * long_ / short / 14) * 14
        assert (h >= w) == (height >= width)
        assert abs(h * width - w * height) <= 7 * (height + width)
        # Stored values are the model's raw output, within float16 rounding.
        (direct,) = predict_depth(model, [image], batch_size=1, dtype="float32")
        assert depth.dtype == np.float32 and np.abs(direct).max() > 0
        np.testing.assert_allclose(depth, direct, rtol=0, atol=np.abs(direct).max() * F16_EPS)
    assert store.manifest["model"] == "tiny" and store.manifest["count"] == len(IMAGES)
    assert store.skipped == [] and store.manifest["skipped"] == 0


def test_batched_equals_one_at_a_time_and_batches_never_mix_sizes(dataset):
    model = tiny_depth_model()
    images = [Image.open(dataset.image_path(i)).convert("RGB") for i in dataset.image_ids()]
    batches: list[int] = []
    pixels = [image_tensor(image) for image in images]
    batched = infer_depth(model, pixels, batch_size=3, dtype="float32", on_batch=batches.append)
    single = infer_depth(model, pixels, batch_size=1, dtype="float32")
    for a, b in zip(batched, single, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    # Input sizes: 56x70 (four 96x128 images and the 80x100), 112x56, 56x56, 56x112.
    assert sorted(batches) == [1, 1, 1, 2, 3]


def original_input_size(width, height, lower_bound=518, multiple=14):
    """Depth-Anything-V2's Resize(keep_aspect_ratio, ensure_multiple_of, "lower_bound"), as its
    infer_image runs it, written out with numpy."""
    scale = max(lower_bound / height, lower_bound / width)

    def constrain(x):
        y = int(np.round(x / multiple) * multiple)
        return int(np.ceil(x / multiple) * multiple) if y < lower_bound else y

    return constrain(scale * width), constrain(scale * height)


@pytest.mark.parametrize(
    "width, height, before_rounding, expected",
    [
        (600, 400, (777.0, 518.0), (784, 518)),  # 777 / 14 = 55.5 rounds to even: 56
        (400, 600, (518.0, 777.0), (518, 784)),
        (640, 480, (690.67, 518.0), (686, 518)),
        (518, 518, (518.0, 518.0), (518, 518)),
        (100, 1000, (518.0, 5180.0), (518, 5180)),
        (1920, 1080, (920.89, 518.0), (924, 518)),
        (300, 301, (518.0, 519.73), (518, 518)),  # 519.7 / 14 rounds down to 518: kept (>= 518)
        (1000, 530, (977.36, 518.0), (980, 518)),
        # 763 / 14 = 54.5 exactly: numpy rounds half to even (54 -> 756), not up (55 -> 770).
        (763, 518, (763.0, 518.0), (756, 518)),
        (1036, 700, (766.64, 518.0), (770, 518)),  # 54.76 -> 55
    ],
)
def test_depth_input_keeps_aspect_with_both_sides_at_least_518(
    width, height, before_rounding, expected
):
    scale = max(518 / height, 518 / width)
    np.testing.assert_allclose((scale * width, scale * height), before_rounding, atol=0.01)
    assert input_size(width, height, 518, 14) == original_input_size(width, height) == expected
    # Not transformers' DPTImageProcessor rule (the scale closest to 1: 600x400 -> 518x345).
    assert min(expected) >= 518


@pytest.mark.parametrize("width, height", [(20, 20), (30, 21), (21, 40), (50, 20)])
def test_depth_input_rounds_up_where_rounding_falls_below_the_lower_bound(width, height):
    # A lower bound that is not a multiple (20 with 14): 20 rounds to 14 < 20, so it goes up to 28.
    assert input_size(width, height, 20, 14) == original_input_size(width, height, 20, 14)
    assert min(input_size(width, height, 20, 14)) == 28


def test_depth_input_resize_and_normalize_on_the_device():
    # A flat colour survives bicubic resizing exactly: the output is ((c / 255) - mean) / std.
    colour = np.array([200, 30, 90], dtype=np.uint8)
    image = torch.from_numpy(np.broadcast_to(colour, (40, 60, 3)).copy()).permute(2, 0, 1)
    batch = prepare_batch([image, image], 518, 14, torch.device("cpu"))
    assert batch.shape == (2, 3, 518, 784)  # 60x40 -> 777x518 -> 784x518
    # ImageNet's mean and std, RGB order, as Depth-Anything-V2's infer_image normalizes.
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)
    expected = (colour / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(batch.mean(dim=(0, 2, 3)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(batch.std(dim=(0, 2, 3)).numpy(), 0, atol=1e-5)
    # A gradient: bicubic (Keys a = -0.75, no antialiasing) as torch computes it on [0, 1] values.
    ramp = torch.arange(60, dtype=torch.uint8).repeat(3, 40, 1)
    got = prepare_batch([ramp], 518, 14, torch.device("cpu"))[0]
    reference = torch.nn.functional.interpolate(
        ramp[None].float() / 255, size=(518, 784), mode="bicubic", align_corners=False
    )[0]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(got, (reference - mean) / std)


def test_depth_input_shrinks_a_large_image_bicubic_without_antialiasing():
    # 1120 x 700 -> 828.8 x 518 -> 826 x 518: a downscale, where antialiasing would differ
    # (OpenCV's INTER_CUBIC, which the original resized with, has none).
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 700, 1120), dtype=np.uint8))
    got = prepare_batch([image], 518, 14, torch.device("cpu"))[0]
    reference = torch.nn.functional.interpolate(
        image[None].float() / 255, size=(518, 826), mode="bicubic", align_corners=False
    )[0]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(got, (reference - mean) / std)


def test_depth_runs_under_the_autocast_its_dtype_asks_for(monkeypatch):
    import contextlib

    from pipeline.depth import model as depth_model

    asked = []

    @contextlib.contextmanager
    def recording(device, dtype):
        asked.append((device.type, dtype))
        yield

    monkeypatch.setattr(depth_model, "autocast", recording)
    images = [torch.zeros(3, 20, 30, dtype=torch.uint8), torch.zeros(3, 30, 20, dtype=torch.uint8)]
    infer_depth(tiny_depth_model(), images, batch_size=4, dtype="bfloat16")
    assert asked == [("cpu", "bfloat16"), ("cpu", "bfloat16")]  # two input sizes, two batches


def test_image_tensor_is_the_rgb_conversion_channels_first():
    # Depth-Anything reads three channels: a grey or RGBA image goes in as PIL converts it.
    rng = np.random.default_rng(4)
    rgba = Image.fromarray(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8), "L")
    for image in (rgba, grey):
        got = image_tensor(image)
        assert got.dtype == torch.uint8 and got.shape == (3, 5, 7)
        expected = np.asarray(image.convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(got.numpy(), expected)


def test_input_settings_are_the_backbones_image_and_patch_sizes():
    from types import SimpleNamespace

    from transformers import DepthAnythingConfig, Dinov2Config

    # Depth-Anything-V2-Large's: 518 and 14 (not the tiny model's 56 = 4 x 14).
    config = DepthAnythingConfig(backbone_config=Dinov2Config(image_size=518, patch_size=14))
    assert input_settings(SimpleNamespace(config=config)) == (518, 14)


def test_store_reader_contract(dataset, reference, tmp_path):
    store = DepthStore(reference)
    assert "img_00.jpg" in store and "nope.jpg" not in store
    assert all(image_id in store for image_id in dataset.image_ids())
    # Each image is its own row group, so get() reads one map, not a whole shard.
    for shard in sorted(reference.glob("shard-*.parquet")):
        meta = pq.ParquetFile(shard).metadata
        assert meta.num_row_groups == meta.num_rows > 0
    with pytest.raises(KeyError, match=rf"'nope.jpg'.*{reference}"):
        store.get("nope.jpg")
    first = store.get("img_03.jpg")
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.get("img_03.jpg"), first)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        DepthStore(tmp_path)


def test_encoding_keeps_float16_precision_at_any_magnitude():
    rng = np.random.default_rng(1)
    for magnitude in (1e-9, 1e-7, 1.0, 7e4, 1e9):
        depth = (rng.random((5, 7)) * magnitude).astype(np.float32)
        scale, values = encode_depth(depth)
        assert np.log2(scale) == int(np.log2(scale)) and np.abs(values).max() <= 1
        # frexp's exponent: the peak lies in [scale / 2, scale), float16's top binade.
        assert scale / 2 <= np.abs(depth).max() < scale
        back = decode_depth(5, 7, scale, values)
        np.testing.assert_allclose(back, depth, rtol=F16_EPS, atol=magnitude * 2.0**-24)
        # Negative values (a shipped map may have them): the scale follows the largest magnitude.
        for signed in (-depth, depth - 0.75 * magnitude):
            scale, values = encode_depth(signed)
            assert scale >= np.abs(signed).max() and np.abs(values).max() <= 1
            back = decode_depth(5, 7, scale, values)
            np.testing.assert_allclose(back, signed, rtol=F16_EPS, atol=magnitude * 2.0**-24)
    scale, values = encode_depth(np.zeros((2, 3), np.float32))  # an all-zero map stays zeros
    assert scale == 1.0 and np.array_equal(decode_depth(2, 3, scale, values), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_depth(np.array([[1.0, np.nan]]))
    assert encode_depth(np.array([[3.0, -1.0]]))[0] == 4.0
    assert encode_depth(np.array([[4.0]]))[0] == 8.0 and encode_depth(np.array([[0.3]]))[0] == 0.5
    with pytest.raises(ValueError, match=r"must be 2-D \[H, W\], found shape \(1, 2, 3\)"):
        encode_depth(np.zeros((1, 2, 3), np.float32))


def test_dataset_source_reproduces_shipped_maps(dataset, tmp_path):
    result = run_depth(
        dataset, tmp_path / "depth", params(source="dataset", model="unused"), on_error="raise"
    )
    store = DepthStore(tmp_path / "depth")
    assert result.complete and store.manifest["model"] == "dataset"
    for image_id in dataset.image_ids():
        shipped = np.load(dataset.depth_path(image_id))
        np.testing.assert_allclose(store.get(image_id), shipped, rtol=F16_EPS, atol=0)

    # A damaged shipped map follows data.on_error like a damaged image.
    shutil.copytree(dataset.root, tmp_path / "ds")
    damaged = Dataset(tmp_path / "ds")
    damaged.depth_path("img_05.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{damaged.depth_path('img_05.jpg')}: "):
        run_depth(damaged, tmp_path / "d2", params(source="dataset"), on_error="raise")
    run_depth(damaged, tmp_path / "d2", params(source="dataset"), on_error="skip")
    assert [s["path"] for s in DepthStore(tmp_path / "d2").skipped] == ["depth/img_05.npy"]


def test_a_replaced_input_of_the_same_size_redoes_its_shard_only(dataset, tmp_path):
    # A regenerated dataset keeps its image ids, and its .npy maps keep their byte sizes: only the
    # content tells the new inputs from the old.
    shutil.copytree(dataset.root, tmp_path / "ds")
    copy = Dataset(tmp_path / "ds")
    out, source = tmp_path / "depth", params(source="dataset", model="unused")
    assert run_depth(copy, out, source, on_error="raise").shards_computed == [0, 1, 2]
    path = copy.depth_path("img_04.png")  # the 5th image: shard 1 of 3
    old = np.load(path)
    new = (old[::-1] * 3.0).copy()
    size = path.stat().st_size
    np.save(path, new)
    assert path.stat().st_size == size
    result = run_depth(copy, out, source, on_error="raise")
    assert result.complete and result.shards_computed == [1]
    np.testing.assert_allclose(DepthStore(out).get("img_04.png"), new, rtol=F16_EPS, atol=0)


def test_dataset_source_without_shipped_maps_says_to_use_the_model(dataset, tmp_path):
    shutil.copytree(dataset.root, tmp_path / "ds")
    shutil.rmtree(tmp_path / "ds" / "depth")  # as UMRE, MNRE and local datasets are
    bare = Dataset(tmp_path / "ds")
    message = rf"^{bare.depth_dir}: not found: .* ships none; set depth.source: model "
    with pytest.raises(DataError, match=message):
        run_depth(bare, tmp_path / "d", params(source="dataset"), on_error="raise")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_a_shipped_map_must_be_a_2d_float_array_and_comes_back_float32(tmp_path):
    for name, array in [("cube", np.zeros((2, 3, 4), np.float32)), ("ints", np.ones((2, 3), int))]:
        np.save(tmp_path / f"{name}.npy", array)
        found = f"found {array.dtype} {array.shape}"
        message = rf"^{re.escape(str(tmp_path / name))}\.npy: expected a 2-D float depth map, "
        with pytest.raises(DataError, match=message + re.escape(found) + "$"):
            load_shipped_depth(tmp_path / f"{name}.npy")
    np.save(tmp_path / "f64.npy", np.array([[0.1, 2.0], [-3.0, 1e5]]))
    got = load_shipped_depth(tmp_path / "f64.npy")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([[0.1, 2.0], [-3.0, 1e5]], dtype=np.float32))


def test_synthetic_dataset_every_image(tmp_path):
    synthetic = replace(DEFAULTS.data.synthetic, seed=5, train=6, valid=3, test=3, image_size=48)
    generate_synthetic(tmp_path / "syn", synthetic, max_objects=4)
    ds = Dataset(tmp_path / "syn")
    shipped = run_depth(
        ds, tmp_path / "shipped", params(source="dataset", shard_size=4), on_error="raise"
    )
    modelled = run_depth(ds, tmp_path / "model", params(shard_size=4), on_error="raise")
    assert shipped.complete and modelled.complete
    ids = ds.image_ids()
    assert DepthStore(tmp_path / "shipped").ids() == DepthStore(tmp_path / "model").ids() == ids
    for image_id in ids:
        truth = np.load(ds.depth_path(image_id))
        got = DepthStore(tmp_path / "shipped").get(image_id)
        np.testing.assert_allclose(got, truth, rtol=F16_EPS, atol=0)
        assert DepthStore(tmp_path / "model").get(image_id).shape == (56, 56)  # square images


KILL_SCRIPT = """
import os, signal, sys
import torch
from pipeline.data.records import Dataset
from pipeline.depth.run import run_depth
from tests.test_depth import params

def die(index):
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)

torch.set_num_threads(1)
run_depth(Dataset(sys.argv[1]), sys.argv[2], params(), on_shard_written=die, on_error="raise")
"""


def test_sigkill_then_rerun_finishes_only_the_rest_byte_identically(dataset, reference, tmp_path):
    out = tmp_path / "depth"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(dataset.root), str(out)],
        cwd=ROOT,
        capture_output=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.parquet", "shard-00001.parquet"]
    with pytest.raises(FileNotFoundError, match="not a finished depth store"):
        DepthStore(out)
    # Leftovers of a kill during a write: a half-written temp file, and (as if copied by hand)
    # a truncated shard under its final name. Neither may be trusted.
    (out / ".shard-00002.parquet.tmp").write_bytes(b"PAR1 half")
    shard1 = (out / "shard-00001.parquet").read_bytes()
    (out / "shard-00001.parquet").write_bytes(shard1[: len(shard1) // 2])

    result = run_depth(dataset, out, params(), on_error="raise")
    assert result.complete and result.shards_computed == [1, 2]
    assert result.images_computed == len(IMAGES) - 3
    assert store_bytes(out) == store_bytes(reference)
    # A rerun of a finished store computes nothing and changes nothing.
    again = run_depth(dataset, out, params(), on_error="raise")
    assert again.shards_computed == [] and store_bytes(out) == store_bytes(reference)


def test_a_parquet_file_without_shard_metadata_is_recomputed(dataset, reference, tmp_path):
    out = tmp_path / "depth"
    shutil.copytree(reference, out)
    pq.write_table(pa.table({"image_id": ["img_03.jpg"]}), out / "shard-00001.parquet")
    assert read_shard_info(out / "shard-00001.parquet") is None
    assert read_shard_info(out / "shard-00009.parquet") is None  # missing
    result = run_depth(dataset, out, params(), on_error="raise")
    assert result.shards_computed == [1] and store_bytes(out) == store_bytes(reference)


def test_other_settings_start_over(dataset, reference, tmp_path):
    out = tmp_path / "depth"
    shutil.copytree(reference, out)
    (out / "shard-00002.parquet").unlink()  # an unfinished store made with the tiny model...
    (out / MANIFEST).unlink()
    result = run_depth(
        dataset, out, params(source="dataset"), on_error="raise"
    )  # ...then resumed with the dataset
    assert result.shards_computed == [0, 1, 2]
    store = DepthStore(out)
    assert store.manifest["source"] == "dataset"
    np.testing.assert_allclose(
        store.get("img_00.jpg"), np.load(dataset.depth_path("img_00.jpg")), rtol=F16_EPS
    )
    # A different dtype or shard size is another run too; the finished store is redone.
    assert run_depth(dataset, out, params(dtype="bfloat16"), on_error="raise").shards_computed == [
        0,
        1,
        2,
    ]
    two = run_depth(dataset, out, params(shard_size=5), on_error="raise")
    assert two.shards_computed == [0, 1] and sorted(p.name for p in out.glob("shard-*")) == [
        "shard-00000.parquet",
        "shard-00001.parquet",
    ]
    assert DepthStore(out).ids() == dataset.image_ids()
    # Batch size is a speed knob only: it keeps the shards.
    assert (
        run_depth(
            dataset, out, params(shard_size=5, batch_size=1, dtype="float32"), on_error="raise"
        ).shards_computed
        == []
    )


def test_another_depth_model_or_dtype_redoes_a_model_store_only(dataset, reference, tmp_path):
    out = tmp_path / "depth"
    shutil.copytree(reference, out)
    folder = tmp_path / "tiny-seed-1"
    tiny_depth_model(seed=1).save_pretrained(folder)
    other = run_depth(dataset, out, params(model=str(folder)), on_error="raise")
    assert other.shards_computed == [0, 1, 2]
    image = Image.open(dataset.image_path("img_00.jpg")).convert("RGB")
    (direct,) = predict_depth(load_depth_model(str(folder)), [image], batch_size=1, dtype="float32")
    got = DepthStore(out).get("img_00.jpg")
    np.testing.assert_allclose(got, direct, rtol=0, atol=np.abs(direct).max() * F16_EPS)
    assert not np.allclose(got, DepthStore(reference).get("img_00.jpg"))
    # The dtype asked for is part of a model store's settings (a GPU run would differ).
    bf16 = run_depth(dataset, out, params(model=str(folder), dtype="bfloat16"), on_error="raise")
    assert bf16.shards_computed == [0, 1, 2]
    # Shipped maps do not depend on the depth model or dtype: their store is kept.
    shipped = tmp_path / "shipped"
    run_depth(dataset, shipped, params(source="dataset"), on_error="raise")
    again = params(source="dataset", model=str(folder), dtype="bfloat16")
    assert run_depth(dataset, shipped, again, on_error="raise").shards_computed == []


def test_two_workers_equal_one(dataset, reference, tmp_path):
    out = tmp_path / "depth"
    first = run_depth(dataset, out, params(), shard=0, num_shards=2, on_error="raise")
    assert first.shards_computed == [0, 2] and not first.complete
    assert not (out / MANIFEST).exists()
    second = run_depth(dataset, out, params(), shard=1, num_shards=2, on_error="raise")
    assert second.shards_computed == [1] and second.complete
    assert store_bytes(out) == store_bytes(reference)


def test_a_worker_outside_the_shards_or_an_empty_size_is_refused(dataset, tmp_path):
    out = tmp_path / "depth"
    for shard, num_shards in [(2, 2), (-1, 2)]:
        with pytest.raises(ValueError, match=rf"^shard must be in \[0, 2\), found {shard}$"):
            run_depth(dataset, out, params(source="dataset"), "raise", shard, num_shards)
    for size in ({"shard_size": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            run_depth(dataset, out, params(source="dataset", **size), on_error="raise")
    assert not out.exists()


def break_images(root: Path) -> tuple[Path, Path]:
    truncated, garbage = root / "images" / "img_03.jpg", root / "images" / "img_04.png"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    garbage.write_bytes(b"this is not an image")
    return truncated, garbage


def test_bad_images_raise_or_are_skipped_and_reported(dataset, reference, tmp_path):
    shutil.copytree(dataset.root, tmp_path / "ds")
    broken = Dataset(tmp_path / "ds")
    truncated, garbage = break_images(broken.root)
    out = tmp_path / "depth"

    with pytest.raises(DataError, match=rf"^{truncated}: image file is truncated"):
        run_depth(broken, out, params(), on_error="raise")

    result = run_depth(broken, out, params(), on_error="skip")
    assert result.complete
    store = DepthStore(out)
    assert len(store) == len(IMAGES) - 2 and store.manifest["skipped"] == 2
    assert [(s["image_id"], s["path"]) for s in store.skipped] == [
        ("img_03.jpg", "images/img_03.jpg"),
        ("img_04.png", "images/img_04.png"),
    ]
    assert store.skipped[0]["problem"].startswith("image file is truncated")
    assert store.skipped[1]["problem"] == "cannot identify image file"
    with pytest.raises(KeyError, match="'img_04.png'.*see skipped.json"):
        store.get("img_04.png")
    np.testing.assert_array_equal(store.get("img_00.jpg"), DepthStore(reference).get("img_00.jpg"))

    # on_error=raise retries what was skipped; once the files are repaired, the store is whole.
    with pytest.raises(DataError, match=rf"^{truncated}: image file is truncated"):
        run_depth(broken, out, params(), on_error="raise")
    assert not (out / MANIFEST).exists()  # the store is unfinished again until the rerun ends
    for path in (truncated, garbage):
        shutil.copy(dataset.image_path(path.name), path)
    assert run_depth(broken, out, params(), on_error="raise").complete
    assert store_bytes(out) == store_bytes(reference)


def test_local_folder_and_hub_id_share_the_loader(tmp_path, monkeypatch):
    from transformers import DepthAnythingForDepthEstimation

    model = tiny_depth_model()
    model.save_pretrained(tmp_path / "tiny-depth")
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (90, 60, 3), np.uint8))
    (expected,) = predict_depth(model, [image], batch_size=1, dtype="float32")

    loaded = load_depth_model(str(tmp_path / "tiny-depth"))
    (got,) = predict_depth(loaded, [image], batch_size=1, dtype="float32")
    np.testing.assert_array_equal(got, expected)
    # A folder under the home directory, written with ~, is that folder (not a hub id).
    monkeypatch.setenv("HOME", str(tmp_path))
    (got,) = predict_depth(load_depth_model("~/tiny-depth"), [image], 1, dtype="float32")
    np.testing.assert_array_equal(got, expected)

    # A hub id reaches the same from_pretrained call, with the id as given.
    seen = []
    original = DepthAnythingForDepthEstimation.from_pretrained.__func__

    def redirect(klass, name, *args, **kwargs):
        seen.append(name)
        return original(klass, str(tmp_path / "tiny-depth"), *args, **kwargs)

    monkeypatch.setattr(DepthAnythingForDepthEstimation, "from_pretrained", classmethod(redirect))
    hub_model = load_depth_model("depth-anything/Depth-Anything-V2-Small-hf")
    assert seen == ["depth-anything/Depth-Anything-V2-Small-hf"]
    (got,) = predict_depth(hub_model, [image], batch_size=1, dtype="float32")
    np.testing.assert_array_equal(got, expected)


def test_a_depth_model_that_does_not_load_says_to_use_a_folder(monkeypatch):
    from transformers import DepthAnythingForDepthEstimation

    def offline(klass, name, *args, **kwargs):
        raise OSError(f"cannot reach the hub for {name}")

    monkeypatch.setattr(DepthAnythingForDepthEstimation, "from_pretrained", classmethod(offline))
    message = (
        r"^depth.model='org/depth': cannot load it \(cannot reach the hub for org/depth\)\. "
        r"Without network, download the model to a folder and set depth.model to that folder\.$"
    )
    with pytest.raises(OSError, match=message):
        load_depth_model("org/depth")


def test_tiny_model_is_seeded_in_eval_mode_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_depth_model()
    after = torch.rand(1)
    b = tiny_depth_model()
    assert torch.equal(before, after)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)
    assert not a.training
    # The seed decides the weights: another seed gives another model.
    c = tiny_depth_model(seed=1)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def stage_app() -> typer.Typer:
    from stages.depth import main

    app = typer.Typer()
    app.command()(main)
    return app


def test_stage_command(dataset, reference, tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["depth"] |= {"source": "model", "model": "tiny", "batch_size": 4, "shard_size": 3}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = ["--params", str(tmp_path / "params.yaml"), "--dataset", str(dataset.root)]
    out = tmp_path / "depth"
    runner = CliRunner()
    done = runner.invoke(stage_app(), [*args, "--out", str(out), "--no-progress"])
    assert done.exit_code == 0, done.output
    assert "computed 8 images in 3 of 3 shards" in done.output
    assert store_bytes(out) == store_bytes(reference)
    bad = runner.invoke(
        stage_app(), [*args, "--out", str(out), "--shard", "2", "--num-shards", "2"]
    )
    assert bad.exit_code == 2 and "must be below" in bad.output
    assert (
        runner.invoke(
            stage_app(), [*args[:2], "--dataset", str(tmp_path), "--out", str(out)]
        ).exit_code
        == 1
    )


def test_help_explains_sharding_and_accelerate():
    proc = subprocess.run(
        [sys.executable, "-m", "stages", "depth", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for needle in ("--num-shards", "--shard", "--dataset", "--out", "accelerate launch", "RANK"):
        assert needle in proc.stdout


def test_a_replaced_input_redoes_only_its_shard(dataset, tmp_path):
    shutil.copytree(dataset.root, tmp_path / "ds")
    copy = Dataset(tmp_path / "ds")
    out = tmp_path / "depth"
    shipped = params(source="dataset")
    run_depth(copy, out, shipped, on_error="raise")
    before = store_bytes(out)
    # Shards hold 3 images each in sorted order: img_04 is in shard 1. Its map is replaced.
    new = np.full((10, 20), 4.0, dtype=np.float32)
    np.save(copy.depth_path("img_04.png"), new)
    # A file past the store's last shard (left by a run with smaller shards) is not kept.
    (out / "shard-00003.parquet").write_bytes(b"not a shard")
    result = run_depth(copy, out, shipped, on_error="raise")
    assert (result.shards_computed, result.images_computed) == ([1], 3)
    np.testing.assert_array_equal(DepthStore(out).get("img_04.png"), new)
    after = store_bytes(out)
    assert sorted(p.name for p in out.glob("shard-*")) == [
        f"shard-{k:05d}.parquet" for k in range(3)
    ]
    for name in ("shard-00000.parquet", "shard-00002.parquet"):
        assert after[name] == before[name]


def test_a_store_missing_a_shard_is_unfinished_by_any_worker(dataset, tmp_path):
    """A finished store whose shard of another worker went missing: this worker has nothing to
    compute, yet the store is no longer finished, and readers must say so."""
    out = tmp_path / "depth"
    run_depth(dataset, out, params(source="dataset"), on_error="raise")
    (out / "shard-00001.parquet").unlink()
    result = run_depth(
        dataset, out, params(source="dataset"), on_error="raise", shard=0, num_shards=2
    )
    assert (result.shards_computed, result.complete) == ([], False)
    assert not (out / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="not a finished depth store"):
        DepthStore(out)
    # Its own worker redoes it, and the store is finished again.
    result = run_depth(
        dataset, out, params(source="dataset"), on_error="raise", shard=1, num_shards=2
    )
    assert (result.shards_computed, result.complete) == ([1], True)
    assert len(DepthStore(out)) == len(IMAGES)


def test_the_manifest_is_written_last(dataset, tmp_path, monkeypatch):
    """A run that dies writing skipped.json leaves no manifest: readers refuse the store."""
    from conftest import disk_full_at  # here: a subprocess imports this module without conftest

    import pipeline.depth.run

    disk_full_at(monkeypatch, pipeline.depth.run, "skipped.json")
    out = tmp_path / "depth"
    with pytest.raises(OSError, match="disk full"):
        run_depth(dataset, out, params(source="dataset"), on_error="raise")
    assert not (out / MANIFEST).exists()


def test_skipped_images_are_not_counted_as_computed(dataset, tmp_path):
    shutil.copytree(dataset.root, tmp_path / "ds")
    copy = Dataset(tmp_path / "ds")
    copy.depth_path("img_07.png").write_bytes(b"not a numpy file")
    result = run_depth(copy, tmp_path / "depth", params(source="dataset"), on_error="skip")
    assert result.complete and result.shards_computed == [0, 1, 2]
    assert result.images_computed == len(IMAGES) - 1
    assert [s["image_id"] for s in result.skipped] == ["img_07.png"]


def test_the_reader_refuses_a_store_its_manifest_does_not_describe(dataset, tmp_path):
    out = tmp_path / "depth"
    run_depth(dataset, out, params(source="dataset"), on_error="raise")
    manifest = json.loads((out / MANIFEST).read_text())

    def write(changes: dict) -> None:
        (out / MANIFEST).write_text(json.dumps(manifest | changes))

    write({"format": "remote-depth-store/0"})
    with pytest.raises(ValueError, match="expected format 'remote-depth-store/1'"):
        DepthStore(out)
    write({"count": len(IMAGES) + 1})
    with pytest.raises(ValueError, match=f"lists {len(IMAGES) + 1} images but the shards hold 8"):
        DepthStore(out)
    # Shard files gathered by hand, one copied over another: its images would appear twice.
    write({})
    shutil.copy(out / "shard-00000.parquet", out / "shard-00001.parquet")
    with pytest.raises(ValueError, match="image 'img_00.jpg' appears twice"):
        DepthStore(out)


def test_stage_command_passes_its_params_and_locks_only_its_shard(dataset, tmp_path, monkeypatch):
    from conftest import held_locks  # here: a subprocess imports this module without conftest

    import pipeline.depth.run
    from pipeline.depth.run import DepthRunResult

    out = tmp_path / "depth"
    seen = {}

    def fake_run(ds, out_dir, depth, on_error, shard, num_shards, progress):
        names = [".depth.shard-1-of-2.lock", ".depth.shard-0-of-2.lock", ".depth.lock"]
        locked = held_locks(out_dir.parent, names)
        seen.update(source=depth.source, on_error=on_error, shard=(shard, num_shards))
        seen["locked"] = locked
        return DepthRunResult(3, shards_computed=[1], images_computed=3, complete=False)

    monkeypatch.setattr(pipeline.depth.run, "run_depth", fake_run)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["depth"]["source"] = "model"
    raw["data"]["on_error"] = "skip"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    args = ["--params", str(tmp_path / "params.yaml"), "--dataset", str(dataset.root)]
    args += ["--out", str(out), "--shard", "1", "--num-shards", "2", "--no-progress"]
    result = CliRunner().invoke(stage_app(), args)
    assert result.exit_code == 0, result.output
    assert seen == {
        "source": "model",
        "on_error": "skip",
        "shard": (1, 2),
        "locked": [".depth.shard-1-of-2.lock"],  # the other worker's part stays free
    }
    assert (
        f"computed 3 images in 1 of 3 shards, skipped 0; store {out} incomplete (other "
        "workers' shards missing)"
    ) in result.output
