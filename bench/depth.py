"""Depth benchmark: batched vs one-image-at-a-time inference, and store bytes per image.

    .venv/bin/python -m bench.depth                     # tiny model + a ViT-S-sized random model
    .venv/bin/python -m bench.depth --no-small --images 96
    .venv/bin/python -m bench.depth --model /models/Depth-Anything-V2-Large-hf --dtype float16

Inference: the same images (three sizes, so batches are grouped by input size) through the
same model with ``depth.batch_size`` vs 1, resizing on the device included, best of
``--repeats``; on the GPU when there is one. Preprocessing: the original's resize (both sides at
least 518) in torch (:func:`pipeline.depth.model.prepare_batch`) against transformers'
``DPTImageProcessor`` (PIL) on the same 640x480 photos-sized images, CPU. Storage: a depth
store of the synthetic dataset (the tiny model's maps and the shipped maps) against the original
script's format, one uncompressed float32 ``.npz`` per image.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import default_params
from pipeline.data.records import Dataset
from pipeline.data.synthetic import generate_synthetic
from pipeline.depth.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    image_tensor,
    infer_depth,
    input_settings,
    input_size,
    load_depth_model,
    prepare_batch,
    random_depth_model,
)
from pipeline.depth.run import run_depth
from pipeline.depth.store import DepthStore
from pipeline.device import select_device

DEFAULTS = default_params()

SIZES = [(96, 128), (128, 96), (112, 112)]  # (height, width) of the benchmark images


def small_depth_model():
    """A random model with Depth-Anything-V2-Small's sizes (ViT-S/14, 24.8M parameters), its input
    lower bound at 112 pixels (not 518) so it finishes on a CPU."""
    return random_depth_model("small")


def bench_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        pixels = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 255, (h, w))], -1)
        images.append(Image.fromarray(pixels.astype(np.uint8)))
    return images


def images_per_second(model, pixels, batch_size: int, dtype: str, repeats: int) -> float:
    infer_depth(model, pixels[:batch_size], batch_size, dtype)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        infer_depth(model, pixels, batch_size, dtype)  # returns numpy: includes the GPU sync
        best = min(best, time.perf_counter() - start)
    return len(pixels) / best


def bench_inference(name: str, model, n: int, args: argparse.Namespace) -> None:
    batch_size = args.batch_size
    model = model.to(select_device())
    pixels = [image_tensor(im) for im in bench_images(n)]
    params = sum(p.numel() for p in model.parameters())
    lower_bound, multiple = input_settings(model)
    shapes = sorted({input_size(p.shape[2], p.shape[1], lower_bound, multiple) for p in pixels})
    print(f"\n{name}: {params / 1e6:.2f}M parameters, {n} images at input sizes {shapes}")
    single = images_per_second(model, pixels, 1, args.dtype, args.repeats)
    batched = images_per_second(model, pixels, batch_size, args.dtype, args.repeats)
    print(f"  one at a time     {single:8.1f} images/s")
    print(f"  batch_size={batch_size:<6d} {batched:8.1f} images/s")
    print(f"  ratio             {batched / single:8.2f}x")


def bench_preprocessing(n: int, repeats: int) -> None:
    """Seconds per image: the original's resize in torch on the CPU vs DPTImageProcessor."""
    from transformers import DPTImageProcessor

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(n)
    ]
    processor = DPTImageProcessor(
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=Image.Resampling.BICUBIC,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    cpu = torch.device("cpu")

    def ours():
        for im in images:
            prepare_batch([image_tensor(im)], 518, 14, cpu)

    def transformers_processor():
        for im in images:
            processor(images=im, return_tensors="pt")

    times = {}
    for name, run in (("torch (ours)", ours), ("DPTImageProcessor", transformers_processor)):
        run()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
        times[name] = best / n
    ours_size = tuple(prepare_batch([image_tensor(images[0])], 518, 14, cpu).shape[2:])
    theirs_size = tuple(processor(images=images[0], return_tensors="pt")["pixel_values"].shape[2:])
    print(f"\npreprocessing, {n} images of 640x480, CPU threads {torch.get_num_threads()}:")
    print(
        f"  torch (original resize, -> {ours_size})   {times['torch (ours)'] * 1e3:7.2f} ms/image"
    )
    print(
        f"  DPTImageProcessor (-> {theirs_size})       {times['DPTImageProcessor'] * 1e3:7.2f} ms/image"
    )
    print(
        f"  ratio (> 1: torch faster)                   {times['DPTImageProcessor'] / times['torch (ours)']:7.2f}x"
    )


def npz_bytes(depth: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.savez(buffer, depth=depth.astype(np.float32))
    return len(buffer.getvalue())


def bench_storage(images: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = 2 * images // 3  # about one image per two samples, over three splits
        synthetic = replace(
            DEFAULTS.data.synthetic, seed=1, train=samples, valid=samples, test=samples
        )
        generate_synthetic(root / "syn", synthetic)
        dataset = Dataset(root / "syn")
        print(f"\nstorage: synthetic dataset, {len(dataset.image_ids())} images of 96x96")
        for source in ("model", "dataset"):
            depth = replace(
                DEFAULTS.depth,
                source=source,
                model="tiny",
                batch_size=batch_size,
                dtype="float32",
                shard_size=256,
            )
            start = time.perf_counter()
            run_depth(dataset, root / source, depth, "raise")
            seconds = time.perf_counter() - start
            store = DepthStore(root / source)
            stored = sum(p.stat().st_size for p in (root / source).iterdir()) / len(store)
            shape = store.get(store.ids()[0]).shape
            npz = np.mean([npz_bytes(store.get(i)) for i in store.ids()])
            label = "tiny model maps" if source == "model" else "shipped maps"
            print(
                f"  {label:16s} {shape[0]}x{shape[1]}: store {stored:8.0f} B/image, "
                f"float32 .npz {npz:8.0f} B/image, {npz / stored:5.2f}x smaller; "
                f"stage {len(store) / seconds:6.1f} images/s end to end"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="depth.model: tiny, a folder or a hub id")
    parser.add_argument("--dtype", default="float32", help="depth.dtype (autocast on GPU only)")
    parser.add_argument("--images", type=int, default=48, help="images for --model")
    parser.add_argument("--small-images", type=int, default=12, help="images for the small model")
    parser.add_argument("--no-small", action="store_true", help="skip the ViT-S-sized model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preprocess-images", type=int, default=16, help="640x480 images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {select_device()}, CPU threads {args.threads}")
    model = load_depth_model(args.model)
    bench_inference(args.model, model, args.images, args)
    if not args.no_small:
        bench_inference("ViT-S-sized random", small_depth_model(), args.small_images, args)
    bench_preprocessing(args.preprocess_images, args.repeats)
    bench_storage(args.images, args.batch_size)


if __name__ == "__main__":
    main()
