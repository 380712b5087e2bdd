"""`preset`: switch the pipeline to a named setup (e.g. the paper's run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, read_params


def main(
    name: Annotated[str, typer.Argument(help="Preset name, e.g. 'paper' or 'paper-mllm'.")],
    params: ParamsOption = Path("params.yaml"),
    apply: Annotated[
        bool, typer.Option("--apply", help="Write the preset into the params file (comments kept).")
    ] = False,
) -> None:
    """Print a preset as `dvc exp run` flags, or apply it to params.yaml with --apply.

    Example: dvc exp run $(python -m stages preset paper)
    """
    from pipeline.config import ParamsError
    from pipeline.presets import apply_preset, as_exp_flags, load_preset, write_into_params

    try:
        apply_preset(read_params(params), name)  # validate before printing or writing anything
        overrides = load_preset(name)
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if apply:
        write_into_params(params, overrides)
        typer.echo(f"{params}: applied preset {name!r} ({len(overrides)} keys)", err=True)
    else:
        typer.echo(" ".join(as_exp_flags(overrides)))
