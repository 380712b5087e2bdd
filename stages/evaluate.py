"""The `evaluate` stage: score the dev-selected model once on test; metrics, tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import (
    ParamsOption,
    read_params,
    reported_errors,
    setup_logging,
    writing_outputs,
)


def main(
    params: ParamsOption,
    features: Annotated[Path, typer.Option(help="Feature cache (features stage output).")],
    model: Annotated[Path, typer.Option(help="The dev-selected model folder (models/selected).")],
    metrics: Annotated[Path, typer.Option(help="Folder for metrics files.")],
    plots: Annotated[Path, typer.Option(help="Folder for plot data and pictures.")],
    live: Annotated[
        Path, typer.Option(help="dvclive folder of the training run (for training.png).")
    ],
    release: Annotated[
        Path | None,
        typer.Option(help="Write the model folder with its model card here (models/best)."),
    ] = None,
    dataset: Annotated[
        Path | None,
        typer.Option(help="Normalized dataset (download's output): the card names its manifest."),
    ] = None,
) -> None:
    """Write <metrics>/test.json, <metrics>/ot_regime.json, <metrics>/per_relation.csv,
    <metrics>/predictions.jsonl, <plots>/confusion.json, <plots>/confusion.png,
    <plots>/ot_regime.png and <plots>/training.png; with --release, the model folder and a model
    card with these test metrics (a Hugging Face Hub repository: `hf upload <user>/<name>
    models/best` publishes it)."""
    setup_logging()
    p = read_params(params)
    from pipeline.device import set_determinism, set_tf32
    from pipeline.evaluate.report import evaluate_model

    # Scored with the thread count the model was trained with (the same rounding).
    set_determinism(p.train.threads, p.train.deterministic)
    set_tf32(p.train.tf32)

    outputs = (metrics, plots) if release is None else (metrics, plots, release)
    with reported_errors(), writing_outputs(*outputs):
        scores = evaluate_model(
            model, features, metrics, plots, live, p.evaluate.batch_size,
            release_dir=release, dataset_dir=dataset,
        )  # fmt: skip
    kinds = ", ".join(
        f"{kind} {'n/a' if v['micro_f1'] is None else format(v['micro_f1'], '.4f')} "
        f"(n={v['support']})"
        for kind, v in scores["by_pair_kind"].items()
    )
    typer.echo(
        f"evaluate: test micro-F1 {scores['micro_f1']:.4f} (P {scores['micro_precision']:.4f}, "
        f"R {scores['micro_recall']:.4f}), accuracy {scores['accuracy']:.4f}, "
        f"macro-F1 {'n/a' if scores['macro_f1'] is None else format(scores['macro_f1'], '.4f')}; "
        f"by pair kind: {kinds}"
    )
