"""`preset`: switch the pipeline to a named setup (e.g. the paper's run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, read_params


def main(
    name: Annotated[
        str,
        typer.Argument(
            help="Preset name ('paper', 'paper-mllm'), or a trained model folder: the params "
            "it was trained with (its trained.json)."
        ),
    ],
    params: ParamsOption = Path("params.yaml"),
    apply: Annotated[
        bool, typer.Option("--apply", help="Write the preset into the params file (comments kept).")
    ] = False,
) -> None:
    """Print a preset as `dvc exp run` flags, or apply it to params.yaml with --apply.

    Examples: dvc exp run $(python -m stages preset paper);
    dvc exp run $(python -m stages preset path/to/model) retrains a model with its params
    (the flags: those that differ from the params file).
    """
    from pipeline.presets import apply_preset, as_exp_flags, load_preset, write_into_params

    try:
        current = read_params(params)
        if Path(name).is_dir():
            overrides = _model_overrides(Path(name), current)
        else:
            apply_preset(current, name)  # validate before printing or writing anything
            overrides = load_preset(name)
    except (ValueError, OSError) as exc:  # ParamsError is a ValueError
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if apply:
        write_into_params(params, overrides)
        typer.echo(f"{params}: applied preset {name!r} ({len(overrides)} keys)", err=True)
    else:
        typer.echo(" ".join(as_exp_flags(overrides)))


def _model_overrides(folder: Path, current):
    """The params of the model in ``folder`` that differ from ``current``, as dotted keys."""
    from pipeline.config import flatten, params_to_dict
    from pipeline.model.saved import read_trained_params

    trained = flatten(params_to_dict(read_trained_params(folder)))
    now = flatten(params_to_dict(current))
    return {key: value for key, value in trained.items() if now[key] != value}
