"""The `evaluate` stage: score the dev-selected model once on test; metrics, tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, read_params, setup_logging


def main(
    params: ParamsOption = Path("params.yaml"),
    features: Annotated[Path, typer.Option(help="Feature cache (features stage output).")] = Path(
        "data/features"
    ),
    model: Annotated[Path, typer.Option(help="Trained model folder.")] = Path("models/best"),
    metrics: Annotated[Path, typer.Option(help="Folder for metrics files.")] = Path("metrics"),
    plots: Annotated[Path, typer.Option(help="Folder for plot data and pictures.")] = Path("plots"),
    live: Annotated[
        Path, typer.Option(help="dvclive folder of the training run (for training.png).")
    ] = Path("dvclive"),
) -> None:
    """Write <metrics>/test.json, <metrics>/per_relation.csv, <metrics>/predictions.jsonl,
    <plots>/confusion.json, <plots>/confusion.png and <plots>/training.png."""
    setup_logging()
    p = read_params(params)
    from pipeline.data.records import DataError
    from pipeline.features import StaleCacheError
    from pipeline.metrics import evaluate_model

    try:
        scores = evaluate_model(
            model, features, metrics, plots, live, batch_size=p.evaluate.batch_size
        )
    except (DataError, StaleCacheError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    kinds = ", ".join(
        f"{kind} {v['micro_f1']:.4f} (n={v['support']})"
        for kind, v in scores["by_pair_kind"].items()
    )
    typer.echo(
        f"evaluate: test micro-F1 {scores['micro_f1']:.4f} (P {scores['micro_precision']:.4f}, "
        f"R {scores['micro_recall']:.4f}), accuracy {scores['accuracy']:.4f}, "
        f"macro-F1 {scores['macro_f1']:.4f}; by pair kind: {kinds}"
    )
