"""``train.compile``: the compiled model computes what the eager one does, in one graph."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch.nn import functional as F

from pipeline.config import default_params
from pipeline.model.example import random_batch
from pipeline.model.remote import build_model
from pipeline.text import load_tokenizer

SLOTS = 4
# Few Sinkhorn iterations: the compiled graph unrolls them, and compile time grows with them.
TINY = {"data.max_objects": SLOTS, "model.ot.iterations": 4}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def model_and_batch(tokenizer, **overrides):
    params = default_params({**TINY, **overrides})
    torch.manual_seed(0)
    model = build_model(params, 28, tokenizer)
    pad_to = params.data.max_seq if params.data.pad_to_max else None
    batch = random_batch(tokenizer, [8, 9, 12], max_objects=SLOTS, pad_to=pad_to, seed=0)
    batch["text_padded"] = True  # as FeatureDataset.batch says it: the model reads no device value
    return model, batch


def logits_and_grads(model, batch, forward=None):
    """Logits and every parameter's gradient by name; ``forward``: a compiled ``model``."""
    model.zero_grad(set_to_none=True)
    logits = (model if forward is None else forward)(batch)
    F.cross_entropy(logits, batch["labels"]).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.slow
def test_compiled_logits_and_gradients_equal_eager(tokenizer):
    # The paper's shape regime (every text padded to max_seq: static shapes). Inductor takes one
    # to three minutes on 2 cores for this tiny model. eval(): no dropout (eager and inductor draw
    # different masks); gradients still flow.
    model, batch = model_and_batch(tokenizer, **{"data.pad_to_max": True, "data.max_seq": 32})
    model.eval()
    eager_logits, eager_grads = logits_and_grads(model, batch)
    torch._dynamo.reset()
    logits, grads = logits_and_grads(model, batch, torch.compile(model, dynamic=False))
    assert not torch.equal(logits, eager_logits)  # it did compile: other kernels, other rounding
    assert rel_err(logits, eager_logits) <= 1e-4
    assert grads.keys() == eager_grads.keys() and len(grads) > 50
    # Relative to each tensor's largest entry, but not below 1e-3 of the largest gradient
    # anywhere: the attention key biases' gradient is 0 in exact arithmetic (softmax ignores
    # them), and what both runs hold there is rounding noise of 1e-12.
    floor = 1e-3 * max(g.abs().max() for g in eager_grads.values())
    errors = {
        name: ((grads[name] - g).abs().max() / g.abs().max().clamp(min=floor)).item()
        for name, g in eager_grads.items()
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (worst, errors[worst])


PAPER_OT = {  # the paper preset's OT: the log-domain operator with the original's clamp
    "model.ot.solver": "log_sinkhorn",
    "model.ot.kernel_floor": 1e-12,
    "model.ot.clamp": 1e-8,
}


@pytest.mark.parametrize(
    ("overrides", "checkpointing"),
    [
        ({}, False),  # the embedded default: fused Sinkhorn (an operator), per-batch padding
        ({"data.pad_to_max": True, "model.ot.solver": "fused"}, False),
        ({"data.pad_to_max": True, **PAPER_OT}, False),
        ({**PAPER_OT}, True),
        ({}, True),
        ({"model.ot.mode": "uniform"}, False),
        ({"model.ot.enabled": False, "model.moe.enabled": False}, False),
    ],
    ids=[
        "default",
        "pad-to-max",
        "paper-ot",
        "paper-ot-checkpointing",
        "checkpointing",
        "uniform",
        "no-ot-no-moe",
    ],
)
def test_the_whole_model_is_one_graph(tokenizer, overrides, checkpointing):
    model, batch = model_and_batch(tokenizer, **overrides)
    model.encoder.gradient_checkpointing = checkpointing
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.train())(batch)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons


def test_pot_plain_domain_solver_runs_eagerly_between_graphs(tokenizer):
    # POT's plain-domain solver (model.ot.solver: sinkhorn) recomputes under autograd in the
    # backward pass: it stays outside the graph, a break at each transport (3 layers x 2 streams
    # here; dynamo counts one per frame it leaves) and at nothing else.
    model, batch = model_and_batch(tokenizer, **{"model.ot.solver": "sinkhorn"})
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.train())(batch)
    assert explained.graph_break_count >= 2 * 3
    assert all("disable" in str(b.reason) for b in explained.break_reasons)


def test_without_the_padding_flag_the_mask_is_read_and_the_graph_breaks(tokenizer):
    # A caller that does not say whether the batch is padded costs a device read (documented).
    model, batch = model_and_batch(tokenizer)
    del batch["text_padded"]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.eval())(batch)
    assert explained.graph_break_count >= 1
    assert any(".item()" in str(b.reason) for b in explained.break_reasons)
