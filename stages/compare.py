"""`compare`: test metrics of DVC experiments, averaged over seeds, one row per configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_METRICS = [
    "micro_f1",
    "by_pair_kind.text-text.micro_f1",
    "by_pair_kind.text-object.micro_f1",
    "by_pair_kind.object-object.micro_f1",
]


def main(
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m", help="Key in metrics/test.json (repeatable)."),
    ] = None,
    seed_key: Annotated[str, typer.Option(help="The param that only changes the seed.")] = (
        "train.seed"
    ),
    from_json: Annotated[
        Path | None,
        typer.Option(help="Read saved `dvc exp show --json` output instead of running it."),
    ] = None,
) -> None:
    """Mean ± std of test metrics per configuration over the experiments of HEAD.

    Queue each configuration with a few seeds first, e.g.
    dvc exp run --queue -S train.seed=1 -S data.use_depth=false; dvc queue start -j 2
    """
    from pipeline.experiments import runs_from_exp_show, seed_summary, summary_markdown

    if from_json is not None:
        text = from_json.read_text()
    else:
        # The dvc of this environment (it is a dependency), whether or not it is on PATH.
        command = [sys.executable, "-m", "dvc", "exp", "show", "--json"]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode:
            typer.echo(f"error: dvc exp show failed:\n{out.stderr.strip()}", err=True)
            raise typer.Exit(1)
        text = out.stdout
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        typer.echo(f"error: not `dvc exp show --json` output: {exc}", err=True)
        raise typer.Exit(1) from exc
    metrics = metric or DEFAULT_METRICS
    summary = seed_summary(runs_from_exp_show(rows), metrics, seed_key)
    if not summary:
        typer.echo("error: no commits or experiments with params found", err=True)
        raise typer.Exit(1)
    typer.echo(summary_markdown(summary, metrics))
