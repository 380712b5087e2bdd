"""Relation-extraction metrics: pure functions of label ids, no files, no torch.

Training selects its checkpoint with :func:`score` on dev; ``evaluate`` reports it on test.

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

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.data.records import PAIR_KINDS

__all__ = [
    "micro_prf",
    "per_relation",
    "score",
    "confusion_matrix",
    "confusion_records",
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
    """The metrics of ``metrics/test.json``; ``pair_kinds`` index :data:`PAIR_KINDS`. A pair kind
    without samples (MNRE has only text-text) has no score: ``micro_f1`` is None with support 0,
    so that ``dvc metrics diff`` never compares it as a real 0."""
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
        support = int(mask.sum())
        by_kind[kind] = {
            "micro_f1": micro_prf(gold[mask], pred[mask], none_id)[2] if support else None,
            "support": support,
        }
    return {
        "micro_f1": f1,
        "micro_precision": precision,
        "micro_recall": recall,
        "accuracy": _ratio(np.sum(gold == pred), gold.size),
        "macro_f1": float(np.mean([r["f1"] for r in relations])) if relations else None,
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
