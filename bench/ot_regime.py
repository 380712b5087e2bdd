"""Measurement: the OT regime of a base-size REMOTE on a few hundred synthetic samples.

Builds the model at the paper's shape (random ``BertConfig()`` text tower, or a real BERT-family
checkpoint from a local folder; a random timm CLIP ViT of the same width and depth, patch 32), feeds
it random batches in the batch contract (``pipeline.model.example.random_batch``: ~90-token texts
with captions, 2-12 objects with depth), and reads :mod:`pipeline.model.regime`'s monitor:

1. at initialization, over every sample (eval mode, no gradients);
2. during ``--train-steps`` AdamW steps (the paper's lr 1e-5, no clipping), from each step's own
   forward, with the largest gradient on the OT projections and LayerNorms and on the weights w;
3. after those steps, over every sample again.

    .venv/bin/python -m bench.ot_regime                              # BERT-base shape, random
    .venv/bin/python -m bench.ot_regime --text-model PATH            # e.g. all-MiniLM-L6-v2's folder
    .venv/bin/python -m bench.ot_regime --samples 96 --train-steps 4 # quicker
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from bench.model import CAPTION, sentence_lengths


def build(text_model: str, threads: int):
    """The model (towers as described above) and its tokenizer."""
    import timm
    import torch
    from transformers import BertConfig

    from pipeline.config import default_params
    from pipeline.model.config import RemoteConfig
    from pipeline.model.remote import RemoteModel
    from pipeline.model.towers import load_text_tower, vision_spec
    from pipeline.text import MARKERS, load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if text_model == "bert-base":
        tokenizer = load_tokenizer("tiny")  # its ids are a subset of BERT-base's vocabulary
        config = BertConfig(vocab_size=30522 + len(MARKERS))
        from transformers import BertModel

        text_tower = BertModel(config, add_pooling_layer=False)
        text_spec = {"bert_config": config.to_dict()}
    else:
        tokenizer = load_tokenizer(text_model)
        text_tower, text_spec = load_text_tower(text_model, True, len(tokenizer))
    text_config = text_tower.config
    layers, hidden = text_config.num_hidden_layers, text_config.hidden_size
    heads = text_config.num_attention_heads
    vision_tower = timm.create_model(
        "vit_base_patch32_clip_quickgelu_224",
        pretrained=False,
        num_classes=0,
        embed_dim=hidden,
        depth=layers,
        num_heads=heads,
    )
    params = default_params(
        {
            "data.pad_to_max": False,
            "data.max_seq": 256,
            # The paper's 7 and 8 of 12 layers, scaled to the tower's depth.
            "model.pool_after_layer": layers * 7 // 12,
            "model.fusion_start_layer": layers * 8 // 12,
            "train.max_grad_norm": 0.0,
        }
    )
    config = RemoteConfig.from_params(params, 28, text_spec, vision_spec(vision_tower))
    return RemoteModel(config, text_tower, vision_tower), tokenizer, params


def batches(tokenizer, samples: int, batch: int) -> list[dict]:
    from pipeline.model.example import random_batch

    out = []
    for k in range(math.ceil(samples / batch)):
        lengths = sentence_lengths(min(batch, samples - k * batch), seed=1000 + k)
        out.append(random_batch(tokenizer, lengths, caption_length=CAPTION, seed=k))
    return out


def measure(model, data) -> dict:
    """The regime over every batch (eval mode, no gradients)."""
    import torch

    from pipeline.model.regime import record_regime, regime_summary

    model.eval()
    with torch.no_grad(), record_regime(model) as stats:
        for batch in data:
            model(batch)
    return regime_summary(stats)


def train_steps(model, data, steps: int, lr: float) -> dict:
    """``steps`` AdamW steps; the regime of every step's forward and the largest gradients."""
    from torch.nn import functional as F

    from pipeline.model.regime import record_regime, regime_summary
    from pipeline.train.loop import build_optimizer

    model.train()
    optimizer = build_optimizer(model, lr, 0.01, decay_norms_and_biases=True)
    largest = {"projections and norms": 0.0, "w": 0.0}
    seconds = []
    with record_regime(model) as stats:
        for step in range(steps):
            start = time.perf_counter()
            batch = data[step % len(data)]
            loss = F.cross_entropy(model(batch), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for stream in (model.encoder.text_transport, model.encoder.vision_transport):
                for param in stream.parameters():
                    if param.grad is None:
                        continue
                    key = "w" if param.ndim == 0 else "projections and norms"  # w: the scalar
                    largest[key] = max(largest[key], float(param.grad.abs().max()))
            optimizer.step()
            seconds.append(time.perf_counter() - start)
    return {
        "regime": regime_summary(stats),
        "largest_gradient": largest,
        "seconds_per_step": sum(seconds) / max(1, len(seconds)),
    }


def table(summary: dict) -> str:
    lines = ["  stream  layer  share>floor  min cost  median cost  rel. update"]
    for stream in ("text", "vision"):
        for layer, values in summary.get(stream, {}).items():
            lines.append(
                f"  {stream:<6}  {layer[-2:]:>5}  {values['share_above_floor']:11.3g}  "
                f"{values['min_cost']:8.2f}  {values['median_cost']:11.2f}  "
                f"{values['relative_update']:11.3g}"
            )
    every = summary.get("all", {})
    if every:
        lines.append(
            f"  all layers: share above the floor {every['share_above_floor']:.3g}, "
            f"smallest cost {every['min_cost']:.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--text-model", default="bert-base", help="bert-base (random) or a folder")
    parser.add_argument("--samples", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    from pipeline.model.regime import floor_threshold

    model, tokenizer, params = build(args.text_model, args.threads)
    ot = params.model.ot
    data = batches(tokenizer, args.samples, args.batch)
    hidden = model.config.text["bert_config"]["hidden_size"]
    print(
        f"text tower {args.text_model}: hidden {hidden}, {len(model.encoder.text_layers)} layers; "
        f"{args.samples} samples in batches of {args.batch} (padded per batch); "
        f"eps {ot.epsilon}, floor {ot.kernel_floor}: costs above "
        f"{floor_threshold(ot.epsilon, ot.kernel_floor):.2f} are lost in the floor; "
        f"threads={args.threads}"
    )
    results = {"settings": vars(args) | {"out": str(args.out)}, "hidden": hidden}
    results["init"] = measure(model, data)
    print(f"\nat initialization ({args.samples} samples, eval mode):\n{table(results['init'])}")
    if args.train_steps:
        trained = train_steps(model, data, args.train_steps, args.lr)
        results["training"] = trained
        grads = ", ".join(f"{k} {v:.3g}" for k, v in trained["largest_gradient"].items())
        print(
            f"\nduring {args.train_steps} AdamW steps at lr {args.lr} "
            f"({trained['seconds_per_step']:.1f} s/step); largest OT gradient: {grads}\n"
            f"{table(trained['regime'])}"
        )
        results["after"] = measure(model, data)
        print(
            f"\nafter those steps ({args.samples} samples, eval mode):\n{table(results['after'])}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
