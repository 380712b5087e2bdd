"""The `caption` stage: describe every text entity and visual object, import captions, or none."""

from __future__ import annotations

import logging
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

log = logging.getLogger("stages.caption")


def main(
    params: ParamsOption,
    dataset: Annotated[Path, typer.Option(help="Normalized dataset folder (download's output).")],
    out: Annotated[
        Path, typer.Option(help="Output folder (captions.json, captions.jsonl, manifest).")
    ],
    shard: Annotated[
        int | None,
        typer.Option(
            "--shard", min=0, show_default="$RANK, else 0", help="This worker's part (0-based)."
        ),
    ] = None,
    num_shards: Annotated[
        int | None,
        typer.Option(
            "--num-shards",
            min=1,
            show_default="$WORLD_SIZE, else 1",
            help="Split the mllm work into this many parts, one per worker.",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Write data/captions/ with caption.backend: mllm (generate), file (import), or none.

    Resume: rerun a killed mllm run; it generates only the captions still missing.

    Rows made with another model, prompt version or options, or from another post text, box or
    image, are never reused.

    Workers: give each --shard i --num-shards n and the same --out; the last to finish merges.

    Under accelerate launch, RANK / WORLD_SIZE are the defaults and LOCAL_RANK picks the GPU.

    Workers on other machines: copy their out/shards/ here, then run once without --num-shards.
    """
    from pipeline.caption.run import run_caption
    from pipeline.data.records import Dataset

    setup_logging()
    p = read_params(params)
    shard, num_shards = resolve_shard(shard, num_shards)
    with reported_errors(), writing_outputs(out, part=f"shard-{shard}-of-{num_shards}"):
        summary = run_caption(
            Dataset(dataset), out, p.caption, shard=shard, num_shards=num_shards, progress=progress
        )
    if "coverage" not in summary:
        log.info(
            "shard %d/%d: %d item(s), %d generated now; %d item(s) of other shards missing",
            shard, num_shards, summary["items"], summary["generated"], summary["missing"],
        )  # fmt: skip
        return
    cov = summary["coverage"]
    log.info(
        "%s: backend %s, %d caption(s); coverage %d/%d (entities %d/%d, objects %d/%d)%s",
        out, summary["backend"], summary["captions"], cov["found"], cov["total"],
        cov["entities"]["found"], cov["entities"]["total"],
        cov["objects"]["found"], cov["objects"]["total"],
        f", {summary['filled']} filled empty" if summary["filled"] else "",
    )  # fmt: skip
