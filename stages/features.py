"""The `features` stage: tokenize with markers, crop objects and depth once, write Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, read_params, setup_logging


def main(
    params: ParamsOption = Path("params.yaml"),
    dataset: Annotated[
        Path | None,
        typer.Option(help="Normalized dataset folder (default: data/raw/<data.source>)."),
    ] = None,
    depth: Annotated[
        Path, typer.Option(help="Depth store (depth stage output); unread if data.use_depth=false.")
    ] = Path("data/depth"),
    captions: Annotated[
        Path,
        typer.Option(
            help="Caption table (caption stage output); unread if data.use_caption=false."
        ),
    ] = Path("data/captions"),
    out: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path("data/features"),
) -> None:
    """Word-piece ids with entity markers and caption segment, object crops, depth crops and boxes
    of every split, into Parquet shards <out>/<split>/{samples,images}-NNNNN.parquet, plus
    <out>/report.json (truncation and lost markers, missing captions, image problems).

    The output replaces <out> in one rename. After a kill, rerun the same command:
    finished image shards (in <out>.partial) are kept while settings and inputs are unchanged.
    """
    setup_logging()
    p = read_params(params)
    from pipeline.data.records import DataError, Dataset
    from pipeline.features import build_features

    try:
        ds = Dataset(dataset if dataset is not None else Path("data/raw") / p.data.source)
        depth_store = caption_table = None
        if p.data.use_depth:
            from pipeline.depth_store import DepthStore

            depth_store = DepthStore(depth)
        if p.data.use_caption:
            from pipeline.caption_table import CaptionTable

            caption_table = CaptionTable(captions)
        report = build_features(
            ds,
            out,
            p,
            depth_store,
            caption_table,
            input_paths=[
                depth if p.data.use_depth else None,
                captions if p.data.use_caption else None,
            ],
        )
    except (DataError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    for split, stats in report["splits"].items():
        typer.echo(
            f"features {split}: {stats['samples']} samples, {stats['images']} images, "
            f"{stats['samples_with_dropped_markers']} with markers lost to truncation, "
            f"{stats['image_problems']['count']} image problems"
        )
    typer.echo(f"features: wrote {out} (report: {out / 'report.json'})")
