"""The ``evaluate`` stage: score the dev-selected model once on the test split and write metrics
(``dvc metrics``), tables and plot data (``dvc plots``) and pictures."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from pipeline.config import OTParams
from pipeline.data.records import PAIR_KINDS
from pipeline.evaluate.plots import (
    last_best_index,
    plot_confusion,
    plot_ot_regime,
    plot_training,
    read_live_metric,
)
from pipeline.features.dataset import FeatureDataset
from pipeline.inference import load_for_inference, predict_dataset
from pipeline.io import (
    DataError,
    atomic_write_text,
    file_sha256,
    link_or_copy,
    read_json,
    staging_dir,
    write_json,
)
from pipeline.metrics import confusion_records, per_relation, score
from pipeline.model.card import model_card
from pipeline.model.regime import RegimeStats, floor_threshold, record_regime, regime_summary
from pipeline.model.saved import copy_trained

__all__ = [
    "write_per_relation_csv",
    "write_confusion_json",
    "selected_on_test",
    "ot_regime_report",
    "dataset_summary",
    "publish_model",
    "evaluate_model",
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


def selected_on_test(live_dir: str | Path) -> dict[str, float]:
    """The optimistic figure of ``train.report_test_each_epoch``: the best per-epoch test micro-F1
    and its epoch, i.e. the number a run reports when it picks its checkpoint on test (as the
    original did, keeping the later epoch on a tie). Reported beside the dev-selected figure,
    never instead of it."""
    steps, test_f1 = read_live_metric(live_dir, "test/micro_f1")
    epoch_steps, epochs = read_live_metric(live_dir, "epoch")
    if not test_f1.size:
        raise ValueError(f"{live_dir}: no test/micro_f1 logged")
    best = last_best_index(test_f1)
    epoch_of_step = dict(zip(epoch_steps.tolist(), epochs.tolist(), strict=True))
    return {"micro_f1": float(test_f1[best]), "epoch": int(epoch_of_step[int(steps[best])])}


def ot_regime_report(ot: OTParams, stats: dict[str, list[RegimeStats]]) -> dict[str, Any]:
    """``metrics/ot_regime.json``: the settings that fix the floor, the cost above which an entry
    is lost in it, and :func:`~pipeline.model.regime.regime_summary` over the test set."""
    if not ot.enabled:
        return {"enabled": False}
    threshold = floor_threshold(ot.epsilon, ot.kernel_floor)
    return {
        "enabled": True,
        "mode": ot.mode,
        "epsilon": ot.epsilon,
        "kernel_floor": ot.kernel_floor,
        "threshold_cost": threshold if math.isfinite(threshold) else None,
        **regime_summary(stats),
    }


def dataset_summary(dataset_dir: str | Path) -> dict[str, Any]:
    """What the model card says of the dataset: its source, split sizes and manifest hash."""
    path = Path(dataset_dir) / "manifest.json"
    manifest = read_json(path, "dataset manifest")
    return {
        "source": manifest.get("source"),
        "manifest_sha256": file_sha256(path),
        "splits": {name: split["samples"] for name, split in manifest["splits"].items()},
    }


def publish_model(
    model_dir: str | Path,
    release_dir: str | Path,
    trained: Any,
    test: dict[str, Any],
    dataset_dir: str | Path | None,
) -> None:
    """Write ``release_dir`` (``models/best``): the model folder's files (hard links where the
    file system allows) and a model card with the test metrics, swapped in whole."""
    dataset = dataset_summary(dataset_dir) if dataset_dir is not None else None
    card = model_card(trained.params, trained.labels, trained.info, test, dataset)
    with staging_dir(release_dir) as tmp:
        copy_trained(Path(model_dir), tmp, card, copy_function=link_or_copy)


def evaluate_model(
    model_dir: str | Path,
    features_dir: str | Path,
    metrics_dir: str | Path,
    plots_dir: str | Path,
    live_dir: str | Path | None,
    batch_size: int,
    *,
    release_dir: str | Path | None = None,
    dataset_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score a trained model folder once on the test split and write the evaluate outputs:
    ``<metrics>/{test.json, ot_regime.json, per_relation.csv, predictions.jsonl}`` and
    ``<plots>/{confusion.json, confusion.png, ot_regime.png, training.png}`` (the last from
    ``live_dir``); with ``release_dir``, the model folder with its card (:func:`publish_model`,
    the dataset read from ``dataset_dir``)."""
    trained = load_for_inference(model_dir)
    # The model's own params: the cache must match what the model was trained on.
    test = FeatureDataset.load(features_dir, "test", trained.params, trained.labels)
    if len(test) == 0:
        raise DataError(f"{test.split}: no samples to score (a micro-F1 on n = 0 means nothing)")
    device = next(trained.model.parameters()).device
    with record_regime(trained.model) as regime_stats:
        out = predict_dataset(trained.model, test, batch_size, device)
    gold, pred, kinds = out["gold"], out["pred"], out["pair_kind"]
    labels = trained.labels  # none = 0, checked by load_trained
    result = score(gold, pred, kinds, labels)

    if trained.params.train.report_test_each_epoch and live_dir is not None:
        result["selected_on_test"] = selected_on_test(live_dir)
    metrics_dir, plots_dir = Path(metrics_dir), Path(plots_dir)
    write_json(metrics_dir / "test.json", result)
    regime = ot_regime_report(trained.params.model.ot, regime_stats)
    write_json(metrics_dir / "ot_regime.json", regime)
    plot_ot_regime(plots_dir / "ot_regime.png", regime)
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
    if release_dir is not None:
        publish_model(model_dir, release_dir, trained, result, dataset_dir)
    return result
