"""The `features` stage: tokenize with markers, crop objects and depth once, write Parquet."""

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
    dataset: Annotated[Path, typer.Option(help="Normalized dataset folder (download's output).")],
    depth: Annotated[
        Path, typer.Option(help="Depth store (depth stage output); unread if data.use_depth=false.")
    ],
    captions: Annotated[
        Path,
        typer.Option(
            help="Caption table (caption stage output); unread if data.use_caption=false."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Feature cache folder.")],
) -> None:
    """Word-piece ids with entity markers and caption segment, object crops, depth crops and boxes
    of every split, into Parquet shards <out>/<split>/{samples,images}-NNNNN.parquet, plus
    <out>/report.json (truncation and lost markers, missing captions, image problems).

    The output replaces <out> in one rename. After a kill, rerun the same command:
    finished image shards (in <out>.partial) are kept while settings and inputs are unchanged.
    """
    setup_logging()
    p = read_params(params)
    from pipeline.caption.table import CaptionTable
    from pipeline.data.records import Dataset
    from pipeline.depth.store import DepthStore
    from pipeline.features.build import build_features

    with reported_errors(), writing_outputs(out):
        table = CaptionTable(captions) if p.data.use_caption else None
        if table is not None:
            table.check_made_with(p.caption)
        report = build_features(
            Dataset(dataset),
            out,
            p,
            DepthStore(depth) if p.data.use_depth else None,
            table,
            input_paths=[
                depth if p.data.use_depth else None,
                captions if p.data.use_caption else None,
            ],
        )
    for split, stats in report["splits"].items():
        typer.echo(
            f"features {split}: {stats['samples']} samples, {stats['images']} images, "
            f"{stats['samples_with_dropped_markers']} with markers lost to truncation, "
            f"{stats['image_problems']['count']} image problems"
        )
    typer.echo(f"features: wrote {out} (report: {out / 'report.json'})")
