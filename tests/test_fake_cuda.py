"""The CUDA code paths on a machine without CUDA: forwards on fake CUDA tensors.

``FakeTensorMode`` tensors carry a device, shape and dtype but no data, and an operator that
mixes devices raises as it would on a GPU. So a tensor made on the CPU inside the model (a
``torch.arange`` without ``device=``, an attribute that ``.to()`` does not move), a CUDA-only
branch that breaks, or an autocast dtype that leaks shows up here, in every CI run, instead of in
the rare minutes of a lent GPU (``tests/test_gpu.py``, ``python -m bench.device``).

What this cannot run: the backward (the autograd engine starts a CUDA device thread), anything
that reads values (``.item()``, ``.numpy()``) and the compiled model. The GPU tests cover those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.memory import to_fake
from pipeline.config import default_params
from pipeline.model.example import random_batch
from pipeline.model.regime import record_regime
from pipeline.model.remote import build_model
from pipeline.text import load_tokenizer

CUDA = torch.device("cuda", 0)
SLOTS = 4
MAX_SEQ = 48


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """A fake-tensor mode in which CUDA tensors and CUDA autocast work without a GPU (autocast
    checks for a driver before it turns on; the dispatcher's autocast needs none)."""
    with (
        mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
        mock.patch("torch.cuda.is_bf16_supported", return_value=True),
        FakeTensorMode(allow_non_fake_inputs=True) as mode,
    ):
        yield mode


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_a_tensor_left_on_the_cpu_is_caught():
    """The check itself: a module that adds a tensor made on the CPU fails on fake CUDA."""

    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x) + torch.arange(4.0)  # no device=: on the CPU

    module = Leaky()
    with fake_cuda() as mode:
        x = to_fake(module, {"x": torch.zeros(2, 4)}, mode, CUDA)["x"]
        # FakeTensorDeviceMismatchError in recent torch, a plain RuntimeError before 2.12
        with pytest.raises(RuntimeError, match=r"two .*devices.*cuda:0.*cpu"):
            module(x)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"data.pad_to_max": True, "model.ot.solver": "log_sinkhorn", "model.ot.clamp": 50.0},
        {"model.ot.solver": "sinkhorn"},
        {"model.ot.mode": "uniform"},
    ],
    ids=["default", "paper-ot-pad-to-max", "pot-sinkhorn", "uniform"],
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_the_training_forward_runs_on_cuda(tokenizer, overrides, precision, checkpointing):
    """The training forward (dropout on), with the OT-regime monitor recording, under bf16
    autocast or not, with gradient checkpointing or not: logits on the GPU, in the autocast
    dtype, and the monitor's running sums on the GPU too (it never waits for the device)."""
    params = default_params(
        {"data.max_objects": SLOTS, "data.max_seq": MAX_SEQ, "model.ot.iterations": 3, **overrides}
    )
    torch.manual_seed(0)
    model = build_model(params, 28, tokenizer).train()
    model.encoder.gradient_checkpointing = checkpointing
    pad_to = MAX_SEQ if params.data.pad_to_max else None
    batch = random_batch(tokenizer, [8, 9, 12], max_objects=SLOTS, pad_to=pad_to, seed=0)
    batch["text_padded"] = True
    with fake_cuda() as mode:
        inputs = to_fake(model, batch, mode, CUDA)
        bf16 = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
        with record_regime(model) as regime, bf16:
            logits = model(inputs)
    assert logits.device == CUDA
    assert logits.shape == (3, 28)
    assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    sums = [
        value
        for stats in regime.values()
        for module_stats in stats
        for value in (module_stats.entries, module_stats.hidden_sq)
        if torch.is_tensor(value)
    ]
    assert sums and all(value.device == CUDA for value in sums)


def test_the_evaluation_forward_runs_on_cuda(tokenizer):
    """Evaluation's forward: eval mode, inference mode, no padding in the batch."""
    params = default_params({"data.max_objects": SLOTS, "model.ot.iterations": 3})
    model = build_model(params, 28, tokenizer).eval()
    batch = random_batch(tokenizer, [10, 10], max_objects=SLOTS, seed=1)
    batch["text_padded"] = False
    with fake_cuda() as mode, torch.inference_mode():
        logits = model(to_fake(model, batch, mode, CUDA))
    assert logits.device == CUDA and logits.shape == (2, 28)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_depth_forward_runs_on_cuda(dtype):
    """The depth stage's GPU path: uint8 images resized and normalized on the device
    (``prepare_batch``), channels-last input and weights, autocast."""
    from pipeline.depth.model import input_settings, prepare_batch, tiny_depth_model

    # what place_depth_model does on a GPU: channels-last weights, then the move
    model = tiny_depth_model().to(memory_format=torch.channels_last)
    lower_bound, multiple = input_settings(model)
    images = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8) for _ in range(2)]
    with fake_cuda() as mode:
        to_fake(model, {}, mode, CUDA)
        fake_images = [mode.from_tensor(image) for image in images]  # on the CPU, as read
        convolutions = [p for p in model.parameters() if p.dim() == 4]
        assert convolutions and all(p.device == CUDA for p in model.parameters())
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
        with torch.inference_mode():
            batch = prepare_batch(fake_images, lower_bound, multiple, CUDA)
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=dtype):
                depth = model(pixel_values=batch)
    assert batch.device == CUDA and batch.dtype == torch.float32
    assert depth.predicted_depth.device == CUDA
    assert depth.predicted_depth.shape[0] == 2


@pytest.mark.parametrize("solver", ["fused", "log_sinkhorn"])
@pytest.mark.parametrize("clamp", [0.0, 1e-8])
def test_the_sinkhorn_operators_run_on_cuda_forward_and_backward(solver, clamp):
    """The custom operators' own bodies (a fake tensor only meets their fake kernels, and the
    backward cannot run here): forward and written-out backward on CUDA, in float32 under bf16
    autocast, one batch chunk (chunks are a CPU cache measure)."""
    from pipeline.model import ot

    forward, backward = {
        "fused": (ot._fused_forward, ot._fused_backward),
        "log_sinkhorn": (ot._log_forward, ot._log_backward),
    }[solver]
    batch, rows, columns, iterations = 3, 5, 7, 4
    with fake_cuda() as mode, torch.autocast("cuda", dtype=torch.bfloat16):
        problems = mode.from_tensor(torch.rand(batch, rows, columns)).to(CUDA)
        rows_mass = mode.from_tensor(torch.full((batch, rows), 1 / rows)).to(CUDA)
        columns_mass = mode.from_tensor(torch.full((batch, columns), 1 / columns)).to(CUDA)
        grad_plan = mode.from_tensor(torch.rand(batch, rows, columns)).to(CUDA, torch.bfloat16)
        if solver == "fused":
            plan, *vectors = forward._init_fn(problems, rows_mass, columns_mass, iterations, clamp)
            grad = backward._init_fn(grad_plan, problems, *vectors, clamp)
        else:
            plan, *vectors = forward._init_fn(
                problems, rows_mass, columns_mass, 0.5, iterations, clamp
            )
            grad = backward._init_fn(grad_plan, problems, plan, *vectors, 0.5, clamp)
        fake = ot._solve_outputs(problems, iterations)
    for real, expected in zip((plan, *vectors), fake, strict=True):
        assert (real.device, real.dtype, real.shape) == (CUDA, torch.float32, expected.shape)
    assert (grad.device, grad.dtype, grad.shape) == (CUDA, torch.float32, problems.shape)
