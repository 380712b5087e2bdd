"""The OT regime: the floor threshold in float32, the monitor's statistics against direct counts,
and ``model.ot.mode: uniform`` against the transport it stands for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.model.ot import MultilevelTransport, UniformTransport
from pipeline.model.regime import (
    BINS,
    LOG_HIGH,
    LOG_LOW,
    RegimeStats,
    flat_regime,
    floor_threshold,
    record_regime,
    regime_summary,
)

EPS, FLOOR = 0.5, 1e-12


def test_floor_threshold_is_where_float32_loses_the_entry():
    """``exp(-C/eps) + floor`` equals ``floor`` in float32 a little above the threshold, and not a
    little below it (the issue's 22.1 for eps 0.5, floor 1e-12)."""
    threshold = floor_threshold(EPS, FLOOR)
    assert threshold == pytest.approx(EPS * (math.log(1e12) + 24 * math.log(2)))
    assert 22.0 < threshold < 22.2
    floor = np.float32(FLOOR)
    above = np.float32(np.exp(-(threshold + 0.3) / EPS)) + floor
    below = np.float32(np.exp(-(threshold - 0.3) / EPS)) + floor
    assert above == floor and below != floor
    assert floor_threshold(EPS, 0.0) == math.inf  # pure entropic OT: every entry counts


def test_stats_on_crafted_costs_match_a_direct_count():
    generator = torch.Generator().manual_seed(0)
    costs = [torch.rand(3, 7, 11, generator=generator) * 40 for _ in range(2)]
    masks = [torch.rand(3, 7, 11, generator=generator) > 0.3, None]
    stats = RegimeStats(floor_threshold(EPS, FLOOR))
    for cost, mask in zip(costs, masks, strict=True):
        stats.add_cost(cost, mask)
    values = torch.cat([costs[0][masks[0]], costs[1].reshape(-1)]).double()
    # The definition, counted directly: entries whose exp(-C/eps) exceeds floor * 2^-24.
    direct = int((torch.exp(-values / EPS) > FLOOR * 2.0**-24).sum())
    summary = stats.summary()
    assert stats.entries == values.numel()
    assert summary["share_above_floor"] == direct / values.numel()
    assert 0.2 < summary["share_above_floor"] < 0.8  # the crafted costs straddle the threshold
    assert summary["min_cost"] == pytest.approx(float(values.min()), rel=1e-6)
    bin_ratio = 10 ** ((LOG_HIGH - LOG_LOW) / BINS)
    assert summary["median_cost"] == pytest.approx(float(np.median(values)), rel=bin_ratio - 1)


def test_stats_merge_exactly_over_batches():
    """Counts and sums over two batches equal those over their concatenation."""
    generator = torch.Generator().manual_seed(1)
    cost = torch.rand(4, 5, 6, generator=generator) * 30
    whole, parts = RegimeStats(22.0), RegimeStats(22.0)
    whole.add_cost(cost, None)
    parts.add_cost(cost[:1], None)
    parts.add_cost(cost[1:], None)
    assert (whole.entries, whole.above, whole.min_cost) == (
        parts.entries,
        parts.above,
        parts.min_cost,
    )
    assert torch.equal(whole.histogram, parts.histogram)


def transport_pair(hidden: int, barycentric: bool, solver: str = "fused"):
    torch.manual_seed(0)
    transport = MultilevelTransport(hidden, EPS, 50, FLOOR, barycentric, 1e-8, solver)
    uniform = UniformTransport(barycentric)
    with torch.no_grad():
        transport.weight.fill_(0.8)
        uniform.weight.fill_(0.8)
    return transport, uniform


def inputs(hidden: int, masked: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 6, hidden, generator=generator, requires_grad=True)
    s = torch.randn(2, 18, hidden, generator=generator, requires_grad=True)
    if not masked:
        return h, s, None, None
    h_mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    return h, s, h_mask, h_mask.repeat(1, 3)  # the source: three states of the same text


def grads(layer, h, s, h_mask, s_mask):
    out = layer(h, s, h_mask, s_mask)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # a loss that mixes all
    (out * weights).sum().backward()
    result = (out.detach(), layer.weight.grad.clone(), h.grad.clone(), s.grad.clone())
    h.grad = s.grad = None
    return result


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("barycentric", [False, True])
@pytest.mark.parametrize("solver", ["fused", "log_sinkhorn"])
def test_uniform_equals_transport_when_every_cost_is_above_the_threshold(
    masked, barycentric, solver
):
    """At D = 768 random inputs give costs near sqrt(2D) = 39, all above 22.1: the plan is the
    uniform one, so outputs and the gradients of everything the two share (w, h, S) agree."""
    transport, uniform = transport_pair(768, barycentric, solver)
    h, s, h_mask, s_mask = inputs(768, masked)
    with torch.no_grad():
        cost = torch.cdist(
            transport.query_norm(transport.query(h)), transport.key_norm(transport.key(s))
        )
    assert float(cost.min()) > floor_threshold(EPS, FLOOR)  # the precondition
    expected = grads(transport, h, s, h_mask, s_mask)
    got = grads(uniform, h, s, h_mask, s_mask)
    for name, a, b in zip(("output", "d w", "d h", "d S"), got, expected, strict=True):
        error = float((a - b).abs().max() / b.abs().max())
        assert error <= 1e-6, f"{name}: relative error {error:.2e}"
    if masked:  # padded rows get no update
        assert torch.equal(got[0][1, 4:], h.detach()[1, 4:])


@pytest.mark.parametrize("masked", [False, True])
def test_uniform_differs_from_transport_when_costs_are_small(masked):
    """At D = 16 costs are near 5.7, far below the threshold: the plan is not uniform, and the
    outputs differ (this would fail if `uniform` were silently used for `transport`)."""
    transport, uniform = transport_pair(16, False)
    h, s, h_mask, s_mask = inputs(16, masked)
    with record_regime_of(transport) as stats, torch.no_grad():
        a = transport(h, s, h_mask, s_mask)
    assert stats.summary()["share_above_floor"] == 1.0
    with torch.no_grad():
        b = uniform(h, s, h_mask, s_mask)
    update_gap = float((a - b).abs().max() / (a - h.detach()).abs().max())
    assert update_gap > 0.1


class _Holder(torch.nn.Module):
    """A model-shaped wrapper: record_regime looks for text_transport / vision_transport."""

    def __init__(self, text, vision=()):
        super().__init__()
        self.text_transport = torch.nn.ModuleList(text)
        self.vision_transport = torch.nn.ModuleList(vision)


class record_regime_of:
    """record_regime of one module, yielding its RegimeStats."""

    def __init__(self, layer):
        self.context = record_regime(_Holder([layer]))

    def __enter__(self):
        return self.context.__enter__()["text"][0]

    def __exit__(self, *exc):
        return self.context.__exit__(*exc)


def test_monitor_in_the_transport_module_matches_direct_computation():
    """Inside record_regime a transport module reports, over the real entries only, the share of
    costs below the threshold, the smallest cost and ||w Pi S|| / ||h|| over the real rows."""
    transport, _ = transport_pair(24, False)
    h, s, h_mask, s_mask = inputs(24, True)
    h, s = h.detach() * 0.5, s.detach()
    with torch.no_grad(), record_regime_of(transport) as stats:
        out = transport(h, s, h_mask, s_mask)
    assert transport.regime is None  # detached on exit
    with torch.no_grad():
        cost = torch.cdist(
            transport.query_norm(transport.query(h)), transport.key_norm(transport.key(s))
        )
    valid = h_mask[:, :, None] & s_mask[:, None, :]
    real = cost[valid].double()
    update = (out - h)[h_mask]
    summary = stats.summary()
    assert stats.entries == int(valid.sum())
    assert summary["share_above_floor"] == float(
        (torch.exp(-real / EPS) > FLOOR * 2**-24).double().mean()
    )
    assert summary["min_cost"] == pytest.approx(float(real.min()), rel=1e-6)
    assert summary["relative_update"] == pytest.approx(
        float(update.norm() / h[h_mask].norm()), rel=1e-5
    )
    # Costs between the real entries only: a padded row or column would be near sqrt(2D) too,
    # but its count must not enter.
    assert stats.entries < cost.numel()


def test_uniform_module_reports_the_update_only():
    _, uniform = transport_pair(8, False)
    h, s = (t.detach() for t in inputs(8, False)[:2])
    with torch.no_grad(), record_regime_of(uniform) as stats:
        out = uniform(h, s)
    assert set(stats.summary()) == {"relative_update"}
    expected = float((out - h).norm() / h.norm())
    assert stats.summary()["relative_update"] == pytest.approx(expected, rel=1e-5)


def test_summary_names_layers_and_streams():
    a, b = RegimeStats(22.0), RegimeStats(22.0)
    a.add_cost(torch.tensor([[[10.0, 30.0]]]), None)
    b.add_cost(torch.tensor([[[40.0, 50.0]]]), None)
    stats = {"text": [a], "vision": [b]}
    summary = regime_summary(stats)
    assert summary["text"]["layer_01"]["share_above_floor"] == 0.5
    assert summary["vision"]["layer_01"]["share_above_floor"] == 0.0
    assert summary["all"] == {"share_above_floor": 0.25, "min_cost": 10.0}
    flat = flat_regime(stats)
    assert flat["ot/text/layer_01/min_cost"] == 10.0 and flat["ot/all/share_above_floor"] == 0.25


@pytest.mark.parametrize("pad_to_max", [False, True])
def test_uniform_model_equals_a_floored_transport_model(pad_to_max):
    """End to end: a tiny REMOTE whose OT LayerNorm gains are scaled up (every cost above the
    threshold, checked by the monitor) gives the logits and gradients of the same weights in
    model.ot.mode=uniform, which keeps running sums of the states instead of concatenating them."""
    from torch.nn import functional as F

    from pipeline.config import default_params
    from pipeline.model.example import random_batch
    from pipeline.model.remote import build_model
    from pipeline.text import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    overrides = {"data.max_objects": 4, "data.pad_to_max": pad_to_max}
    torch.manual_seed(0)
    transport = build_model(default_params(overrides), 28, tokenizer).eval()
    with torch.no_grad():
        for stream in (transport.encoder.text_transport, transport.encoder.vision_transport):
            for layer in stream:
                layer.query_norm.weight.mul_(4.0)
                layer.key_norm.weight.mul_(4.0)
                layer.weight.uniform_(0.5, 1.5)
    uniform = build_model(default_params({**overrides, "model.ot.mode": "uniform"}), 28, tokenizer)
    result = uniform.eval().load_state_dict(transport.state_dict(), strict=False)
    assert not result.missing_keys
    assert result.unexpected_keys and all(
        k.split(".")[-2] in ("query", "key", "query_norm", "key_norm")
        for k in result.unexpected_keys
    )
    batch = random_batch(
        tokenizer, [9, 14, 6, 11], max_objects=4, pad_to=48 if pad_to_max else None
    )
    outputs = {}
    for name, model in (("transport", transport), ("uniform", uniform)):
        model.zero_grad()
        with record_regime(model) as stats:
            logits = model(batch)
        F.cross_entropy(logits, batch["labels"]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs[name] = (logits.detach(), grads, regime_summary(stats))
    assert outputs["transport"][2]["all"]["share_above_floor"] == 0.0  # the precondition
    logits, grads = outputs["uniform"][:2]
    expected_logits, expected_grads = outputs["transport"][:2]
    assert float((logits - expected_logits).abs().max() / expected_logits.abs().max()) < 1e-5
    assert grads.keys() <= expected_grads.keys()
    scale = max(float(g.abs().max()) for g in expected_grads.values())
    worst = max(float((grads[n] - expected_grads[n]).abs().max()) for n in grads)
    assert worst <= 1e-5 * scale


def test_the_median_is_read_at_its_bins_centre_and_extreme_costs_land_in_the_end_bins():
    width = (LOG_HIGH - LOG_LOW) / BINS  # 0.002 decades
    stats = RegimeStats(22.0)
    stats.add_cost(torch.tensor([[[1.0, 10.0, 100.0]]]), None)  # bins 1500, 2000 and 2500
    assert stats.median_cost() == pytest.approx(10 ** (1 + width / 2), rel=1e-9)
    low = RegimeStats(22.0)
    low.add_cost(torch.tensor([[[1e-5, 1e-5, 3e4]]]), None)  # below and above the histogram
    assert low.median_cost() == pytest.approx(10 ** (LOG_LOW + width / 2), rel=1e-9)
    assert low.histogram[0] == 2 and low.histogram[-1] == 1
    assert low.summary()["min_cost"] == pytest.approx(1e-5)
    # Padding counts nowhere: not in the smallest cost, not in the share above the floor.
    masked = RegimeStats(22.0)
    masked.add_cost(torch.tensor([[[1.0, 5.0, 30.0]]]), torch.tensor([[[False, True, True]]]))
    assert masked.summary()["min_cost"] == 5.0 and masked.summary()["share_above_floor"] == 0.5


def test_nothing_recorded_gives_an_empty_summary():
    stats = RegimeStats(22.0)
    assert stats.summary() == {} and math.isnan(stats.median_cost())
    stats.add_cost(torch.ones(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool))  # all padding
    assert stats.summary() == {}
    assert regime_summary({"text": [stats], "vision": []}) == {"text": {"layer_01": {}}}


def test_a_paused_monitor_adds_nothing_and_resumes_after_the_block():
    from pipeline.model.regime import regime_paused

    stats = RegimeStats(22.0)
    cost, hidden = torch.tensor([[[10.0, 30.0]]]), torch.ones(1, 2, 4)
    with regime_paused():
        with regime_paused():
            stats.add_cost(cost, None)
        stats.add_update(hidden, hidden, None)
    assert stats.summary() == {}
    stats.add_cost(cost, None)
    stats.add_update(hidden, 0.5 * hidden, None)
    assert stats.summary() == {
        "share_above_floor": 0.5, "min_cost": 10.0, "median_cost": stats.median_cost(),
        "relative_update": 0.5,
    }  # fmt: skip
