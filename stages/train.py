"""The `train` stage: train REMOTE, select on dev, keep models/selected and a resumable checkpoint."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from stages.common import (
    LOCKS_HELD_ENV,
    ParamsOption,
    read_params,
    reported_errors,
    setup_logging,
    writing_outputs,
)

log = logging.getLogger("stages.train")


def _launch_processes(num_processes: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``num_processes`` local processes (gloo on CPU,
    NCCL on GPUs); accelerate inside each process reads the launcher's environment."""
    import subprocess

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={num_processes}", "-m", "stages", "train", *argv,
    ]  # fmt: skip
    log.info("launching %d processes: %s", num_processes, " ".join(cmd))
    # The launched processes write under the locks this one holds (only they see the variable).
    env = {**os.environ, LOCKS_HELD_ENV: "1"}
    return subprocess.run(cmd, check=False, env=env).returncode


def main(
    params: ParamsOption,
    features: Annotated[Path, typer.Option(help="Feature cache (features stage output).")],
    dataset: Annotated[
        Path, typer.Option(help="Normalized dataset (download's output), for relations.json.")
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="<out>/selected (the dev-selected model) and <out>/checkpoint (the resumable "
            "state)."
        ),
    ],
    live: Annotated[Path, typer.Option(help="dvclive log folder.")],
) -> None:
    """Train on the train split, score dev every epoch, keep the best-dev model in
    <out>/selected (evaluate publishes it as models/best).

    train.num_processes > 1 relaunches this command with torchrun on this machine. For several
    machines, start it yourself on each, e.g. `accelerate launch --num_machines 2 --machine_rank R
    --main_process_ip HOST --num_processes 8 -m stages train ...` (the command then runs as is).
    A killed run continues from <out>/checkpoint when rerun with the same params and features.
    """
    setup_logging()
    p = read_params(params)
    inside_launch = "WORLD_SIZE" in os.environ
    if p.train.num_processes > 1 and os.environ.get("WORLD_SIZE") == "1":
        log.warning(
            "train.num_processes is %d, but WORLD_SIZE=1 is set (a launcher's, or left exported "
            "in this shell): training in this one process; unset WORLD_SIZE to have the stage "
            "launch %d",
            p.train.num_processes,
            p.train.num_processes,
        )
    if p.train.num_processes > 1 and not inside_launch:
        argv = ["--params", str(params), "--features", str(features), "--dataset", str(dataset)]
        argv += ["--out", str(out), "--live", str(live)]
        with reported_errors(), writing_outputs(out, live):
            code = _launch_processes(p.train.num_processes, argv)
        raise typer.Exit(code)

    from pipeline.device import process_state
    from pipeline.train.loop import train

    try:
        with reported_errors(), writing_outputs(out, live):
            result = train(p, features, dataset, out, live)
    except KeyboardInterrupt:
        typer.echo(
            f"train: interrupted; rerun the same command (or dvc repro) to resume after the last "
            f"finished epoch, saved in {out / 'checkpoint'}",
            err=True,
        )
        raise typer.Exit(130) from None
    if process_state().is_main_process:
        how = " (early stop)" if result.stopped_early else ""
        resumed = (
            f", resumed after epoch {result.resumed_from_epoch}"
            if result.resumed_from_epoch
            else ""
        )
        typer.echo(
            f"train: best dev micro-F1 {result.best_score:.4f} at epoch {result.best_epoch}"
            f"{how}{resumed}; wrote {result.best_dir}"
        )
