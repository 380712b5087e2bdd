"""The `check` stage: validate the whole params file before any other stage runs.

Each stage validates the params when it runs, but a key that no stage lists (a typo such as
`train.epoch`, or a throughput knob) re-runs nothing: without this stage `dvc exp run` would then
succeed on the old outputs. dvc.yaml lists it first, tracking every key of params.yaml.
"""

from __future__ import annotations

import typer

from stages.common import ParamsOption, read_params


def main(params: ParamsOption) -> None:
    """Validate every key of the params file (schema, types, ranges) and the settings that
    cannot run together; exit code 2 with one line per problem."""
    from pipeline.config import pipeline_problems

    problems = pipeline_problems(read_params(params))
    for problem in problems:
        typer.echo(f"error: {params}: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{params}: valid", err=True)
