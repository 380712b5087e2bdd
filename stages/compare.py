"""`compare`: test metrics of DVC experiments, averaged over seeds, one row per configuration."""

from __future__ import annotations

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
        typer.Option(
            "--metric",
            "-m",
            help="Metric key (repeatable); metrics/test.json's where files share it.",
        ),
    ] = None,
    seed_key: Annotated[str, typer.Option(help="The param that only changes the seed.")] = (
        "train.seed"
    ),
    params: Annotated[
        Path, typer.Option("--params", help="Params file whose keys make a configuration.")
    ] = Path("params.yaml"),
    rev: Annotated[
        list[str] | None,
        typer.Option(
            "--rev",
            help="Commit (or branch, tag) whose experiments to compare, repeatable; default HEAD. "
            "Experiments belong to the commit they were queued from: name it after committing.",
        ),
    ] = None,
    from_file: Annotated[
        Path | None,
        typer.Option(
            help="Summarize saved rows instead of the repo's experiments: `dvc exp show --csv` "
            "output (.csv) or a JSON list of dvc.api.exp_show() rows."
        ),
    ] = None,
) -> None:
    """Mean ± std of test metrics per configuration over the experiments of HEAD (or --rev).

    Queue each configuration with a few seeds first and run the queue to the end, e.g.
    dvc exp run --queue -S train.seed=1 -S data.use_depth=false; dvc exp run --run-all -j 2
    """
    from pipeline.config import params_mapping, read_params_yaml
    from pipeline.experiments import (
        finished_runs,
        left_out_states,
        param_values,
        saved_rows,
        seed_summary,
        summary_markdown,
    )

    metrics = metric or DEFAULT_METRICS
    try:
        # An empty params file has no configuration keys; a list or a number is a mistake.
        keys = param_values(params_mapping(read_params_yaml(params) or {}, str(params)))
        rows = _exp_show(rev) if from_file is None else saved_rows(from_file)
        runs = finished_runs(rows, keys, metrics)
        summary = seed_summary(runs, metrics, seed_key)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if not summary:
        typer.echo("error: no commits or finished experiments with params found", err=True)
        raise typer.Exit(1)
    typer.echo(summary_markdown(summary, metrics))
    for name in metrics:
        if runs["metrics", name].isna().all():
            typer.echo(
                f"warning: no run reports the metric {name!r} (a key of metrics/test.json, "
                f"e.g. {DEFAULT_METRICS[0]!r} or {DEFAULT_METRICS[1]!r})",
                err=True,
            )
    left_out = left_out_states(rows)
    if left_out:
        counts = ", ".join(f"{n} {state.lower()}" for state, n in left_out.items())
        typer.echo(
            f"note: left out {counts} experiment(s); only finished ones count "
            "(`dvc queue status` shows what is still running)",
            err=True,
        )


def _exp_show(revs: list[str] | None = None) -> list[dict]:
    """``dvc.api.exp_show()`` of the repo around the working directory, from ``revs`` (default
    HEAD), its errors as ValueError."""
    import dvc.api
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        # Outside a repo exp_show would take the directory for a URL and try to clone it.
        return dvc.api.exp_show(repo=Repo.find_root(), revs=revs or None)
    except DvcException as exc:
        raise ValueError(f"dvc exp show: {exc}") from exc
