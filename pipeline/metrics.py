"""Relation-extraction metrics (DESIGN.md §4) and the evaluate stage's tables and pictures.

Definitions, with ``none`` the label that means "no relation" (id 0 in ``relations.json``):

- a prediction is *positive* when it is not ``none``; it is *correct* when it equals the gold label
  and the gold label is not ``none``;
- micro precision = correct / #positive predictions, micro recall = correct / #gold non-``none``,
  micro F1 = their harmonic mean (the paper's metric); a ratio with a zero denominator is 0;
- accuracy = fraction of samples whose prediction equals the gold label, ``none`` included;
- per relation (non-``none`` only): one-vs-rest precision, recall, F1 and support (#gold);
- macro F1 = mean of the per-relation F1 over the non-``none`` relations that occur in the gold
  labels or in the predictions (relations absent from both would add an arbitrary 0 or 1);
- by pair kind: micro F1 over the samples of that kind (text-text, text-object, object-object),
  and support = the number of samples of that kind.

These match scikit-learn's ``precision_recall_fscore_support(labels=<non-none ids>)`` with
``average="micro"`` and ``"macro"`` (labels restricted as above) and ``zero_division=0``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.records import PAIR_KINDS, atomic_write_text, write_json

__all__ = [
    "micro_prf",
    "per_relation",
    "score",
    "confusion_matrix",
    "confusion_records",
    "write_per_relation_csv",
    "write_confusion_json",
    "plot_confusion",
    "plot_training",
    "read_live_metric",
    "evaluate_model",
]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def _as_ids(values: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def micro_prf(
    gold: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, none_id: int = 0
) -> tuple[float, float, float]:
    """Micro precision, recall and F1 over the non-``none`` labels."""
    gold, pred = _as_ids(gold), _as_ids(pred)
    if gold.shape != pred.shape:
        raise ValueError(f"gold and pred differ in length: {gold.size} vs {pred.size}")
    correct = int(np.sum((pred == gold) & (gold != none_id)))
    precision = _ratio(correct, np.sum(pred != none_id))
    recall = _ratio(correct, np.sum(gold != none_id))
    return precision, recall, _f1(precision, recall)


def per_relation(
    gold: Sequence[int] | np.ndarray,
    pred: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    none_id: int = 0,
) -> list[dict[str, Any]]:
    """One row per non-``none`` relation seen in gold or predictions, in label-id order:
    ``{label, precision, recall, f1, support}``."""
    gold, pred = _as_ids(gold), _as_ids(pred)
    rows = []
    for label_id in sorted(set(gold.tolist()) | set(pred.tolist())):
        if label_id == none_id:
            continue
        if not 0 <= label_id < len(labels):
            raise ValueError(f"label id {label_id} is outside the label map (0..{len(labels) - 1})")
        hits = int(np.sum((pred == label_id) & (gold == label_id)))
        support = int(np.sum(gold == label_id))
        precision = _ratio(hits, np.sum(pred == label_id))
        recall = _ratio(hits, support)
        rows.append(
            {
                "label": labels[label_id],
                "precision": precision,
                "recall": recall,
                "f1": _f1(precision, recall),
                "support": support,
            }
        )
    return rows


def score(
    gold: Sequence[int] | np.ndarray,
    pred: Sequence[int] | np.ndarray,
    pair_kinds: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    none_id: int = 0,
) -> dict[str, Any]:
    """The metrics of ``metrics/test.json``; ``pair_kinds`` index :data:`PAIR_KINDS`."""
    gold, pred, kinds = _as_ids(gold), _as_ids(pred), _as_ids(pair_kinds)
    if not gold.size == pred.size == kinds.size:
        raise ValueError(
            f"gold, pred and pair_kinds differ in length: {gold.size}, {pred.size}, {kinds.size}"
        )
    precision, recall, f1 = micro_prf(gold, pred, none_id)
    relations = per_relation(gold, pred, labels, none_id)
    by_kind = {}
    for index, kind in enumerate(PAIR_KINDS):
        mask = kinds == index
        by_kind[kind] = {
            "micro_f1": micro_prf(gold[mask], pred[mask], none_id)[2],
            "support": int(mask.sum()),
        }
    return {
        "micro_f1": f1,
        "micro_precision": precision,
        "micro_recall": recall,
        "accuracy": _ratio(np.sum(gold == pred), gold.size),
        "macro_f1": float(np.mean([r["f1"] for r in relations])) if relations else 0.0,
        "by_pair_kind": by_kind,
    }


def confusion_matrix(
    gold: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, num_labels: int
) -> np.ndarray:
    """Counts ``[num_labels, num_labels]``: row = gold (actual), column = predicted."""
    gold, pred = _as_ids(gold), _as_ids(pred)
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (gold, pred), 1)
    return matrix


def confusion_records(
    gold: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, labels: Sequence[str]
) -> list[dict[str, str]]:
    """One ``{"actual", "predicted"}`` pair of label names per sample (dvclive's sklearn format)."""
    return [
        {"actual": labels[g], "predicted": labels[p]}
        for g, p in zip(_as_ids(gold).tolist(), _as_ids(pred).tolist(), strict=True)
    ]


def write_per_relation_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """``label,precision,recall,f1,support`` with 4-decimal fractions, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "precision", "recall", "f1", "support"])
    for row in rows:
        writer.writerow(
            [
                row["label"],
                f"{row['precision']:.4f}",
                f"{row['recall']:.4f}",
                f"{row['f1']:.4f}",
                row["support"],
            ]
        )
    atomic_write_text(path, buffer.getvalue())


def write_confusion_json(path: str | Path, records: list[dict[str, str]]) -> None:
    """``{"confusion": [{"actual", "predicted"}, ...]}`` for ``dvc plots`` (confusion template)."""
    write_json(path, {"confusion": records})


def _save_figure(fig: Any, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in dvc repro
    import matplotlib.pyplot as plt

    return plt


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
    ax.imshow(np.log1p(matrix), cmap="Blues")  # log scale: `none` would otherwise wash out the rest
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    threshold = np.log1p(matrix.max()) / 2 if matrix.size else 0
    for (row, col), count in np.ndenumerate(matrix):
        if count:
            color = "white" if np.log1p(count) > threshold else "black"
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
    right.plot(epochs, dev_f1, color="tab:green", marker="o", lw=2)
    if dev_f1.size:
        best = int(np.argmax(dev_f1))
        right.scatter([epochs[best]], [dev_f1[best]], s=120, facecolors="none", edgecolors="red")
        right.set_title(f"best dev micro-F1 {dev_f1[best]:.4f} (epoch {epochs[best]:.0f})")
    right.set_xlabel("epoch")
    right.set_ylabel("dev micro-F1")
    right.set_ylim(0, max(1.0, float(np.nanmax(dev_f1)) if dev_f1.size else 1.0))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    _save_figure(fig, path)


def evaluate_model(
    model_dir: str | Path,
    features_dir: str | Path,
    metrics_dir: str | Path,
    plots_dir: str | Path,
    live_dir: str | Path | None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score a trained model folder once on the test split and write the evaluate outputs:
    ``<metrics>/{test.json, per_relation.csv, predictions.jsonl}`` and
    ``<plots>/{confusion.json, confusion.png, training.png}`` (the last from ``live_dir``)."""
    import torch

    from pipeline.features import FeatureDataset
    from pipeline.train import load_trained, predict_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = load_trained(model_dir, device)
    # The model's own params: the cache must match what the model was trained on.
    test = FeatureDataset(features_dir, "test", trained.params)
    out = predict_dataset(trained.model, test, trained.params, batch_size, device)
    gold, pred, kinds = out["gold"], out["pred"], out["pair_kind"]
    labels = trained.labels  # none = 0, checked by load_trained
    result = score(gold, pred, kinds, labels)

    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    write_json(metrics_dir / "test.json", result)
    write_per_relation_csv(metrics_dir / "per_relation.csv", per_relation(gold, pred, labels))
    lines = (
        json.dumps(
            {
                "id": test.sample_ids[i],
                "pair_kind": PAIR_KINDS[k],
                "gold": labels[g],
                "predicted": labels[p],
                "confidence": round(float(probs[p]), 6),
            },
            ensure_ascii=False,
        )
        for i, g, p, k, probs in zip(out["index"], gold, pred, kinds, out["probs"], strict=True)
    )
    atomic_write_text(metrics_dir / "predictions.jsonl", "".join(line + "\n" for line in lines))
    write_confusion_json(plots_dir / "confusion.json", confusion_records(gold, pred, labels))
    plot_confusion(plots_dir / "confusion.png", gold, pred, labels)
    if live_dir is not None:
        plot_training(live_dir, plots_dir / "training.png")
    return result
