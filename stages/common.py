"""Options and helpers shared by the stage commands: params, logging, shards, and the one place
where a user's error becomes a message and an exit code instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import Params, ParamsError, load_params
from pipeline.io import DataError, StaleCacheError

# Set by a stage that holds its output locks for the processes it launches (train under torchrun).
LOCKS_HELD_ENV = "REMOTE_OUTPUT_LOCKS_HELD"

# What bad input, a missing or stale upstream output, or an unusable setting raise: reported as
# "error: <message>" with exit code 1. Anything else is a bug and keeps its traceback.
USER_ERRORS = (DataError, StaleCacheError, OSError, ValueError)

ParamsOption = Annotated[
    Path,
    typer.Option("--params", help="Parameters file (validated against pipeline/config.py)."),
]


def read_params(path: Path) -> Params:
    """Load params, turning a schema error into a clean CLI error (exit code 2)."""
    try:
        return load_params(path)
    except ParamsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn a user error inside the block into ``error: <message>`` and exit code 1."""
    try:
        yield
    except USER_ERRORS as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


class OutputBusyError(OSError):
    """Another live run holds the lock of an output this stage is about to write."""


@contextmanager
def writing_outputs(*outputs: Path, part: str = "") -> Iterator[None]:
    """Hold an exclusive lock on each output for the block, after checking it can be written.

    The lock is ``.<name>[.<part>].lock`` beside the output (``filelock``; the holder's pid is
    written into it): a second run into the same output fails at once, naming the holder, instead
    of interleaving its files with the first's. ``part`` keeps workers of one sharded stage apart
    (``shard-3-of-4``). Ranks other than 0 of a multi-process launch, and processes started by a stage
    that already holds the locks, take none.
    """
    from filelock import FileLock, Timeout

    if _launch_position()[0] != 0 or os.environ.get(LOCKS_HELD_ENV):
        yield
        return
    held = []
    try:
        for out in outputs:
            out = Path(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            for path in (out.parent, out):
                need = os.W_OK | (os.X_OK if path.is_dir() else 0)
                if path.exists() and not os.access(path, need):
                    raise PermissionError(f"{path}: not writable (this stage writes {out})")
            suffix = f".{part}" if part else ""
            lock_path = out.parent / f".{out.name}{suffix}.lock"
            lock = FileLock(lock_path, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                holder = lock_path.read_text().strip() if lock_path.is_file() else ""
                raise OutputBusyError(
                    f"{out}: another run (pid {holder or 'unknown'}) is writing it; wait for it to "
                    f"finish (its lock: {lock_path})"
                ) from None
            held.append(lock)
            lock_path.write_text(f"{os.getpid()}\n")
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # accelerate's save_state / load_state log every file they write at INFO: keep its warnings.
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def _launch_position() -> tuple[int, int]:
    """(rank, number of processes) under a launcher (accelerate's ``PartialState``), else (0, 1)."""
    from pipeline.device import is_distributed_launch, process_state

    if not is_distributed_launch():
        return 0, 1
    state = process_state()
    return state.process_index, state.num_processes


def resolve_shard(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """This worker's shard: the options, else the launcher's RANK / WORLD_SIZE (accelerate,
    torchrun), else the whole job. A shard outside the range is a usage error (exit code 2)."""
    rank, world = _launch_position()
    shard = shard if shard is not None else rank
    num_shards = num_shards if num_shards is not None else world
    if not 0 <= shard < num_shards:
        typer.echo(
            f"error: --shard {shard} must be below --num-shards {num_shards} and not negative",
            err=True,
        )
        raise typer.Exit(2)
    return shard, num_shards
