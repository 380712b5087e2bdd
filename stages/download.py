"""The `download` stage: get the dataset named by `data.source`, write the normalized layout."""

from __future__ import annotations

import logging
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

log = logging.getLogger("stages.download")


def main(
    params: ParamsOption,
    out: Annotated[Path, typer.Option(help="Normalized dataset folder (data/raw/<source>).")],
    cache: Annotated[
        Path, typer.Option(help="Downloaded archives and their extraction, reused across runs.")
    ],
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
    from pipeline.data.prepare import prepare_dataset

    with reported_errors(), writing_outputs(out):
        manifest = prepare_dataset(p, out, cache)
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
