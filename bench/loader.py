"""Loader throughput: the Parquet feature cache vs redoing the preprocessing in every __getitem__.

The on-the-fly loader does per sample what the original code did: decode the image, crop each
object, run transformers' CLIPImageProcessor (built offline from its default config) on each crop,
load the image's whole .npz depth map and cut its boxes, tokenize the marked text with its captions.
The processor runs two ways: as its default config has it (224 x 224, then resized to the crop
size), and resized straight to the crop size (less work, so a smaller ratio). All loaders run in
this process (num_workers=0, one torch thread) at the same batch size over the synthetic train
split; the cache is built beforehand (its build time is printed, not counted).

    .venv/bin/python -m bench.loader      # from the repository root
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.caption.run import run_caption
from pipeline.caption.table import CaptionTable
from pipeline.config import Params, default_params
from pipeline.data.images import box_to_pixels
from pipeline.data.records import Dataset, Record, label_list, object_slot
from pipeline.data.synthetic import generate_synthetic
from pipeline.depth.run import run_depth
from pipeline.depth.store import DepthStore
from pipeline.features.build import build_features
from pipeline.features.dataset import FeatureDataset, make_loader
from pipeline.text import load_tokenizer


class OnTheFly(torch.utils.data.Dataset):
    """The original per-sample preprocessing, for comparison only."""

    def __init__(self, dataset: Dataset, npz_dir: Path, captions: CaptionTable, params: Params,
                 processor_size: int | None):  # fmt: skip
        from transformers import CLIPImageProcessor

        self.dataset, self.npz_dir, self.captions = dataset, npz_dir, captions
        self.records = dataset.records("train")
        self.objects = dataset.objects
        self.labels = dataset.relations
        self.tokenizer = load_tokenizer(params.model.text_model)
        self.max_seq, self.slots = params.data.max_seq, params.data.max_objects
        self.size = params.features.crop_size
        self.processor = CLIPImageProcessor()
        if processor_size is not None:
            self.processor = CLIPImageProcessor(
                size={"shortest_edge": processor_size},
                crop_size={"height": processor_size, "width": processor_size},
            )

    def __len__(self) -> int:
        return len(self.records)

    def _text(self, r: Record) -> tuple[str, str]:
        words = list(r.text_tokens)
        for n, e in ((1, r.head), (2, r.tail)):
            if e.kind == "text":
                words[e.span[0]] = f"<s{n}> " + words[e.span[0]]
                words[e.span[1] - 1] = words[e.span[1] - 1] + f" </s{n}>"
        caps = []
        for n, e in ((1, r.head), (2, r.tail)):
            m = f"k{n}" if e.kind == "text" else f"o{n}"
            caps.append(f"<{m}> {self.captions.get(r.image_id, e.name) or ''} </{m}>")
        return " ".join(words), " ".join(caps)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        r = self.records[i]
        image = Image.open(self.dataset.image_path(r.image_id)).convert("RGB")
        depth = np.load(self.npz_dir / f"{r.image_id}.npz")["depth"]
        depth = (depth - depth.min()) / max(float(depth.max() - depth.min()), 1e-12)
        pixels = torch.zeros(self.slots, 3, self.size, self.size)
        depth_values = torch.zeros(self.slots, self.size, self.size)
        boxes = torch.zeros(self.slots, 5)
        for name, box in self.objects.get(r.image_id, {}).items():
            k = object_slot(name)
            crop = image.crop(box_to_pixels(box, image.width, image.height))
            out = self.processor(images=crop, return_tensors="pt")["pixel_values"]
            pixels[k] = torch.nn.functional.interpolate(out, size=self.size)[0]
            left, top, right, bottom = box_to_pixels(box, depth.shape[1], depth.shape[0])
            cut = torch.from_numpy(depth[top:bottom, left:right].astype(np.float32))
            depth_values[k] = torch.nn.functional.interpolate(cut[None, None], size=self.size)[0, 0]
            boxes[k] = torch.tensor([*box, (box[2] - box[0]) * (box[3] - box[1])])
        sentence, captions = self._text(r)
        enc = self.tokenizer(sentence, captions, max_length=self.max_seq, truncation=True,
                             padding="max_length", return_tensors="pt")  # fmt: skip
        return {
            "input_ids": enc["input_ids"][0],
            "token_type_ids": enc["token_type_ids"][0],
            "attention_mask": enc["attention_mask"][0],
            "pixel_values": pixels,
            "depth_values": depth_values,
            "boxes": boxes,
            "labels": torch.tensor(self.labels[r.relation]),
        }


def throughput(loader: torch.utils.data.DataLoader, max_samples: int) -> float:
    """Samples per second over (at most) ``max_samples``, epochs repeated as needed."""
    seen, start = 0, time.perf_counter()
    while seen < max_samples:
        for batch in loader:
            seen += len(batch["labels"])
            if seen >= max_samples:
                break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--baseline-samples", type=int, default=192)
    parser.add_argument("--cache-samples", type=int, default=6000)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    params = default_params({"data.source": "synthetic"})
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-loader-"))
    raw = work / "raw"
    if not (raw / "manifest.json").is_file():
        generate_synthetic(raw, params.data.synthetic, params.data.max_objects)
    dataset = Dataset(raw)
    run_depth(dataset, work / "depth", params.depth, params.data.on_error)
    run_caption(dataset, work / "captions", params.caption, progress=False)
    store, captions = DepthStore(work / "depth"), CaptionTable(work / "captions")
    npz = work / "npz"
    npz.mkdir(exist_ok=True)
    for image_id in dataset.image_ids():  # the original's per-image depth files
        np.savez(npz / f"{image_id}.npz", depth=store.get(image_id))

    start = time.perf_counter()
    build_features(dataset, work / "features", params, store, captions)
    build_s = time.perf_counter() - start
    files = list((work / "features" / "train").glob("*.parquet"))
    n_train = len(dataset.records("train"))
    bytes_per_sample = sum(f.stat().st_size for f in files) / n_train

    train = FeatureDataset.load(work / "features", "train", params, label_list(dataset.relations))
    order = torch.utils.data.RandomSampler(train, generator=torch.Generator().manual_seed(0))
    cached = make_loader(train, args.batch_size, sampler=order)
    throughput(cached, args.batch_size)  # warm-up
    cached_sps = throughput(cached, args.cache_samples)
    print(f"synthetic train: {n_train} samples, batch {args.batch_size}, num_workers 0, 1 thread")
    print(
        f"cache build (all splits): {build_s:.1f} s; train cache {bytes_per_sample:,.0f} B/sample"
    )
    print(f"feature cache loader                     : {cached_sps:8.1f} samples/s")
    crop = params.features.crop_size
    for label, size in (("CLIP default, 224", None), (f"CLIP at crop size, {crop}", crop)):
        fresh = torch.utils.data.DataLoader(
            OnTheFly(dataset, npz, captions, params, size),
            batch_size=args.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        throughput(fresh, args.batch_size)  # warm-up
        fresh_sps = throughput(fresh, args.baseline_samples)
        print(
            f"on-the-fly loader ({label:>21}): {fresh_sps:8.1f} samples/s, "
            f"ratio {cached_sps / fresh_sps:5.1f}x"
        )


if __name__ == "__main__":
    main()
