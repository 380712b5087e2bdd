"""On CUDA: the model against the CPU, the fused Sinkhorn against POT, bf16 training steps, and the
depth, caption and train stages. Selected with ``pytest -m gpu`` (``python -m bench.device`` runs
them); skipped where there is no CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.nn import functional as F

from pipeline.config import params_to_dict

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parents[1]
SLOTS = 4
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def strict_fp32():
    """Full float32 products on the GPU (no TF32 in matmuls or convolutions): the comparisons
    with the CPU below are at float32 precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_model(**overrides):
    from pipeline.config import default_params
    from pipeline.model.remote import build_model
    from pipeline.text import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    model = build_model(default_params({"data.max_objects": SLOTS, **overrides}), 28, tokenizer)
    return model, tokenizer


def tiny_batch(tokenizer, pad_to=None):
    from pipeline.model.example import random_batch

    batch = random_batch(tokenizer, [8, 9, 12, 7], max_objects=SLOTS, pad_to=pad_to, seed=0)
    batch["text_padded"] = True
    return batch


def logits_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(batch)
    F.cross_entropy(logits, batch["labels"]).backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().cpu(), grads


def grad_errors(grads, reference):
    """Each tensor's largest difference over its largest entry, the denominator floored at 1e-3 of
    the largest gradient anywhere (gradients that are 0 in exact arithmetic hold rounding noise)."""
    floor = 1e-3 * max(g.abs().max() for g in reference.values())
    return {
        name: ((grads[name] - g).abs().max() / g.abs().max().clamp(min=floor)).item()
        for name, g in reference.items()
    }


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"data.pad_to_max": True, "data.max_seq": 32, "model.ot.solver": "log_sinkhorn"},
        {"model.ot.mode": "uniform"},
    ],
    ids=["default", "paper-ot-pad-to-max", "uniform"],
)
def test_model_on_cuda_equals_the_cpu(overrides):
    model, tokenizer = tiny_model(**overrides)
    pad_to = 32 if overrides.get("data.pad_to_max") else None
    batch = tiny_batch(tokenizer, pad_to)
    model.eval()  # no dropout: the two devices draw different masks
    cpu_logits, cpu_grads = logits_and_grads(model, batch)
    from pipeline.inference import to_device

    model.to(CUDA)
    logits, grads = logits_and_grads(model, to_device(batch, CUDA))
    assert rel_err(logits, cpu_logits) <= 1e-4
    assert grads.keys() == cpu_grads.keys() and len(grads) > 50
    errors = grad_errors(grads, cpu_grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (worst, errors[worst])


def test_fused_sinkhorn_on_cuda_matches_pot():
    from pipeline.model.ot import floored_cost, fused_sinkhorn_plan, sinkhorn_plan

    torch.manual_seed(10)
    distance = 4 * torch.rand(6, 40, 120)
    weights = torch.randn(6, 40, 120)
    rows = torch.full((6, 40), 1 / 40)
    columns = torch.full((6, 120), 1 / 120)
    rows[-1, 30:] = 0  # padding on the last problem
    rows[-1] /= rows[-1].sum()
    columns[-1, 100:] = 0
    columns[-1] /= columns[-1].sum()

    reference_cost = floored_cost(distance.double().requires_grad_(), 0.5, 1e-12)
    reference = sinkhorn_plan(
        reference_cost, 0.5, 50, rows.double(), columns.double(), solver="sinkhorn", clamp=0.0
    )
    (reference_grad,) = torch.autograd.grad((reference * weights.double()).sum(), reference_cost)

    cuda_distance = distance.to(CUDA).requires_grad_()
    plan = fused_sinkhorn_plan(
        torch.exp(-cuda_distance / 0.5) + 1e-12, rows.to(CUDA), columns.to(CUDA), 50, 0.0
    )
    (grad,) = torch.autograd.grad((plan * weights.to(CUDA)).sum(), cuda_distance)
    assert plan.is_cuda
    assert rel_err(plan.cpu(), reference) <= 1e-5
    # d/d distance = d/d cost through the floor (near 1 for costs far below it)
    assert rel_err(grad.cpu(), reference_grad) <= 1e-4
    assert plan[-1, 30:].abs().max() == 0 and plan[-1][:, 100:].abs().max() == 0


def test_bf16_autocast_training_steps_stay_finite_and_close_to_fp32():
    from pipeline.inference import to_device
    from pipeline.train.loop import build_optimizer

    losses = {}
    for precision in ("fp32", "bf16"):
        model, tokenizer = tiny_model(**{"model.dropout": 0.0})
        model.to(CUDA).train()
        batch = to_device(tiny_batch(tokenizer), CUDA)
        optimizer = build_optimizer(model, 1e-3, 0.01, True)
        losses[precision] = []
        for _ in range(10):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(batch)
            loss = F.cross_entropy(logits.float(), batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[precision].append(loss.item())
    fp32, bf16 = np.array(losses["fp32"]), np.array(losses["bf16"])
    assert np.isfinite(bf16).all()
    assert bf16[-1] < bf16[0]  # it learns
    np.testing.assert_allclose(bf16, fp32, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# The stages on CUDA


def run_stage(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "stages", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def gpu_world(tmp_path_factory):
    from test_train import build_world, small_params

    root = tmp_path_factory.mktemp("gpu")
    return build_world(root, small_params()), root


def write_params(path: Path, **overrides) -> Path:
    from test_train import small_params

    path.write_text(yaml.safe_dump(params_to_dict(small_params(**overrides))))
    return path


def test_depth_stage_on_cuda_equals_the_cpu(gpu_world, tmp_path):
    from pipeline.depth.store import DepthStore

    world, _ = gpu_world
    params = write_params(tmp_path / "params.yaml", **{"depth.source": "model"})
    maps = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"depth-{device}"
        # The stage keeps PyTorch's default of TF32 convolutions in cuDNN (as the original ran);
        # NVIDIA_TF32_OVERRIDE=0 turns TF32 off in cuDNN and cuBLAS for this comparison, whose
        # tolerance is the store's float16 step (TF32 emulated on the CPU: up to 1.6e-3 of the max).
        env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {"NVIDIA_TF32_OVERRIDE": "0"}
        result = run_stage(
            "depth", "--params", str(params), "--dataset", str(world["raw"]), "--out", str(out),
            env=env,
        )  # fmt: skip
        assert ("on cuda" in result.stderr) == (device == "cuda"), result.stderr[-2000:]
        store = DepthStore(out)
        maps[device] = {i: store.get(i) for i in store.ids()}
    assert maps["cuda"].keys() == maps["cpu"].keys() and maps["cuda"]
    # The store keeps float16 of map / scale (scale >= the map's largest magnitude): one float16
    # step of the scale apart at most, where the two devices' rounding lands on either side.
    for image_id, cpu_map in maps["cpu"].items():
        step = 2.0**-10 * np.abs(cpu_map).max()
        np.testing.assert_allclose(maps["cuda"][image_id], cpu_map, rtol=0, atol=step)


def test_caption_stage_runs_on_cuda(gpu_world, tmp_path):
    world, _ = gpu_world
    params = write_params(tmp_path / "params.yaml", **{"caption.backend": "mllm"})
    out = tmp_path / "captions"
    result = run_stage(
        "caption", "--params", str(params), "--dataset", str(world["raw"]), "--out", str(out)
    )
    assert "to generate with tiny (caption_v1) on cuda" in result.stderr, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(r["caption"], str) for r in rows)


def train_stage(world: dict, params: Path, tmp_path: Path) -> Path:
    """``python -m stages train`` into ``tmp_path``; returns the checkpoint folder."""
    out, live = tmp_path / "models", tmp_path / "live"
    result = run_stage(
        "train", "--params", str(params), "--features", str(world["features"]),
        "--dataset", str(world["raw"]), "--out", str(out), "--live", str(live),
    )  # fmt: skip
    assert "best dev micro-F1" in result.stdout
    metrics = json.loads((live / "metrics.json").read_text())
    assert np.isfinite(metrics["train"]["loss"])
    assert (out / "checkpoint" / "best" / "model.safetensors").is_file()
    return out / "checkpoint"


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_one_train_epoch_on_cuda_through_the_stage_command(gpu_world, tmp_path, precision):
    world, _ = gpu_world
    params = write_params(
        tmp_path / "params.yaml",
        **{"train.epochs": 1, "train.mixed_precision": precision, "train.threads": 0},
    )
    train_stage(world, params, tmp_path)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_processes_on_two_gpus_through_the_stage_command(gpu_world, tmp_path):
    world, _ = gpu_world
    params = write_params(tmp_path / "params.yaml", **{"train.epochs": 1, "train.num_processes": 2})
    checkpoint = train_stage(world, params, tmp_path)
    best = json.loads((checkpoint / "best" / "trained.json").read_text())
    assert best["info"]["num_processes"] == 2
