"""The `download` stage: get the dataset named by `data.source`, write the normalized layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, read_params, setup_logging

log = logging.getLogger("stages.download")


def main(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[
        Path | None,
        typer.Option(help="Normalized dataset folder; default data/raw/<data.source>."),
    ] = None,
    cache: Annotated[
        Path, typer.Option(help="Downloaded archives and their extraction, reused across runs.")
    ] = Path("data/cache"),
) -> None:
    """Get the dataset, check it, write data/raw/<data.source>/.

    Sources (data.source): synthetic (generated offline), umre and mnre
    (their published archives), local (data.local.path: an archive or a
    folder in the UMRE or MNRE layout). Pinned sha256 sums are verified,
    found ones recorded in manifest.json; archives are unpacked safely and
    every record is validated. With data.on_error=skip, bad records are left
    out and listed in skipped.tsv. The output folder is replaced only when
    complete; an interrupted download resumes on the next run.
    """
    setup_logging()
    p = read_params(params)
    from pipeline.data.download import prepare_dataset
    from pipeline.data.records import DataError

    out = out if out is not None else Path("data/raw") / p.data.source
    try:
        manifest = prepare_dataset(p, out, cache)
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    for split, counts in manifest["splits"].items():
        kinds = ", ".join(f"{kind} {n}" for kind, n in counts["pair_kinds"].items())
        log.info(
            "%s: %d samples (%s; none %d), %d images",
            split,
            counts["samples"],
            kinds,
            counts["relations"].get("none", 0),
            counts["images"],
        )
    log.info(
        "wrote %s (source %s, %d images, %d records skipped)",
        out,
        p.data.source,
        manifest["images"],
        manifest.get("skipped", {}).get("records", 0),
    )
