"""The `depth` stage: a depth map for every image of the dataset, into a resumable sharded store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import (
    ParamsOption,
    read_params,
    reported_errors,
    resolve_shard,
    setup_logging,
    writing_outputs,
)


def main(
    params: ParamsOption,
    dataset: Annotated[Path, typer.Option(help="Normalized dataset folder (download's output).")],
    out: Annotated[Path, typer.Option(help="Depth store folder.")],
    shard: Annotated[
        int | None,
        typer.Option(help="This worker's index, 0-based.", show_default="$RANK, else 0", min=0),
    ] = None,
    num_shards: Annotated[
        int | None,
        typer.Option(help="Number of workers.", show_default="$WORLD_SIZE, else 1", min=1),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Depth map for every image into a resumable, sharded store.

    Source: Depth-Anything-V2 (depth.model), or with depth.source=dataset the
    dataset's own maps. Output: Parquet shards, skipped.json (images left out
    under data.on_error=skip) and manifest.json, written last.

    Resume: after a kill, rerun the same command; only unfinished shards are
    computed. A store made with other settings (source, model, dtype, shard
    size, image list) is started over, never mixed.

    Several workers: give each --shard i --num-shards n and the same --out;
    the last one to finish writes the manifest. With accelerate:
      accelerate launch --num_processes 4 -m stages depth
    takes --shard / --num-shards from RANK / WORLD_SIZE, the GPU from
    LOCAL_RANK. Workers on separate machines: copy their shard files into one
    folder, then run once without --shard to write the manifest.
    """
    setup_logging()
    p = read_params(params)
    from pipeline.data.records import Dataset
    from pipeline.depth.run import run_depth

    shard, num_shards = resolve_shard(shard, num_shards)
    with reported_errors(), writing_outputs(out, part=f"shard-{shard}-of-{num_shards}"):
        result = run_depth(
            Dataset(dataset), out, p.depth, p.data.on_error,
            shard=shard, num_shards=num_shards, progress=progress,
        )  # fmt: skip
    done = "complete" if result.complete else "incomplete (other workers' shards missing)"
    typer.echo(
        f"depth: computed {result.images_computed} images in {len(result.shards_computed)} of "
        f"{result.total_shards} shards, skipped {len(result.skipped)}; store {out} {done}"
    )
