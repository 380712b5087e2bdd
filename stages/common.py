"""Options and helpers shared by the stage commands."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import Params, ParamsError, load_params

ParamsOption = Annotated[
    Path, typer.Option("--params", help="Parameters file (validated against pipeline/config.py).")
]


def read_params(path: Path) -> Params:
    """Load params, turning a schema error into a clean CLI error (exit code 2)."""
    try:
        return load_params(path)
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
