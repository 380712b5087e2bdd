"""Caption throughput: batched generation vs one item at a time, through the stage's own code.

Runs the mllm backend of the caption stage twice over the same synthetic dataset, with
``caption.batch_size`` 1 and then the batch size given, each into a fresh folder, and prints
items/second for both, the ratio, and whether the two wrote the same captions (greedy decoding:
they should). The model load is done once beforehand and not counted.

    .venv/bin/python -m bench.caption                       # tiny Qwen2.5-VL, batch 8
    .venv/bin/python -m bench.caption --batch-size 16 --samples 120
    .venv/bin/python -m bench.caption --model Qwen/Qwen2.5-VL-7B-Instruct --dtype bfloat16  # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.caption.captioner import Captioner
from pipeline.caption.run import run_caption
from pipeline.caption.table import caption_items
from pipeline.config import default_params
from pipeline.data.images import open_image
from pipeline.data.records import Dataset
from pipeline.data.synthetic import generate_synthetic

DEFAULTS = default_params()

PROMPTS = Path(__file__).resolve().parents[1] / "pipeline" / "prompts" / "caption_v1.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="caption.model (default: tiny)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--samples", type=int, default=60, help="synthetic records in all splits")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        n = max(3, args.samples // 3)
        generate_synthetic(
            root, replace(DEFAULTS.data.synthetic, seed=3, train=n, valid=n, test=n, image_size=96)
        )
        dataset = Dataset(root)
        items = len(caption_items(dataset))
        captioner = Captioner.load(args.model, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
        params = replace(
            DEFAULTS.caption,
            backend="mllm",
            model=args.model,
            prompts=str(PROMPTS),
            max_new_tokens=args.max_new_tokens,
            dtype=args.dtype,
        )
        # Warm-up: first calls pay for lazy initialisation (kernels, caches).
        image = open_image(dataset.image_path(dataset.image_ids()[0]))
        captioner.describe(["warm up"], [image])

        rates, outputs = {}, {}
        for batch_size in (1, args.batch_size):
            out = Path(tmp) / f"out-{batch_size}"
            start = time.perf_counter()
            run_caption(
                dataset,
                out,
                dataclasses.replace(params, batch_size=batch_size),
                captioner=captioner,
                progress=False,
            )
            rates[batch_size] = items / (time.perf_counter() - start)
            outputs[batch_size] = (out / "captions.json").read_bytes()

    print(
        f"caption bench: model {args.model}, device {captioner.device}, dtype {captioner.dtype}, "
        f"{items} items, max_new_tokens {args.max_new_tokens}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"one at a time : {rates[1]:8.2f} items/s")
    print(f"batch of {args.batch_size:<5}: {rates[args.batch_size]:8.2f} items/s")
    print(f"ratio         : {rates[args.batch_size] / rates[1]:8.2f}x")
    print(f"same captions : {'yes' if outputs[1] == outputs[args.batch_size] else 'NO'}")


if __name__ == "__main__":
    main()
