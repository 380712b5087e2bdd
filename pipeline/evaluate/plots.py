"""The evaluate stage's pictures (PNG, for people who would rather look than read): the confusion
matrix, the training curves read back from dvclive's logs, and the OT regime."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import atomic_write_bytes
from pipeline.metrics import confusion_matrix

__all__ = [
    "plot_confusion",
    "plot_training",
    "plot_ot_regime",
    "read_live_metric",
    "last_best_index",
]


def last_best_index(scores: np.ndarray) -> int:
    """The index of the last of equal maxima: the epoch training keeps on a tie (its ``>=``, as
    the original's)."""
    return len(scores) - 1 - int(np.argmax(scores[::-1]))


def _save_figure(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in dvc repro
    import matplotlib.pyplot as plt

    return plt


def _label_color(plt: Any, cmap: str, fraction: float) -> str:
    """Black or white, whichever reads better on ``cmap``'s colour at ``fraction`` (0..1) of its
    range: black on light cells, white on dark ones (relative luminance, ITU-R BT.709). A missing
    value (NaN) leaves its cell blank, so it gets black."""
    if not np.isfinite(fraction):
        return "black"
    red, green, blue, _ = plt.get_cmap(cmap)(float(np.clip(fraction, 0.0, 1.0)))
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.45 else "white"


def plot_confusion(
    path: str | Path,
    gold: Sequence[int] | np.ndarray,
    pred: Sequence[int] | np.ndarray,
    labels: Sequence[str],
) -> None:
    """A PNG of the confusion matrix (rows actual, columns predicted) over the labels that occur."""
    plt = _pyplot()
    matrix = confusion_matrix(gold, pred, len(labels))
    seen = np.flatnonzero(matrix.sum(0) + matrix.sum(1))
    matrix = matrix[np.ix_(seen, seen)]
    names = [labels[i] for i in seen]
    size = max(4.0, 0.45 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    shade = np.log1p(matrix)  # log scale: `none` would otherwise wash out the rest
    ax.imshow(shade, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    top = shade.max() if shade.size else 0.0
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            color = _label_color(plt, "Blues", shade[row, col] / top)
            ax.text(col, row, str(count), ha="center", va="center", fontsize=6, color=color)
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} samples)")
    _save_figure(fig, path)


def read_live_metric(live_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a metric logged by dvclive (``<live>/plots/metrics/<name>.tsv``)."""
    path = Path(live_dir) / "plots" / "metrics" / f"{name}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dvclive metric {name!r} not found")
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    column = Path(name).name
    steps = np.array([int(r["step"]) for r in rows], dtype=np.int64)
    values = np.array([float(r[column]) for r in rows], dtype=np.float64)
    return steps, values


def plot_training(live_dir: str | Path, path: str | Path) -> None:
    """A PNG of the training curves from dvclive's logs: loss (per step and per epoch) and dev
    micro-F1 per epoch."""
    plt = _pyplot()
    epoch_steps, epochs = read_live_metric(live_dir, "epoch")
    step_x, step_loss = read_live_metric(live_dir, "train/loss")
    _, epoch_loss = read_live_metric(live_dir, "train/epoch_loss")
    _, dev_f1 = read_live_metric(live_dir, "dev/micro_f1")
    # Steps -> fractional epochs, by interpolating between the logged epoch boundaries.
    boundaries = np.concatenate([[0], epoch_steps])
    epoch_axis = np.concatenate([[epochs[0] - 1 if epochs.size else 0], epochs])
    step_epoch = np.interp(step_x, boundaries, epoch_axis) if epochs.size else step_x
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(step_epoch, step_loss, color="tab:blue", alpha=0.35, lw=1, label="per step")
    left.plot(epochs, epoch_loss, color="tab:blue", marker="o", lw=2, label="epoch mean")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss")
    left.legend()
    right.plot(epochs, dev_f1, color="tab:green", marker="o", lw=2, label="dev")
    test_file = Path(live_dir) / "plots" / "metrics" / "test" / "micro_f1.tsv"
    if test_file.is_file():  # train.report_test_each_epoch
        _, test_f1 = read_live_metric(live_dir, "test/micro_f1")
        right.plot(
            epochs, test_f1, color="tab:purple", marker=".", lw=1, label="test (report only)"
        )
        right.legend()
    if dev_f1.size:
        best = last_best_index(dev_f1)  # the epoch training selected
        right.scatter([epochs[best]], [dev_f1[best]], s=120, facecolors="none", edgecolors="red")
        right.set_title(f"best dev micro-F1 {dev_f1[best]:.4f} (epoch {epochs[best]:.0f})")
    right.set_xlabel("epoch")
    right.set_ylabel("dev micro-F1")
    right.set_ylim(0, max(1.0, float(np.nanmax(dev_f1)) if dev_f1.size else 1.0))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _save_figure(fig, path)


# The OT regime heat map's panels: statistic, title, colour map, value range (None: the data's).
REGIME_PANELS = (
    ("share_above_floor", "share of kernel entries above the floor", "viridis", (0.0, 1.0)),
    ("median_cost", "median cost", "magma", None),
    ("relative_update", "relative OT update ||w Pi S|| / ||h||", "cividis", None),
)


def plot_ot_regime(path: str | Path, regime: dict[str, Any]) -> None:
    """A PNG of the OT regime (``metrics/ot_regime.json``'s content): one heat map per statistic,
    layers down, streams across, each cell annotated. A model without OT gets a figure saying so."""
    plt = _pyplot()
    streams = [s for s in ("text", "vision") if s in regime]
    if not streams:
        fig, ax = plt.subplots(figsize=(4, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no OT in this model (model.ot.enabled: false)", ha="center")
        _save_figure(fig, path)
        return
    layers = sorted({layer for s in streams for layer in regime[s]})
    panels = [
        p for p in REGIME_PANELS if any(p[0] in regime[s][lay] for s in streams for lay in layers)
    ]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(3.4 * len(panels), 0.45 * len(layers) + 1.8),
        squeeze=False,
        layout="constrained",  # room for the suptitle above the panels' titles
    )
    for ax, (stat, title, cmap, limits) in zip(axes[0], panels, strict=True):
        values = np.array(
            [[regime[s][lay].get(stat, np.nan) for s in streams] for lay in layers], dtype=float
        )
        low, high = limits or (np.nanmin(values), np.nanmax(values))
        high = high if high > low else low + 1
        ax.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto")
        ax.set_xticks(range(len(streams)), streams)
        ax.set_yticks(
            range(len(layers)), [lay.removeprefix("layer_").lstrip("0") for lay in layers]
        )
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        for (row, col), value in np.ndenumerate(values):
            color = _label_color(plt, cmap, (value - low) / (high - low))
            ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=8, color=color)
    threshold = regime.get("threshold_cost")
    if threshold is not None:
        fig.suptitle(
            f"OT regime on test (mode {regime['mode']}): entries with cost above "
            f"{threshold:.2f} are lost in the floor",
            fontsize=9,
        )
    _save_figure(fig, path)
