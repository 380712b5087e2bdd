"""The training loop, checkpoints and the evaluate stage, on the real tiny model and feature cache.

One small synthetic dataset goes through the real download -> depth -> caption -> features code
once per module; training runs use the tiny model at a size that learns in a few epochs.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline import metrics
from pipeline.config import Params, apply_overrides, load_params, params_to_dict
from pipeline.data.records import Dataset, label_list
from pipeline.evaluate.plots import read_live_metric
from pipeline.inference import predict_dataset
from pipeline.model.saved import load_trained, read_trained_params
from pipeline.train.loop import TrainingInterrupted, build_optimizer, train

REPO = Path(__file__).resolve().parents[1]

# Small enough for a shared 2-core machine; the dataset and model code paths are the real ones.
SMALL = {
    "data.synthetic.train": 240,
    "data.synthetic.valid": 60,
    "data.synthetic.test": 60,
    "data.synthetic.image_size": 64,
    "data.max_objects": 6,
    "data.max_seq": 48,
    "data.pad_to_max": False,
    "features.crop_size": 32,
    "model.ot.solver": "sinkhorn",
    "model.ot.iterations": 10,
    "train.epochs": 6,
    "train.batch_size": 16,
    "train.eval_batch_size": 64,
    "train.lr": 2e-3,
    "train.num_workers": 0,
    "train.threads": 1,  # as the session fixture: train() sets the process-wide thread count
}


def small_params(**overrides: Any) -> Params:
    base = load_params(REPO / "params.yaml")
    return apply_overrides(base, {**SMALL, **overrides})


def build_world(root: Path, params: Params) -> dict[str, Path]:
    """Run download, depth, caption and features (library calls) into ``root``."""
    from pipeline.caption.run import run_caption
    from pipeline.caption.table import CaptionTable
    from pipeline.data.records import Dataset
    from pipeline.data.synthetic import generate_synthetic
    from pipeline.depth.run import run_depth
    from pipeline.depth.store import DepthStore
    from pipeline.features.build import build_features

    raw, depth, captions, features = (root / n for n in ("raw", "depth", "captions", "features"))
    generate_synthetic(raw, params.data.synthetic, params.data.max_objects)
    dataset = Dataset(raw)
    run_depth(dataset, depth, params.depth, params.data.on_error)
    run_caption(dataset, captions, params.caption, progress=False)
    build_features(dataset, features, params, DepthStore(depth), CaptionTable(captions))
    return {"raw": raw, "depth": depth, "captions": captions, "features": features}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return build_world(tmp_path_factory.mktemp("world"), small_params())


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def resume_like(full, args, out: Path, live: Path, saved: tuple[int, int], runs: tuple[int, int]):
    """Rerun an interrupted ``train(*args, out, live)``: its checkpoint must hold ``saved`` (epoch,
    optimizer step), the rerun must report ``runs`` (resumed from epoch, epochs run) and end as the
    uninterrupted ``full`` did."""
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    assert (meta["epoch"], meta["global_step"]) == saved
    resumed = train(*args, out, live)
    assert (resumed.resumed_from_epoch, resumed.epochs_run) == runs
    assert_same_weights(weights(full.model), weights(resumed.model))
    assert resumed.history == full.history


# ---------------------------------------------------------------------------------------------
# Pieces


def test_label_list_checks_the_label_map():
    assert label_list({"none": 0, "b": 2, "a": 1}) == ["none", "a", "b"]
    with pytest.raises(ValueError, match="ids must be 0..1"):
        label_list({"none": 0, "a": 2})
    with pytest.raises(ValueError, match="'none' must have id 0"):
        label_list({"a": 0, "none": 1})


def test_data_order_is_a_function_of_seed_and_epoch_split_across_processes(world):
    """What resuming relies on: a fresh sampler set to epoch e draws epoch e's order, with no
    saved state; the processes' shards are disjoint slices of one permutation."""
    from torch.utils.data import DistributedSampler

    from pipeline.features.dataset import FeatureDataset

    labels = label_list(Dataset(world["raw"]).relations)
    data = FeatureDataset.load(world["features"], "train", small_params(), labels)

    def order(epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, seed=3)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(order(2)) == list(range(len(data)))
    shards = [order(2, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [len(data) // 3] * 3  # 240 samples: no padding
    assert sorted(i for s in shards for i in s) == list(range(len(data)))


@pytest.mark.parametrize("decay_all", [True, False])
def test_optimizer_covers_every_trainable_parameter_once(decay_all):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    model[2].weight.requires_grad_(False)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01, decay_norms_and_biases=decay_all)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) == 5
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    if decay_all:  # the original: AdamW's decay on every optimized parameter
        assert decay == {0.01: {id(p) for p in trainable}}
    else:  # matrices decay; biases and norm gains do not
        assert decay[0.01] == {id(model[0].weight)}
        assert id(model[1].weight) in decay[0.0]
    # One step with zero gradients: exactly the decay acts, lr * wd * p, where it applies.
    before = {id(p): p.detach().clone() for p in trainable}
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in trainable:
        decayed = decay_all or p.ndim > 1
        expected = before[id(p)] * (1 - 1e-3 * 0.01) if decayed else before[id(p)]
        torch.testing.assert_close(p.detach(), expected)


class LinearOnBoxes(torch.nn.Module):
    """A deterministic stand-in for REMOTE (no dropout): logits from the batch's boxes through a
    LayerNorm and a Linear, so the loop's arithmetic can be replayed exactly in plain code."""

    def __init__(self, features: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = torch.nn.Module()  # the loop sets encoder.gradient_checkpointing
        self.norm = torch.nn.LayerNorm(features)
        self.linear = torch.nn.Linear(features, num_labels)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.linear(self.norm(batch["boxes"].flatten(1).float()))


def reference_training(
    model: torch.nn.Module, data: Any, tp: Any, seed: int
) -> tuple[list[float], list[float], int]:
    """The paper's recipe written out: each epoch's order is randperm(n) seeded with seed + epoch
    index; micro-batches of batch_size; a step every grad_accum of them (the epoch's last group
    may be shorter: its loss is the mean over its own micro-batches); the total gradient norm
    clipped to max_grad_norm (scale max / (norm + 1e-6) when above it); AdamW (betas 0.9, 0.999,
    eps 1e-8, decoupled decay on every parameter) at a rate warming up linearly from 0 over
    warmup_ratio * steps steps, not rounded (the original's float), then falling linearly to 0 at
    the last step. Returns each
    step's loss, the rate its update ran at, and the number of clipped steps."""
    params = list(model.parameters())
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_sq = [torch.zeros_like(p) for p in params]
    micro = math.ceil(len(data) / tp.batch_size)
    groups = [list(range(s, min(s + tp.grad_accum, micro))) for s in range(0, micro, tp.grad_accum)]
    total = len(groups) * tp.epochs
    warmup = tp.warmup_ratio * total
    assert warmup != int(warmup) and warmup > 1  # a fractional warm-up: rounding it would show

    def rate(step: int) -> float:  # the rate of update number step + 1
        if step < warmup:
            return tp.lr * step / warmup
        return tp.lr * max(0.0, (total - step) / (total - warmup))

    losses, rates, step, clipped = [], [], 0, 0
    for epoch in range(tp.epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
        for group in groups:
            grads = [torch.zeros_like(p) for p in params]
            step_loss = 0.0
            for m in group:
                batch = data.batch(order[m * tp.batch_size : (m + 1) * tp.batch_size].numpy())
                loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
                for g, d in zip(grads, torch.autograd.grad(loss, params), strict=True):
                    g += d / len(group)
                step_loss += loss.item() / len(group)
            if tp.max_grad_norm > 0:
                norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
                if norm > tp.max_grad_norm:
                    clipped += 1
                    grads = [g * (tp.max_grad_norm / (norm + 1e-6)) for g in grads]
            lr, t = rate(step), step + 1
            with torch.no_grad():
                for p, g, m1, m2 in zip(params, grads, exp_avg, exp_sq, strict=True):
                    m1.mul_(0.9).add_(0.1 * g)
                    m2.mul_(0.999).add_(0.001 * g * g)
                    p.mul_(1 - lr * tp.weight_decay)
                    denom = (m2 / (1 - 0.999**t)).sqrt() + 1e-8
                    p.sub_(lr * (m1 / (1 - 0.9**t)) / denom)
            step += 1
            losses.append(step_loss)
            rates.append(lr)
    return losses, rates, clipped


def test_batched_prediction_equals_one_sample_at_a_time(world):
    """predict_dataset on a shard in batches of 3 (the last one short): each row is the sample it
    names, its gold label and pair kind, the softmax of the eval-mode logits and their argmax;
    the model's mode is restored."""
    from pipeline.features.dataset import FeatureDataset

    labels = label_list(Dataset(world["raw"]).relations)
    dev = FeatureDataset.load(world["features"], "valid", small_params(), labels)
    torch.manual_seed(0)
    model = LinearOnBoxes(5 * SMALL["data.max_objects"], len(labels))
    model.linear = torch.nn.Sequential(torch.nn.Dropout(0.5), model.linear)  # acts if not eval
    shard = [7, 3, 12, 0, 59, 31, 8]
    out = predict_dataset(model.train(), dev, 3, "cpu", shard)
    assert model.training
    assert out["index"].tolist() == shard
    model.eval()
    for row, i in enumerate(shard):
        with torch.no_grad():
            logits = model(dev.batch([i]))[0].double().tolist()
        exp = [math.exp(x - max(logits)) for x in logits]
        probs = [e / sum(exp) for e in exp]
        np.testing.assert_allclose(out["probs"][row], probs, rtol=1e-5, atol=1e-7)
        assert out["pred"][row] == max(range(len(labels)), key=logits.__getitem__)
        assert out["gold"][row] == dev.labels[i] and out["pair_kind"][row] == dev.pair_kinds[i]
    assert len(set(out["pred"].tolist())) > 1  # not a constant prediction


def test_a_run_whose_dev_f1_stays_zero_keeps_its_last_epoch(world, tmp_path, monkeypatch):
    """A model that predicts none everywhere scores dev micro-F1 0: epoch 1 is still the best
    so far (no epoch is better than none), so checkpoint/best and selected/ exist; epoch 2 ties
    it and, as in the original (its `>=`), the later epoch is kept. A tie is no gain: patience 1
    stops the run after it."""
    from pipeline.train import loop

    labels = label_list(Dataset(world["raw"]).relations)
    model = LinearOnBoxes(5 * SMALL["data.max_objects"], len(labels))
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.bias.copy_(torch.eye(len(labels))[0])  # "none" wins every sample
    monkeypatch.setattr(loop, "build_model", lambda *_: model)
    monkeypatch.setattr(loop, "model_card", lambda *_: "")
    monkeypatch.setattr(loop, "write_trained", lambda folder, *_: folder.mkdir(parents=True))
    params = small_params(**{"train.lr": 0.0, "train.epochs": 3, "train.patience": 1})
    result = loop.train(params, world["features"], world["raw"], tmp_path / "m", tmp_path / "l")
    assert [h["dev_micro_f1"] for h in result.history] == [0.0, 0.0]
    assert (result.best_epoch, result.best_score, result.stopped_early) == (2, 0.0, True)
    best = json.loads((tmp_path / "m" / "checkpoint" / "meta.json").read_text())
    assert (best["best_epoch"], best["epochs_since_best"]) == (2, 1)
    assert (tmp_path / "m" / "checkpoint" / "best").is_dir() and result.best_dir.is_dir()


@pytest.mark.parametrize(
    ("grad_accum", "max_grad_norm"), [(2, 0.0), (1, 1.5)], ids=["accumulated", "clipped"]
)
def test_the_loop_takes_the_steps_of_the_written_out_recipe(
    world, tmp_path, monkeypatch, grad_accum, max_grad_norm
):
    """Schedule (linear warm-up over ratio * steps, not rounded; linear decay), gradient accumulation
    (a short last group averaged over its own size), clipping, AdamW and the data order, against
    a plain loop on a deterministic stand-in model: same weights, same logged losses and rates."""
    from pipeline.train import loop

    params = small_params(
        **{
            "train.epochs": 3,
            "train.grad_accum": grad_accum,
            "train.max_grad_norm": max_grad_norm,
            "train.warmup_ratio": 0.3,  # 7.2 or 13.5 warm-up steps: fractional, as the original
            "train.weight_decay": 0.1,
            "train.log_every": 0,
        }
    )
    labels = label_list(Dataset(world["raw"]).relations)
    features = 5 * SMALL["data.max_objects"]
    torch.manual_seed(0)
    initial = LinearOnBoxes(features, len(labels))
    monkeypatch.setattr(loop, "build_model", lambda *_: copy.deepcopy(initial))
    monkeypatch.setattr(loop, "model_card", lambda *_: "")
    monkeypatch.setattr(loop, "write_trained", lambda folder, *_: folder.mkdir(parents=True))
    result = loop.train(params, world["features"], world["raw"], tmp_path / "m", tmp_path / "l")

    from pipeline.features.dataset import FeatureDataset

    data = FeatureDataset.load(world["features"], "train", params, labels)
    reference = copy.deepcopy(initial)
    losses, rates, clipped = reference_training(reference, data, params.train, params.train.seed)
    steps_per_epoch = {2: 8, 1: 15}[grad_accum]  # 15 micro-batches of 16
    assert len(losses) == 3 * steps_per_epoch
    # Gradient norms are 1-2.5 here: 1.5 clips some steps, not all (Adam undoes a constant scale).
    assert 0 < clipped < len(losses) if max_grad_norm else clipped == 0
    steps, logged_loss = read_live_metric(tmp_path / "l", "train/loss")
    assert steps.tolist() == list(range(1, len(losses) + 1))
    np.testing.assert_allclose(logged_loss, losses, rtol=1e-5)
    _, logged_rate = read_live_metric(tmp_path / "l", "train/lr")
    np.testing.assert_allclose(logged_rate, rates, rtol=1e-6, atol=1e-12)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], value, rtol=1e-4, atol=1e-6)
    # The recipe moved the weights well beyond the tolerance.
    assert (reference.linear.weight - initial.linear.weight).abs().max() > 1e-2


def stand_in_run(world, monkeypatch, scores=None):
    """Patch the loop to train a fresh LinearOnBoxes (seeded, no dropout), save the selected
    model as its state dict and info, and, given ``scores``, report them as the dev micro-F1 of
    epochs 1, 2, ... (recording the weights each epoch was scored with). Returns that record."""
    from pipeline.train import loop

    labels = label_list(Dataset(world["raw"]).relations)
    scored: list[dict[str, torch.Tensor]] = []

    def build(*_):
        torch.manual_seed(0)
        return LinearOnBoxes(5 * SMALL["data.max_objects"], len(labels))

    def save(folder, model, params, labels, tokenizer, info, card):
        folder.mkdir(parents=True)
        torch.save(weights(model), folder / "weights.pt")
        (folder / "info.json").write_text(json.dumps(info))

    def split_scores(accelerator, model, split, shard, params, labels):
        scored.append(weights(model))
        f1 = scores[len(scored) - 1]
        keys = ("micro_f1", "micro_precision", "micro_recall", "accuracy", "macro_f1")
        return dict.fromkeys(keys, f1)

    monkeypatch.setattr(loop, "build_model", build)
    monkeypatch.setattr(loop, "model_card", lambda *_: "")
    monkeypatch.setattr(loop, "write_trained", save)
    if scores is not None:
        monkeypatch.setattr(loop, "_split_scores", split_scores)
    return scored


def test_the_best_dev_epoch_is_kept_when_later_epochs_score_lower(world, tmp_path, monkeypatch):
    """Dev micro-F1 0.5, 0.8, 0.6, 0.7: epoch 2's weights (as scored) are checkpoint/best and
    selected/ at the end, the summary names epoch 2, and each epoch's logged loss is the mean of
    its steps' logged losses (read every log_every steps and at the epoch's end)."""
    scores = [0.5, 0.8, 0.6, 0.7]
    scored = stand_in_run(world, monkeypatch, scores)
    params = small_params(**{"train.epochs": 4, "train.log_every": 4})
    out, live = tmp_path / "m", tmp_path / "l"
    result = train(params, world["features"], world["raw"], out, live)
    assert [h["dev_micro_f1"] for h in result.history] == scores
    assert (result.best_epoch, result.best_score) == (2, 0.8)
    assert not torch.equal(scored[1]["linear.weight"], scored[3]["linear.weight"])
    for folder in (out / "checkpoint" / "best", out / "selected"):
        assert json.loads((folder / "info.json").read_text())["epoch"] == 2
        assert_same_weights(torch.load(folder / "weights.pt"), scored[1])
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["best"] == {"dev_micro_f1": 0.8, "epoch": 2}
    steps, losses = read_live_metric(live, "train/loss")
    assert steps.tolist() == list(range(1, 4 * 15 + 1))
    _, epoch_loss = read_live_metric(live, "train/epoch_loss")
    np.testing.assert_allclose(epoch_loss, losses.reshape(4, 15).mean(1), rtol=1e-6)


class InfiniteGradientAt(torch.autograd.Function):
    """Identity forward; an infinite gradient in the backward pass when ``flag`` is set."""

    @staticmethod
    def forward(ctx, x, flag):
        ctx.flag = flag
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf") if ctx.flag else grad, None


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0], ids=["unclipped", "clipped"])
def test_an_infinite_gradient_with_a_finite_loss_stops_the_run(
    world, tmp_path, monkeypatch, max_grad_norm
):
    # The loss of step 3 is finite but its gradient is not: the update is skipped, and so would
    # every later one be, so the run must stop and say so instead of finishing untrained.
    from pipeline.train.loop import TrainingDiverged

    stand_in_run(world, monkeypatch)
    forward = LinearOnBoxes.forward
    calls = []

    def poisoned(self, batch):
        calls.append(self.training)
        flag = self.training and calls.count(True) == 3
        return InfiniteGradientAt.apply(forward(self, batch), flag)

    monkeypatch.setattr(LinearOnBoxes, "forward", poisoned)
    params = small_params(**{"train.epochs": 2, "train.max_grad_norm": max_grad_norm})
    with pytest.raises(TrainingDiverged, match=r"step 3: loss \d\.\d+, gradient norm (inf|nan)"):
        train(params, world["features"], world["raw"], tmp_path / "m", tmp_path / "l")
    assert not (tmp_path / "m" / "checkpoint").exists()


