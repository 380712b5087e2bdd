"""The OT regime monitor: does the multilevel transport transport anything?

The original's kernel is ``exp(-C/eps) + floor``. In float32 an entry whose ``exp(-C/eps)`` is below
``floor * 2^-24`` adds nothing to the floor, so it cannot move the plan away from the uniform one:
once every entry is there (costs above ``eps * (ln(1/floor) + 24 ln 2)``, about 22.1 for the paper's
``eps = 0.5``, ``floor = 1e-12``), ``Pi S`` is ``mean(S) / n_q`` and the OT projections get no
gradient worth the name. Euclidean costs between LayerNormed unrelated vectors are about
``sqrt(2 D)``: 39 at the paper's D = 768, 11 at the embedded default's D = 64.

:func:`record_regime` attaches a :class:`RegimeStats` to every transport module of a model for the
forward passes run inside it. Each module adds, from what its forward already computed (no extra
pass), over the real (unpadded) entries: how many kernel entries sit above the floor, the smallest
cost, a log-spaced histogram of the costs (for the median) and the squared norms of the OT update
``w Pi S`` and of its input ``h``. The counts and sums merge exactly across batches; the median is
read from the histogram (bins 0.2% wide).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "STATS",
    "floor_threshold",
    "RegimeStats",
    "record_regime",
    "regime_paused",
    "regime_summary",
    "flat_regime",
]

# Every statistic a transport module reports; the uniform mode has no cost, so only the update.
STATS = ("share_above_floor", "min_cost", "median_cost", "relative_update")
# Histogram of log10(cost) over [LOG_LOW, LOG_HIGH]: 3500 bins of 10^(7/3500) = 1.0046 (0.46%:
# the median, read at a bin's geometric centre, is within 0.23% of the exact one). Costs outside
# the range land in the end bins; min_cost is tracked exactly.
LOG_LOW, LOG_HIGH, BINS = -3.0, 4.0, 3500
# float32 has a 24-bit significand: x + floor == floor for 0 <= x < floor * 2^-24.
FLOAT32_BITS = 24


def floor_threshold(epsilon: float, kernel_floor: float) -> float:
    """The cost above which ``exp(-C/eps)`` is below ``kernel_floor * 2^-24`` (lost in the floor);
    ``inf`` without a floor (pure entropic OT: every entry counts)."""
    if kernel_floor <= 0:
        return math.inf
    return epsilon * (math.log(1.0 / kernel_floor) + FLOAT32_BITS * math.log(2.0))


_paused = False  # set by regime_paused


@contextlib.contextmanager
def regime_paused() -> Iterator[None]:
    """Inside, :class:`RegimeStats` adds nothing: a checkpointed forward that the backward pass
    recomputes has been counted once already."""
    global _paused
    before, _paused = _paused, True
    try:
        yield
    finally:
        _paused = before


class RegimeStats:
    """What one transport module saw, merged over the batches it was called on.

    The sums stay on the device of the costs (adding a batch never waits for it); :meth:`summary`
    reads them."""

    def __init__(self, threshold: float | None) -> None:
        self.threshold = threshold  # None: the uniform mode (no cost, no kernel)
        # 0-d tensors (or 0 before the first batch): real entries, those above the floor, the
        # smallest cost, squared norms of the update and of its input; and the log-cost histogram
        self.entries: torch.Tensor | int = 0
        self.above: torch.Tensor | int = 0
        self.min_cost: torch.Tensor | float = math.inf
        self.histogram: torch.Tensor | int = 0
        self.update_sq: torch.Tensor | float = 0.0
        self.hidden_sq: torch.Tensor | float = 0.0

    @torch.no_grad()
    def add_cost(self, cost: torch.Tensor, valid: torch.Tensor | None) -> None:
        """``cost`` ``[B, n, m]``; ``valid`` ``[B, n, m]`` bool (True on real entries) or None."""
        if _paused:
            return
        values = cost.detach().float().reshape(-1)
        if valid is None:
            valid = torch.ones_like(values, dtype=torch.bool)
        valid = valid.reshape(-1)
        weight = valid.double()
        self.entries = self.entries + weight.sum()
        self.above = self.above + ((values < self.threshold) & valid).double().sum()
        self.min_cost = torch.minimum(
            torch.as_tensor(self.min_cost, device=values.device),
            torch.where(valid, values, math.inf).min(),
        )
        # torch.histc's bins, with padded entries weighted 0 (no boolean indexing: no sync)
        logs = values.clamp(min=10**LOG_LOW, max=10**LOG_HIGH).log10()
        bins = ((logs - LOG_LOW) * (BINS / (LOG_HIGH - LOG_LOW))).long().clamp(0, BINS - 1)
        counts = torch.zeros(BINS, dtype=torch.float64, device=values.device)
        self.histogram = self.histogram + counts.index_add_(0, bins, weight)

    @torch.no_grad()
    def add_update(
        self, hidden: torch.Tensor, update: torch.Tensor, row_mask: torch.Tensor | None
    ) -> None:
        """``hidden`` (the transport's input) and ``update`` (``w Pi S``) ``[B, n, D]``;
        ``row_mask`` ``[B, n]`` bool or None."""
        if _paused:
            return
        hidden_sq = hidden.detach().float().square().sum(-1)
        update_sq = update.detach().float().square().sum(-1)
        if row_mask is not None:
            hidden_sq, update_sq = hidden_sq * row_mask, update_sq * row_mask
        self.hidden_sq = self.hidden_sq + hidden_sq.double().sum()
        self.update_sq = self.update_sq + update_sq.double().sum()

    def median_cost(self) -> float:
        histogram = torch.as_tensor(self.histogram, dtype=torch.float64).cpu()
        total = float(histogram.sum())
        if total == 0:
            return math.nan
        rank = int(torch.searchsorted(histogram.cumsum(0), total / 2))
        width = (LOG_HIGH - LOG_LOW) / BINS
        return 10 ** (LOG_LOW + (min(rank, BINS - 1) + 0.5) * width)

    def summary(self) -> dict[str, float]:
        """``share_above_floor``, ``min_cost``, ``median_cost`` (transport mode only) and
        ``relative_update`` = ``||w Pi S|| / ||h||`` over the real tokens."""
        out = {}
        entries = int(self.entries)
        if self.threshold is not None and entries:
            out["share_above_floor"] = float(self.above) / entries
            out["min_cost"] = float(self.min_cost)
            out["median_cost"] = self.median_cost()
        hidden_sq = float(self.hidden_sq)
        if hidden_sq > 0:
            out["relative_update"] = math.sqrt(float(self.update_sq) / hidden_sq)
        return out


def _streams(model: nn.Module) -> dict[str, list[nn.Module]]:
    encoder = getattr(model, "encoder", model)
    return {
        stream: list(getattr(encoder, f"{stream}_transport", None) or [])
        for stream in ("text", "vision")
    }


@contextlib.contextmanager
def record_regime(model: nn.Module) -> Iterator[dict[str, list[RegimeStats]]]:
    """Record the regime of every transport module of ``model`` (a ``RemoteModel`` or its
    encoder) during the forward passes inside the block. Yields ``{"text": [...], "vision": [...]}``,
    one :class:`RegimeStats` per layer with OT (layer ``k + 1`` at index ``k``); empty lists when
    the model has no OT."""
    streams = _streams(model)
    stats = {}
    for stream, modules in streams.items():
        stats[stream] = []
        for module in modules:
            module.regime = RegimeStats(module.regime_threshold())
            stats[stream].append(module.regime)
    try:
        yield stats
    finally:
        for modules in streams.values():
            for module in modules:
                module.regime = None


def regime_summary(stats: dict[str, list[RegimeStats]]) -> dict[str, Any]:
    """``{stream: {"layer_01": {stat: value}, ...}}``: layer numbers as the encoder counts them (the
    first layer with OT is layer 1), zero-padded so that they sort. With a cost recorded, an
    ``all`` entry gives the share above the floor over every layer and stream."""
    out: dict[str, Any] = {
        stream: {f"layer_{k + 1:02d}": s.summary() for k, s in enumerate(layers)}
        for stream, layers in stats.items()
        if layers
    }
    every = [s for layers in stats.values() for s in layers if s.threshold is not None]
    entries = sum(int(s.entries) for s in every)
    if entries:
        out["all"] = {
            "share_above_floor": sum(float(s.above) for s in every) / entries,
            "min_cost": min(float(s.min_cost) for s in every),
        }
    return out


def flat_regime(stats: dict[str, list[RegimeStats]], prefix: str = "ot") -> dict[str, float]:
    """:func:`regime_summary` as flat ``ot/<stream>/layer_XX/<stat>`` keys (dvclive metrics)."""
    flat = {}
    for stream, layers in regime_summary(stats).items():
        if stream == "all":
            flat.update({f"{prefix}/all/{name}": value for name, value in layers.items()})
            continue
        for layer, values in layers.items():
            flat.update({f"{prefix}/{stream}/{layer}/{name}": v for name, v in values.items()})
    return flat
