"""Diagnostic: how much of each object's depth level a trained model's vision stream keeps.

For one sample per image of a feature split, each occupied object slot's depth *level* is its depth
crop's centre pixel (on the synthetic data the object's own level, by the generator's guarantee; on
real data the depth map at the box centre). A linear probe (ridge regression, fit on a random half of
the objects, R² on the other half) reads that level back from three places:

1. ``depth_patches``: the object's mean depth-patch token before the ViT's pre-LayerNorm (with
   ``model.depth_embedding: channel``, the RGB-D tokens);
2. ``after_pre_norm``: the same tokens after the pre-LayerNorm;
3. ``last_layer``: the object's token in the vision stream's last state.

R² near 1 at (1) and near 0 at (2) and (3) means the depth reaches the model and the LayerNorm
discards its level (see the README, "What the depth tokens keep").

    .venv/bin/python -m bench.depth_probe                                  # models/best, test split
    .venv/bin/python -m bench.depth_probe --model PATH --features DIR --out probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PLACES = ("depth_patches", "after_pre_norm", "last_layer")


def ridge_r2(features: np.ndarray, target: np.ndarray, seed: int = 0, ridge: float = 1e-3) -> float:
    """Held-out R² of a ridge regression (with intercept) fit on a random half of the rows."""
    x = np.hstack([features.astype(np.float64), np.ones((len(features), 1))])
    y = target.astype(np.float64)
    order = np.random.default_rng(seed).permutation(len(y))
    fit, held = order[: len(y) // 2], order[len(y) // 2 :]
    weights = np.linalg.solve(x[fit].T @ x[fit] + ridge * np.eye(x.shape[1]), x[fit].T @ y[fit])
    residual = ((x[held] @ weights - y[held]) ** 2).sum()
    return float(1 - residual / ((y[held] - y[held].mean()) ** 2).sum())


def object_states(model, batch: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """For each occupied slot of ``batch``: its vectors at the three places, and its depth level."""
    import torch

    embeddings = model.object_embeddings
    if embeddings.depth_patch is None:
        raise ValueError("the model was trained without depth (data.use_depth=false): no probe")
    pixels, depth = batch["pixel_values"], batch["depth_values"]
    batch_size, slots, _, size, _ = pixels.shape
    occupied = (torch.arange(slots)[None, :] < batch["num_objects"][:, None]).reshape(-1)
    # [B * P, grid^2, D]: the depth patches' tokens (with "channel", the RGB-D ones)
    tokens = embeddings.patch_tokens(pixels, depth)[:, -embeddings.patches_per_crop :]
    places = {
        "depth_patches": tokens.mean(1),
        "after_pre_norm": embeddings.pre_norm(tokens).mean(1),
        "last_layer": model.encode(batch).vision[-1].reshape(batch_size * slots, -1),
    }
    levels = depth.reshape(-1, size, size)[:, size // 2, size // 2]
    return {k: v[occupied].double().numpy() for k, v in places.items()}, levels[occupied].numpy()


def probe(model, dataset, batch_size: int = 64, seed: int = 0) -> dict:
    """R² of the depth level at each place, over one sample per image of ``dataset``."""
    import torch

    _, first = np.unique(dataset.image_index, return_index=True)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in PLACES}
    levels = []
    with torch.inference_mode():
        for start in range(0, len(first), batch_size):
            states, level = object_states(model, dataset.batch(first[start : start + batch_size]))
            for key in PLACES:
                parts[key].append(states[key])
            levels.append(level)
    target = np.concatenate(levels)
    return {
        "objects": len(target),
        "distinct_levels": len(np.unique(target)),
        "r2": {k: ridge_r2(np.concatenate(parts[k]), target, seed) for k in PLACES},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/best"))
    parser.add_argument("--features", type=Path, default=Path("data/features"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)

    import torch

    from pipeline.features.dataset import FeatureDataset
    from pipeline.model.saved import load_trained

    torch.set_num_threads(args.threads)
    trained = load_trained(args.model)
    dataset = FeatureDataset.load(args.features, args.split, trained.params, trained.labels)
    report = {
        "model": str(args.model),
        "depth_embedding": trained.params.model.depth_embedding,
        "split": args.split,
        **probe(trained.model, dataset),
    }
    print(
        f"{args.model} (model.depth_embedding={report['depth_embedding']}), {args.split}: "
        f"{report['objects']} objects, {report['distinct_levels']} depth levels"
    )
    for place, r2 in report["r2"].items():
        print(f"  {place:15s} held-out R² of the depth level: {r2:6.3f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