def test_a_kill_while_a_checkpoint_is_saved_resumes_to_the_same_weights(
    world, tmp_path, monkeypatch
):
    # Killed after epoch 2's state files were written but before its progress was: the rerun must
    # see epoch 1's whole checkpoint (weights and progress together) and end as an unkilled run.
    from pipeline.train import checkpoint

    stand_in_run(world, monkeypatch)
    params = small_params(**{"train.epochs": 3})
    args = (params, world["features"], world["raw"])
    full = train(*args, tmp_path / "a", tmp_path / "a_live")
    real, saves = checkpoint.write_json, []

    def dying(path, data):
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_json", dying)
    with pytest.raises(KeyboardInterrupt):
        train(*args, tmp_path / "b", tmp_path / "b_live")
    monkeypatch.setattr(checkpoint, "write_json", real)
    resume_like(full, args, tmp_path / "b", tmp_path / "b_live", (1, 15), (1, 2))


# ---------------------------------------------------------------------------------------------
# Training end to end (through the train stage's command line)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory) -> dict[str, Any]:
    from typer.testing import CliRunner

    from stages.cli import app

    root = tmp_path_factory.mktemp("trained")
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(small_params())))
    out, live = root / "models", root / "dvclive"
    result = CliRunner().invoke(
        app,
        [
            "train", "--params", str(params_file), "--features", str(world["features"]),
            "--dataset", str(world["raw"]), "--out", str(out), "--live", str(live),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"params_file": params_file, "out": out, "live": live, "output": result.output}


def test_training_lowers_the_loss_and_beats_the_majority_baseline(world, trained):
    from pipeline.features.dataset import FeatureDataset

    params = small_params()
    labels = label_list(Dataset(world["raw"]).relations)
    _, epoch_loss = read_live_metric(trained["live"], "train/epoch_loss")
    _, dev_f1 = read_live_metric(trained["live"], "dev/micro_f1")
    assert len(epoch_loss) == len(dev_f1) == params.train.epochs
    assert epoch_loss[-1] < 0.8 * epoch_loss[0]
    # Majority baseline: predict the most frequent train label for every dev sample.
    train_labels = FeatureDataset.load(world["features"], "train", params, labels).labels
    dev = FeatureDataset.load(world["features"], "valid", params, labels)
    majority = np.full_like(dev.labels, np.bincount(train_labels).argmax())
    baseline = metrics.micro_prf(dev.labels, majority)[2]
    assert dev_f1.max() > baseline + 0.2
    # The kept model is the best dev epoch's and scores what was logged for it.
    model = load_trained(trained["out"] / "checkpoint" / "best")
    best = int(np.argmax(dev_f1))
    assert model.info["epoch"] == best + 1
    out = predict_dataset(model.model, dev, 64, "cpu")
    precision, recall, f1 = metrics.micro_prf(out["gold"], out["pred"])
    assert f1 == pytest.approx(dev_f1[best])
    # ... and its logged precision and recall (they differ here: a swap would show).
    assert abs(precision - recall) > 1e-3
    for name, value in (("micro_precision", precision), ("micro_recall", recall)):
        assert read_live_metric(trained["live"], f"dev/{name}")[1][best] == pytest.approx(value)
    summary = json.loads((trained["live"] / "metrics.json").read_text())
    assert summary["best"] == {"dev_micro_f1": pytest.approx(dev_f1[best]), "epoch": best + 1}
    assert "best dev micro-F1" in trained["output"]


def test_the_stage_output_is_a_copy_of_the_checkpoints_dev_selected_model(trained):
    # models/selected is what DVC caches (and restores on checkout); checkpoint/ stays uncached.
    best, selected = trained["out"] / "checkpoint" / "best", trained["out"] / "selected"
    files = sorted(p.relative_to(best) for p in best.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(selected) for p in selected.rglob("*") if p.is_file())
    for name in files:
        assert (selected / name).read_bytes() == (best / name).read_bytes(), name
        assert (selected / name).stat().st_ino != (best / name).stat().st_ino  # a copy, no link
    assert f"wrote {selected}" in trained["output"]


def test_model_folder_is_self_contained_and_pickle_free(trained):
    best = trained["out"] / "checkpoint" / "best"
    assert sorted(p.name for p in best.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer",
        "trained.json",
    ]
    meta = json.loads((best / "trained.json").read_text())
    assert json.loads((best / "config.json").read_text())["format"] == 3
    assert meta["labels"]["none"] == 0 and meta["tokenizer"]["path"] == "tokenizer"
    assert meta["params"]["train"]["epochs"] == SMALL["train.epochs"]
    loaded = load_trained(best)
    # The saved tokenizer has the 12 entity markers as single tokens.
    ids = loaded.tokenizer.convert_tokens_to_ids(["<s1>", "</o2>"])
    assert loaded.tokenizer.unk_token_id not in ids
    assert not loaded.model.training


def test_a_folder_saved_before_a_param_existed_loads_through_added_params(
    trained, tmp_path, monkeypatch
):
    import shutil

    import pipeline.config

    folder = tmp_path / "old"
    shutil.copytree(trained["out"] / "checkpoint" / "best", folder)
    for name, head in (("trained.json", ("params", "model", "head")), ("config.json", ("head",))):
        raw = json.loads((folder / name).read_text())
        section = raw
        for key in head:
            section = section[key]
        del section["project_without_caption"]  # as if saved before the param was added
        (folder / name).write_text(json.dumps(raw))
    with pytest.raises(
        ValueError, match=r"project_without_caption.*pipeline\.config\.ADDED_PARAMS"
    ):
        load_trained(folder)
    with pytest.raises(
        ValueError, match=r"head\.project_without_caption: missing key.*ADDED_PARAMS"
    ):
        read_trained_params(folder)
    monkeypatch.setattr(
        pipeline.config, "ADDED_PARAMS", {"model.head.project_without_caption": True}
    )
    loaded = load_trained(folder)
    assert loaded.params.model.head.project_without_caption is True
    assert loaded.model.config.head.project_without_caption is True


def test_a_folder_saved_before_depth_embedding_existed_has_its_own_depth_tokens(trained, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(trained["out"] / "checkpoint" / "best", folder)
    for name, section in (("trained.json", ("params", "model")), ("config.json", ())):
        raw = json.loads((folder / name).read_text())
        node = raw
        for key in section:
            node = node[key]
        assert node.pop("depth_embedding") == "tokens"
        (folder / name).write_text(json.dumps(raw))
    loaded = load_trained(folder)
    assert loaded.params.model.depth_embedding == "tokens"
    assert loaded.model.config.depth_embedding == "tokens"
    current_model = load_trained(trained["out"] / "checkpoint" / "best").model
    embeddings = loaded.model.object_embeddings
    assert not embeddings.depth_as_channel
    assert embeddings.tokens_per_object == current_model.object_embeddings.tokens_per_object
    current, saved = current_model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == current.keys()
    assert all(torch.equal(saved[k], current[k]) for k in saved)


def test_evaluate_stage_writes_metrics_tables_and_plots(world, trained, tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    metrics_dir, plots_dir = tmp_path / "metrics", tmp_path / "plots"
    result = CliRunner().invoke(
        app,
        [
            "evaluate", "--params", str(trained["params_file"]),
            "--features", str(world["features"]), "--model", str(trained["out"] / "checkpoint" / "best"),
            "--metrics", str(metrics_dir), "--plots", str(plots_dir), "--live", str(trained["live"]),
            "--release", str(tmp_path / "release"), "--dataset", str(world["raw"]),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    test = json.loads((metrics_dir / "test.json").read_text())
    keys = {"micro_f1", "micro_precision", "micro_recall", "accuracy", "macro_f1", "by_pair_kind"}
    assert set(test) == keys
    assert all(0 <= test[k] <= 1 for k in keys - {"by_pair_kind"})
    assert set(test["by_pair_kind"]) == {"text-text", "text-object", "object-object"}
    assert sum(v["support"] for v in test["by_pair_kind"].values()) == SMALL["data.synthetic.test"]
    # Every file agrees with the per-sample predictions.
    rows = [
        json.loads(line) for line in (metrics_dir / "predictions.jsonl").read_text().splitlines()
    ]
    labels = load_trained(trained["out"] / "checkpoint" / "best").labels
    gold = [labels.index(r["gold"]) for r in rows]
    pred = [labels.index(r["predicted"]) for r in rows]
    assert test["micro_f1"] == pytest.approx(metrics.micro_prf(gold, pred)[2])
    assert test["micro_f1"] > 0.3
    confusion = json.loads((plots_dir / "confusion.json").read_text())["confusion"]
    assert [(c["actual"], c["predicted"]) for c in confusion] == [
        (r["gold"], r["predicted"]) for r in rows
    ]
    with (metrics_dir / "per_relation.csv").open() as fh:
        table = list(csv.DictReader(fh))
    seen = {r["gold"] for r in rows} | {r["predicted"] for r in rows}
    assert {r["label"] for r in table} == seen - {"none"}
    for name in ("confusion.png", "training.png"):
        assert (plots_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_published_folder_loads_with_from_pretrained_and_its_card_names_the_metrics(
    world, trained, tmp_path
):
    from huggingface_hub import ModelCard

    from pipeline.evaluate.report import evaluate_model
    from pipeline.features.dataset import FeatureDataset
    from pipeline.io import file_sha256
    from pipeline.model.remote import RemoteModel

    source, release = trained["out"] / "checkpoint" / "best", tmp_path / "best"
    test = evaluate_model(
        source, world["features"], tmp_path / "m", tmp_path / "p", None, 64,
        release_dir=release, dataset_dir=world["raw"],
    )  # fmt: skip
    assert sorted(p.name for p in release.iterdir()) == sorted(p.name for p in source.iterdir())
    # The weights are the trained ones, bit for bit, and give the same logits.
    assert (release / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()
    saved = load_trained(source)
    model = RemoteModel.from_pretrained(release)
    assert not model.training
    dev = FeatureDataset.load(world["features"], "valid", small_params(), saved.labels)
    batch = dev.batch(list(range(20)))
    with torch.no_grad():
        assert torch.equal(model(batch), saved.model(batch))

    card = ModelCard.load(release / "README.md")
    written = json.loads((tmp_path / "m" / "test.json").read_text())
    assert written == json.loads(json.dumps(test))
    (result,) = card.data.eval_results
    assert result.metric_value == round(written["micro_f1"], 4)
    assert f"| micro-F1 | {written['micro_f1']:.4f} |" in card.text
    for kind, row in written["by_pair_kind"].items():
        assert f"| {kind} | {row['micro_f1']:.4f} | {row['support']} |" in card.text
    assert file_sha256(world["raw"] / "manifest.json") in card.text
    assert "| `train.max_grad_norm` | `1.0` | `0.0` ≠ |" in card.text  # a switch off the preset
    assert "| `model.init` | `original` | `original` |" in card.text
    assert "| `train.num_processes` | `1` |" in card.text  # with batch size: the effective batch
    assert "dvc exp run $(.venv/bin/python -m stages preset path/to/model)" in card.text
    # The dev-selected folder's card has no test metrics yet.
    assert "Not scored on test yet" in (source / "README.md").read_text()


def test_the_card_puts_each_number_and_fact_in_its_own_row():
    from huggingface_hub import ModelCard

    from pipeline.model.card import model_card

    params = small_params()
    test = {
        "micro_f1": 0.61237, "micro_precision": 0.5, "micro_recall": 0.75, "accuracy": 0.875,
        "macro_f1": 0.25,
        "by_pair_kind": {  # no text-object pairs; an unknown kind goes after the known ones
            "zz-kind": {"micro_f1": 0.0625, "support": 1},
            "object-object": {"micro_f1": 0.125, "support": 3},
            "text-text": {"micro_f1": 1.0, "support": 5},
        },
    }  # fmt: skip
    dataset = {"source": "synthetic", "manifest_sha256": "ab" * 32,
               "splits": {"train": 240, "valid": 60, "test": 60}}  # fmt: skip
    info = {"epoch": 4, "dev": {"micro_f1": 0.7, "accuracy": 0.9}}
    card = model_card(params, ["none", "b_rel", "a_rel"], info, test, dataset)
    lines = card.splitlines()
    (result,) = ModelCard(card).data.eval_results
    assert (result.dataset_split, result.metric_value) == ("test", 0.6124)
    assert "tiny` (vision), 3 relation labels." in card
    assert "- dataset: `synthetic` (train 240, valid 60, test 60 records)" in lines
    assert f"- `manifest.json` sha256: `{'ab' * 32}`" in lines
    assert "- labels: `none`, `b_rel`, `a_rel`" in lines
    start = lines.index("| metric | value |")
    assert lines[start + 2 : start + 7] == [
        "| micro-F1 | 0.6124 |",
        "| micro precision | 0.5000 |",
        "| micro recall | 0.7500 |",
        "| accuracy | 0.8750 |",
        "| macro-F1 | 0.2500 |",
    ]
    start = lines.index("| pair kind | micro-F1 | support |")
    assert lines[start + 2 : start + 6] == [
        "| text-text | 1.0000 | 5 |",
        "| object-object | 0.1250 | 3 |",
        "| zz-kind | 0.0625 | 1 |",
        "",
    ]
    assert "Selected at epoch 4 of 6 on dev micro-F1 0.7000." in lines
    start = lines.index("| param | value |")
    rows = lines[start + 2 : lines.index("", start)]
    assert [row.split("`")[1] for row in rows] == [
        "data.source", "model.text_model", "model.vision_model", "model.pretrained",
        "data.max_seq", "data.max_objects", "data.use_depth", "data.use_box", "data.use_caption",
        "caption.backend", "depth.source", "model.ot.enabled", "model.ot.epsilon",
        "model.ot.iterations", "model.moe.enabled", "train.seed",
        "train.epochs", "train.batch_size", "train.num_processes", "train.grad_accum", "train.lr",
        "train.threads",
    ]  # fmt: skip
    # The model's own values (here off the paper preset's: 6 epochs, lr 2e-3, max_seq 48).
    for row in (
        "| `train.epochs` | `6` |",
        "| `train.lr` | `0.002` |",
        "| `data.max_seq` | `48` |",
    ):
        assert row in lines
    # Before evaluate: no metrics, no hash, and the same facts otherwise.
    before = model_card(params, ["none", "b_rel", "a_rel"], info).splitlines()
    assert "Not scored on test yet: the `evaluate` stage rewrites this card with them." in before
    assert "- dataset: `synthetic` (manifest hash: added by `evaluate`)" in before
    assert ModelCard("\n".join(before)).data.eval_results is None


def test_tensorboard_logs_the_loss_curve_dvclive_logs(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    params = small_params(**{"train.epochs": 1, "train.log_with": ["dvclive", "tensorboard"]})
    live = tmp_path / "live"
    train(params, world["features"], world["raw"], tmp_path / "m", live)
    steps, loss = read_live_metric(live, "train/loss")
    (run,) = (live / "tensorboard").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == steps.tolist() == list(range(1, 16))
    np.testing.assert_allclose([e.value for e in scalars], loss, rtol=1e-6)
    _, dev_f1 = read_live_metric(live, "dev/micro_f1")
    assert [e.value for e in events.Scalars("dev/micro_f1")] == pytest.approx(dev_f1.tolist())
    with pytest.raises(ValueError, match="must include dvclive"):
        train(small_params(**{"train.log_with": ["tensorboard"]}), world["features"],
              world["raw"], tmp_path / "m2", tmp_path / "live2")  # fmt: skip


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (``run-*.wandb``), decoded.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (CRC, length, type) before its bytes. A record
    that crosses a block boundary is split into FIRST/MIDDLE/LAST chunks, and a block's tail of
    under 7 bytes is padding. So a logged value is not always contiguous in the raw bytes: the
    records are put back together before they are read.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    block, header = 32768, 7
    full, first, last = 1, 2, 4
    pos, pending, out = header, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        chunk = data[pos + header : pos + header + length]
        pos += header + length
        pending = chunk if kind in (full, first) else pending + chunk
        if kind in (full, last):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def wandb_history(records: list[Any]) -> list[dict[str, Any]]:
    """The history rows (one per ``log`` call) of decoded W&B records, as key -> value."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


def test_wandb_logs_offline_the_values_dvclive_logs(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    params = small_params(**{"train.epochs": 1, "train.log_with": ["dvclive", "wandb"]})
    live = tmp_path / "live"
    train(params, world["features"], world["raw"], tmp_path / "m", live)
    (run,) = (live / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run)
    kinds = [record.WhichOneof("record_type") for record in records]
    assert kinds[-1] == "exit", f"{run}: W&B had not finished writing when train returned"
    rows = wandb_history(records)
    # Every value dvclive logged, W&B logged too, at the same step and to the float.
    for name, count in (("train/loss", 15), ("dev/micro_f1", 1)):
        steps, values = read_live_metric(live, name)
        assert len(values) == count
        logged = [(row["_step"], row[name]) for row in rows if name in row]
        assert logged == [(int(s), float(v)) for s, v in zip(steps, values, strict=True)], name
    (config,) = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    logged_params = {item.key: json.loads(item.value_json) for item in config.update}
    assert logged_params["train.seed"] == params.train.seed


# ---------------------------------------------------------------------------------------------
# Resuming, early stopping, several processes


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(world, tmp_path):
    params = small_params(**{"train.epochs": 3, "train.grad_accum": 2})
    args = (params, world["features"], world["raw"])
    full = train(*args, tmp_path / "a", tmp_path / "a_live")
    # 240 samples / 16 = 15 micro-batches -> 8 optimizer steps an epoch; stop inside epoch 2.
    with pytest.raises(TrainingInterrupted):
        train(*args, tmp_path / "b", tmp_path / "b_live", stop_after_step=11)
    assert not (tmp_path / "b" / "selected").exists()  # written only when training ends
    resume_like(full, args, tmp_path / "b", tmp_path / "b_live", (1, 8), (1, 2))
    # The logs have each step once, as in the uninterrupted run (steps 9-11 were logged twice).
    steps_a, loss_a = read_live_metric(tmp_path / "a_live", "train/loss")
    steps_b, loss_b = read_live_metric(tmp_path / "b_live", "train/loss")
    assert steps_b.tolist() == steps_a.tolist() == list(range(1, 25))
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
    best_a = load_trained(tmp_path / "a" / "checkpoint" / "best").model.state_dict()
    best_b = load_trained(tmp_path / "b" / "checkpoint" / "best").model.state_dict()
    assert_same_weights(best_a, best_b)

    # A finished checkpoint is not trained further; a params change makes it ignored.
    again = train(*args, tmp_path / "b", tmp_path / "b_live")
    assert (again.resumed_from_epoch, again.epochs_run) == (3, 0)
    changed = small_params(**{"train.epochs": 1, "train.lr": 1e-3})
    fresh = train(changed, world["features"], world["raw"], tmp_path / "b", tmp_path / "b_live")
    assert (fresh.resumed_from_epoch, fresh.epochs_run) == (0, 1)


def test_a_change_of_the_library_code_is_a_new_run(world, tmp_path, monkeypatch):
    from pipeline.train import checkpoint

    code = tmp_path / "code"
    (code / "model").mkdir(parents=True)
    (code / "model" / "moe.py").write_text("x = 1\n")
    print_of = lambda: checkpoint.run_fingerprint(  # noqa: E731
        small_params(), world["features"], ["none", "a"], code_dir=code
    )
    before = print_of()
    (code / "model" / "__pycache__").mkdir()
    (code / "model" / "__pycache__" / "moe.cpython-311.pyc").write_bytes(b"compiled")
    assert print_of() == before  # only the sources count
    (code / "model" / "moe.py").write_text("x = 2\n")
    assert print_of() != before
    # A finished run, then the code changes: train trains again instead of resuming it.
    params = small_params(**{"train.epochs": 1})
    args = (params, world["features"], world["raw"], tmp_path / "m", tmp_path / "live")
    assert train(*args).epochs_run == 1
    assert (train(*args).resumed_from_epoch, train(*args).epochs_run) == (1, 0)
    monkeypatch.setattr(checkpoint, "CODE_DIR", code)  # as if the library had been edited
    again = train(*args)
    assert (again.resumed_from_epoch, again.epochs_run) == (0, 1)


def test_the_run_fingerprint_changes_with_params_labels_feature_bytes_and_code(tmp_path):
    """What a checkpoint must match to be resumed: a run with other labels or other feature bytes
    is a new run (an unchanged label map and cache give the same fingerprint)."""
    from pipeline.train.checkpoint import run_fingerprint

    features, code = tmp_path / "features", tmp_path / "code"
    (features / "train").mkdir(parents=True)
    code.mkdir()
    shard = features / "train" / "samples.parquet"
    shard.write_bytes(b"cache v1")
    (code / "loop.py").write_text("x = 1\n")
    labels = ["none", "a", "b"]

    def fingerprint(params: Params | None = None, labels: list[str] = labels) -> str:
        return run_fingerprint(params or small_params(), features, labels, code_dir=code)

    base = fingerprint()
    assert fingerprint() == base
    assert fingerprint(labels=["none", "b", "a"]) != base  # the same names, other ids
    assert fingerprint(labels=["none", "a"]) != base
    assert fingerprint(small_params(**{"train.seed": 1})) != base
    shard.write_bytes(b"cache v2")
    assert fingerprint() != base
    shard.write_bytes(b"cache v1")
    assert fingerprint() == base
    (code / "loop.py").write_text("x = 2\n")
    assert fingerprint() != base


# What waits for the device: reading a tensor's value on the host (bool(), int(), float(), .item()).
HOST_READS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero"}


def _inside(event, name: str) -> bool:
    while event is not None:
        if event.name == name:
            return True
        event = event.cpu_parent
    return False


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "unclipped"])
def test_training_steps_never_wait_for_the_device(world, tmp_path, max_grad_norm):
    # The profiler sees every host read of a tensor value; inside the steps' ranges (forward,
    # backward, norm, finiteness check, update) there must be none, the OT regime's steps
    # included. The losses are read outside them, every log_every steps and at the epoch's end.
    from torch.profiler import ProfilerActivity, profile

    from pipeline.train.loop import STEP_RANGE

    params = small_params(
        **{"train.epochs": 1, "train.log_every": 5, "train.max_grad_norm": max_grad_norm}
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train(params, world["features"], world["raw"], tmp_path / "m", tmp_path / "live")
    events = prof.events()
    # 15 steps, each a forward/backward range and an update range
    assert sum(e.name == STEP_RANGE for e in events) == 2 * 15
    reads = [e for e in events if e.name in HOST_READS]
    # The CPU kernel of the fused AdamW reads its own CPU step counters with item(); its CUDA
    # kernel takes them as device tensors. Those are not waits for a device.
    inside = [
        e.name for e in reads if _inside(e, STEP_RANGE) and not _inside(e, "aten::_fused_adamw_")
    ]
    assert inside == []
    assert reads  # the reads the loop does make are visible to this check
    steps, _ = read_live_metric(tmp_path / "live", "train/loss")
    assert steps.tolist() == list(range(1, 16))  # every step still logged


@pytest.mark.slow
def test_compiled_training_logs_and_saves_what_eager_training_does(world, tmp_path, monkeypatch):
    # The loop's compile path: accelerate's dynamo plugin, the OT monitor's steps run eager, the
    # saved weights carry no compile wrapper. aot_eager traces the model as inductor would (the
    # same graphs and dynamic text length) and compiles in seconds; test_compile.py checks
    # inductor's numbers.
    import pipeline.train.loop as loop

    monkeypatch.setattr(loop, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        torch._dynamo.utils.counters.clear()  # they count over the process (earlier tests too)
        params = small_params(
            **{"train.epochs": 1, "train.log_every": 5, "train.compile": compiled}
        )
        live = tmp_path / f"live-{compiled}"
        result = train(params, world["features"], world["raw"], tmp_path / f"m-{compiled}", live)
        runs[compiled] = (result, live)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled, graphs
    (eager, eager_live), (compiled, compiled_live) = runs[False], runs[True]
    saved = load_trained(compiled.best_dir).model.state_dict()
    assert saved.keys() == eager.model.state_dict().keys()
    for name in ("train/loss", "ot/all/share_above_floor"):
        steps, values = read_live_metric(compiled_live, name)
        eager_steps, eager_values = read_live_metric(eager_live, name)
        assert steps.tolist() == eager_steps.tolist()
        np.testing.assert_allclose(values, eager_values, rtol=1e-3)
    assert compiled.history[0]["dev_micro_f1"] == pytest.approx(
        eager.history[0]["dev_micro_f1"], abs=0.05
    )


def test_same_machine_and_threads_give_byte_identical_models(world, tmp_path):
    params = small_params(**{"train.epochs": 2, "train.deterministic": True})
    for name in ("a", "b"):
        train(params, world["features"], world["raw"], tmp_path / name, tmp_path / f"{name}_live")
    a, b = (
        (tmp_path / n / "checkpoint" / "best" / "model.safetensors").read_bytes()
        for n in ("a", "b")
    )
    assert a == b
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == params.train.threads


def test_set_determinism_sets_threads_and_leaves_zero_to_torch():
    from pipeline.device import set_determinism

    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        set_determinism(3, False)
        assert torch.get_num_threads() == 3 and not torch.are_deterministic_algorithms_enabled()
        set_determinism(0, True)
        assert torch.get_num_threads() == 3 and torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def test_a_diverging_run_stops_before_the_update_and_saves_nothing(world, tmp_path):
    from pipeline.train.loop import TrainingDiverged

    # lr 1e30: the first update blows the weights up, the next step's loss is not finite.
    params = small_params(**{"train.lr": 1e30, "train.warmup_ratio": 0.0, "train.epochs": 1})
    with pytest.raises(TrainingDiverged, match=r"step \d+: loss (nan|inf)") as info:
        train(params, world["features"], world["raw"], tmp_path / "m", tmp_path / "live")
    assert "models/checkpoint/best keeps the last finite epoch's model" in str(info.value)
    assert not (tmp_path / "m" / "checkpoint" / "best").exists()
    assert not (tmp_path / "m" / "checkpoint").exists()


def test_a_corrupt_checkpoint_says_how_to_restart(world, tmp_path):
    from pipeline.train.checkpoint import CorruptCheckpointError

    params = small_params(**{"train.epochs": 2})
    args = (params, world["features"], world["raw"], tmp_path / "m", tmp_path / "live")
    with pytest.raises(TrainingInterrupted):
        train(*args, stop_after_step=16)  # epoch 1 (15 steps) is checkpointed
    ckpt = tmp_path / "m" / "checkpoint"
    shutil.copytree(ckpt, tmp_path / "saved")
    state = ckpt / "optimizer.bin"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(
        CorruptCheckpointError, match=r"checkpoint: cannot read the checkpoint .*delete"
    ):
        train(*args)
    # accelerate skips an unreadable RNG file with a log line: here it is an error too, since
    # the run would not continue as it started
    shutil.rmtree(ckpt)
    shutil.copytree(tmp_path / "saved", ckpt)
    (ckpt / "random_states_0.pkl").write_bytes(b"not a pickle")
    with pytest.raises(
        CorruptCheckpointError, match=r"checkpoint: cannot read the checkpoint \(UnpicklingError"
    ):
        train(*args)


def test_early_stopping_after_patience_epochs_without_gain(world, tmp_path):
    # lr 0: dev F1 never changes, so it never rises after epoch 1 and patience 2 stops after
    # epoch 3; every epoch ties, and the selection keeps the last (the original's `>=`).
    params = small_params(**{"train.lr": 0.0, "train.epochs": 10, "train.patience": 2})
    result = train(params, world["features"], world["raw"], tmp_path / "m", tmp_path / "live")
    assert result.stopped_early and result.best_epoch == 3
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert json.loads((tmp_path / "m" / "checkpoint" / "meta.json").read_text())["finished"]


WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_train import small_params
    from pipeline.train.loop import train

    params = small_params(**json.loads({overrides!r}))
    out = Path({out!r})
    result = train(params, {features!r}, {raw!r}, out / "models", out / "live")
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
    (out / f"rank{{os.environ['RANK']}}.txt").write_text(digest.hexdigest())
    """
)


@pytest.mark.slow
def test_two_cpu_processes_finish_with_identical_weights(world, tmp_path):
    overrides = {"train.epochs": 2, "train.batch_size": 8}
    script = tmp_path / "worker.py"
    script.write_text(
        WORKER.format(
            tests=str(Path(__file__).parent),
            overrides=json.dumps(overrides),
            out=str(tmp_path),
            features=str(world["features"]),
            raw=str(world["raw"]),
        )  # fmt: skip
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*cmd, str(script)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    digests = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    # Rank 0 alone wrote the outputs; the logged step count reflects the halved per-process data.
    steps, _ = read_live_metric(tmp_path / "live", "train/loss")
    per_epoch = -(-SMALL["data.synthetic.train"] // (2 * overrides["train.batch_size"]))
    assert steps.tolist() == list(range(1, 2 * per_epoch + 1))
    assert load_trained(tmp_path / "models" / "checkpoint" / "best").info["num_processes"] == 2


@pytest.mark.parametrize("processes", [2, 3])
def test_train_stage_relaunches_itself_for_several_processes(tmp_path, monkeypatch, processes):
    import subprocess as sp

    from typer.testing import CliRunner

    from stages.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        yaml.safe_dump(params_to_dict(small_params(**{"train.num_processes": processes})))
    )
    from stages.common import LOCKS_HELD_ENV

    launched = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(LOCKS_HELD_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # the locks beside m/ and l/
    monkeypatch.setattr(
        sp,
        "run",
        lambda cmd, check, env: launched.append((cmd, env)) or sp.CompletedProcess(cmd, 0),
    )
    paths = ["--features", "f", "--dataset", "d", "--out", "m", "--live", "l"]
    result = CliRunner().invoke(app, ["train", "--params", str(params_file), *paths])
    assert result.exit_code == 0, result.output
    ((cmd, env),) = launched
    nproc = f"--nproc_per_node={processes}"
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", nproc, "-m"]
    assert cmd[6:] == ["stages", "train", "--params", str(params_file), *paths]
    # The launched processes write under this one's locks; this process's environment is as it was.
    assert env[LOCKS_HELD_ENV] == "1" and LOCKS_HELD_ENV not in os.environ


def test_originals_protocol_freezes_the_head_and_reports_test_each_epoch(
    world, tmp_path, monkeypatch
):
    """train.optimize=original: M and the classifier keep their init while the rest trains;
    train.report_test_each_epoch: test micro-F1 per epoch in dvclive, and evaluate reports the
    best-test-epoch figure beside the dev-selected one."""
    from pipeline.evaluate.report import evaluate_model
    from pipeline.train import loop

    params = small_params(
        **{"train.epochs": 2, "train.optimize": "original", "train.report_test_each_epoch": True}
    )
    initial = {}
    build = loop.build_model

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        initial.update(weights(model))
        return model

    monkeypatch.setattr(loop, "build_model", recording_build)
    out, live = tmp_path / "models", tmp_path / "dvclive"
    result = train(params, world["features"], world["raw"], out, live)
    final = weights(result.model)
    head = [k for k in final if k.startswith("head.")]
    assert head and all(torch.equal(final[k], initial[k]) for k in head)
    changed = [
        k for k in final if k.startswith("encoder.") and not torch.equal(final[k], initial[k])
    ]
    assert changed  # everything else trains

    _, test_f1 = read_live_metric(live, "test/micro_f1")
    assert len(test_f1) == 2 and [e["test_micro_f1"] for e in result.history] == list(test_f1)
    scores = evaluate_model(
        out / "checkpoint" / "best",
        world["features"],
        tmp_path / "metrics",
        tmp_path / "plots",
        live,
        64,
    )
    best = int(np.argmax(test_f1))
    assert scores["selected_on_test"] == {
        "micro_f1": pytest.approx(test_f1[best]),
        "epoch": best + 1,
    }
    assert (
        scores["selected_on_test"]["micro_f1"]
        >= max(scores["micro_f1"], test_f1[result.best_epoch - 1]) - 1e-9
    )
    written = json.loads((tmp_path / "metrics" / "test.json").read_text())
    assert written["selected_on_test"]["epoch"] == best + 1


def test_reporting_test_each_epoch_leaves_the_dev_selected_run_unchanged(world, tmp_path):
    """Scoring test every epoch must not move the training RNG streams (a DataLoader iterator
    draws a seed from the global generator): same weights, same dev history."""
    args = (world["features"], world["raw"])
    plain = train(small_params(**{"train.epochs": 2}), *args, tmp_path / "a", tmp_path / "a_live")
    reported = train(
        small_params(**{"train.epochs": 2, "train.report_test_each_epoch": True}),
        *args, tmp_path / "b", tmp_path / "b_live",
    )  # fmt: skip
    assert_same_weights(weights(plain.model), weights(reported.model))
    without_test = [{k: v for k, v in e.items() if k != "test_micro_f1"} for e in reported.history]
    assert without_test == plain.history
    assert all("test_micro_f1" in e for e in reported.history)


def test_ot_regime_is_logged_in_training_and_written_by_evaluate(world, tmp_path):
    """train.log_every: the regime's keys reach dvclive (every such step, and the last values in
    metrics.json) without changing the run; evaluate writes metrics/ot_regime.json and its PNG."""
    from pipeline.evaluate.report import evaluate_model

    args = (world["features"], world["raw"])
    quiet = train(small_params(**{"train.epochs": 2, "train.log_every": 0}), *args,
                  tmp_path / "q", tmp_path / "q_live")  # fmt: skip
    params = small_params(**{"train.epochs": 2, "train.log_every": 3})
    out, live = tmp_path / "models", tmp_path / "dvclive"
    logged = train(params, *args, out, live)
    assert_same_weights(weights(quiet.model), weights(logged.model))
    assert not (tmp_path / "q_live" / "plots" / "metrics" / "ot").exists()

    layers = len(logged.model.encoder.text_transport)
    summary = json.loads((live / "metrics.json").read_text())["ot"]
    for stream in ("text", "vision"):
        assert sorted(summary[stream]) == [f"layer_{k:02d}" for k in range(1, layers + 1)]
        for values in summary[stream].values():
            assert set(values) == {
                "share_above_floor", "min_cost", "median_cost", "relative_update"
            }  # fmt: skip
            assert 0.0 <= values["share_above_floor"] <= 1.0
            assert 0.0 < values["min_cost"] <= values["median_cost"]
    steps, shares = read_live_metric(live, "ot/text/layer_01/share_above_floor")
    total_steps = logged.history[-1]["epoch"] * math.ceil(240 / 16)
    assert steps.tolist() == list(range(3, total_steps + 1, 3))

    evaluate_model(
        out / "checkpoint" / "best", world["features"], tmp_path / "m", tmp_path / "p", live, 64
    )
    regime = json.loads((tmp_path / "m" / "ot_regime.json").read_text())
    assert regime["mode"] == "transport" and regime["threshold_cost"] == pytest.approx(
        22.13, abs=0.01
    )
    assert sorted(regime["text"]) == sorted(summary["text"])
    assert 0.0 <= regime["all"]["share_above_floor"] <= 1.0
    assert (tmp_path / "p" / "ot_regime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_uniform_mode_trains_without_projections(world, tmp_path):
    """model.ot.mode=uniform: the transport layers hold only their scalar w; the run trains and
    evaluates, and the regime report has the update size only."""
    from pipeline.evaluate.report import evaluate_model

    params = small_params(**{"train.epochs": 1, "model.ot.mode": "uniform", "train.log_every": 5})
    out, live = tmp_path / "models", tmp_path / "dvclive"
    result = train(params, world["features"], world["raw"], out, live)
    ot_keys = [k for k in weights(result.model) if "_transport." in k]
    assert ot_keys and all(k.endswith(".weight") and k.count(".") == 3 for k in ot_keys)
    evaluate_model(
        out / "checkpoint" / "best", world["features"], tmp_path / "m", tmp_path / "p", live, 64
    )
    regime = json.loads((tmp_path / "m" / "ot_regime.json").read_text())
    assert regime["mode"] == "uniform" and "all" not in regime
    assert set(regime["vision"]["layer_01"]) == {"relative_update"}
    assert (
        load_trained(out / "checkpoint" / "best").model.encoder.text_transport[0].weight.shape == ()
    )


# ---------------------------------------------------------------------------------------------
# Diagnostic: bench.depth_probe


def test_ridge_r2_is_the_held_out_r2_of_a_least_squares_fit():
    from bench.depth_probe import ridge_r2

    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 5))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.7 + rng.normal(scale=0.5, size=200)
    order = np.random.default_rng(9).permutation(200)
    fit, held = order[:100], order[100:]
    design = np.hstack([x, np.ones((200, 1))])
    coef = np.linalg.lstsq(design[fit], y[fit], rcond=None)[0]
    pred = design[held] @ coef
    sse = sum((p - t) ** 2 for p, t in zip(pred, y[held], strict=True))
    sst = sum((t - y[held].mean()) ** 2 for t in y[held])
    assert ridge_r2(x, y, seed=9) == pytest.approx(1 - sse / sst, rel=1e-6)
    assert 0.9 < ridge_r2(x, y, seed=9) < 1
    assert ridge_r2(rng.normal(size=(200, 5)), y, seed=9) < 0.1  # features unrelated to y


def test_depth_probe_reads_the_models_own_tokens_and_each_objects_depth_level(
    world, trained, tmp_path
):
    from bench.depth_probe import PLACES, main, object_states
    from pipeline.features.dataset import FeatureDataset

    folder = trained["out"] / "checkpoint" / "best"
    loaded = load_trained(folder)
    model, params = loaded.model, loaded.params
    data = FeatureDataset.load(world["features"], "test", params, loaded.labels)
    batch = data.batch([0, 1, 2])
    with torch.inference_mode():
        states, levels = object_states(model, batch)
        tokens = model.object_embeddings(batch["pixel_values"], batch["depth_values"])
        last = model.encode(batch).vision[-1]
    per_object = model.object_embeddings.tokens_per_object
    rows = [(b, s) for b in range(3) for s in range(int(batch["num_objects"][b]))]
    assert len(levels) == len(rows) and all(len(states[k]) == len(rows) for k in PLACES)
    for row, (b, s) in enumerate(rows):
        image = data.image_index[b]
        size = data.depth_crops.shape[-1]
        assert levels[row] == np.float32(data.depth_crops[image, s, size // 2, size // 2])
        own = tokens[b, per_object * s + per_object // 2 : per_object * (s + 1)]  # depth tokens
        np.testing.assert_allclose(states["after_pre_norm"][row], own.mean(0), atol=1e-6)
        np.testing.assert_allclose(states["last_layer"][row], last[b, s], atol=1e-6)
    assert len(set(levels.tolist())) > 1  # objects at several depths

    report = main(["--model", str(folder), "--features", str(world["features"]),
                   "--threads", "1", "--out", str(tmp_path / "probe.json")])  # fmt: skip
    assert json.loads((tmp_path / "probe.json").read_text()) == report
    assert report["depth_embedding"] == "tokens" and set(report["r2"]) == set(PLACES)
    assert report["objects"] == sum(int(data.num_objects[i]) for i in np.unique(data.image_index))

    no_depth = small_params(**{"data.use_depth": False})
    from pipeline.model.remote import build_model

    blind = build_model(no_depth, len(loaded.labels), loaded.tokenizer)
    with pytest.raises(ValueError, match="without depth"):
        object_states(blind, batch)
