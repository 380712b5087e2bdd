"""What the training loop writes: the resumable checkpoint, with the dev-selected model in it, and
a copy of that model as the train stage's output.

Layout of ``checkpoint/`` (under the train stage's ``out_dir``, ``models/``)::

    model.safetensors, optimizer.bin, custom_checkpoint_0.pkl (the LR schedule),
    random_states_<rank>.pkl, scaler.pt (fp16 only)
                   the training state after the last finished epoch, as
                   ``accelerate.Accelerator.save_state`` writes it (every process its own RNG file)
    meta.json      progress (epoch, step, best dev score, history) and the run's fingerprint
    best/          the dev-selected model folder (format: :mod:`pipeline.model.saved`)
    logs/          copies of the tracker folders (dvclive, ...) so a rerun can restore them

The folder is written into a temp folder and swapped in (:func:`pipeline.io.staging_dir`), so a
kill never leaves half a checkpoint that a rerun would trust. The data order needs no state: it is
a function of the seed and the epoch (``DistributedSampler.set_epoch``).

``selected/`` (beside ``checkpoint/``) is a copy of ``checkpoint/best`` made when training ends:
the stage's DVC output, cached, so that ``dvc checkout`` and ``dvc exp apply`` restore a trained
model without the optimizer state. ``checkpoint/`` is no DVC output: DVC neither caches it nor
clears it before a rerun, and its fingerprint says which run it belongs to.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from pipeline.config import Params, section_hash
from pipeline.io import link_or_copy, recover_swap, staging_dir, tree_sha256, write_json

__all__ = [
    "CHECKPOINT_META",
    "BEST_DIR",
    "SELECTED_DIR",
    "Progress",
    "CorruptCheckpointError",
    "run_fingerprint",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint",
    "restore_logs",
    "recover_outputs",
    "publish_selected",
]

log = logging.getLogger(__name__)

CHECKPOINT_META = "meta.json"
BEST_DIR = "best"
SELECTED_DIR = "selected"  # beside checkpoint/: the stage's output
LOGS_DIR = "logs"
CHECKPOINT_FORMAT = 2  # 2: accelerate's save_state files, the best model inside


# ---------------------------------------------------------------------------------------------
# The resumable checkpoint.


@dataclass
class Progress:
    """What the loop needs to continue; saved in the checkpoint's meta.json."""

    epoch: int = 0  # epochs finished
    global_step: int = 0  # optimizer steps taken
    best_score: float = -1.0
    best_epoch: int = 0
    epochs_since_best: int = 0  # epochs since dev F1 last rose (patience; a tie is no rise)
    finished: bool = False
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


# The library whose code trains: its Python sources are part of a run's fingerprint.
CODE_DIR = Path(__file__).resolve().parents[1]


def run_fingerprint(
    params: Params, features_dir: Path, labels: list[str], code_dir: Path | None = None
) -> str:
    """What a checkpoint must match to be resumed: all params, the label map, the bytes of the
    feature cache (hashed: a second or two per GB, once per run) and the library's Python sources
    (``code_dir``, default :data:`CODE_DIR`). Without the code, a model change followed by
    ``dvc repro`` (which reruns train for it) would "resume" the finished checkpoint of the old
    code and train nothing."""
    code = tree_sha256(code_dir or CODE_DIR, "*.py")
    return section_hash(params, labels, tree_sha256(features_dir), code)


def save_checkpoint(
    accelerator: Any,
    folder: Path,
    *,
    fingerprint: str,
    progress: Progress,
    write_best: Callable[[Path], None] | None,
    logs: list[Path],
) -> None:
    """Write ``checkpoint/`` atomically, every process taking part: each saves its share of the
    accelerator's state (the main process the model, optimizer and registered objects; every
    process its RNG state) into the main process's staging folder. ``write_best(folder)`` writes a
    new dev-selected model; None keeps the previous one. ``logs``: tracker folders to copy."""
    main = accelerator.is_main_process
    with staging_dir(folder) if main else contextlib.nullcontext() as tmp:
        (shared,) = broadcast_object_list([str(tmp) if main else None])
        tmp = Path(shared)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            if write_best is not None:
                write_best(tmp / BEST_DIR)
            elif (folder / BEST_DIR).is_dir():
                shutil.copytree(folder / BEST_DIR, tmp / BEST_DIR, copy_function=link_or_copy)
            for logs_dir in logs:
                if logs_dir.is_dir():
                    shutil.copytree(logs_dir, tmp / LOGS_DIR / logs_dir.name)
            write_json(
                tmp / CHECKPOINT_META,
                {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, **progress.__dict__},
            )
    accelerator.wait_for_everyone()


def read_checkpoint(folder: Path, fingerprint: str) -> Progress | None:
    """The checkpoint's progress when it exists and matches this run, else None."""
    meta_path = folder / CHECKPOINT_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _unreadable(meta_path, exc) from exc
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("fingerprint") != fingerprint:
        log.warning(
            "%s: ignoring the checkpoint (params, labels, features or code changed)", folder
        )
        return None
    meta.pop("format")
    meta.pop("fingerprint")
    return Progress(**meta)


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read back (a user error: delete it to restart)."""


def _unreadable(path: Path, exc: BaseException) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: cannot read the checkpoint ({type(exc).__name__}: {str(exc)[:200]}); delete "
        f"{path.parent} to restart training from the beginning"
    )


def load_checkpoint(accelerator: Any, folder: Path) -> None:
    """Restore the accelerator's state (model, optimizer, registered objects, scaler, this
    process's RNG) from ``folder``. accelerate skips an unreadable RNG file with a log line; here
    it is an error, since without it the run would not continue as it started."""
    rng = folder / f"random_states_{accelerator.process_index}.pkl"
    try:
        # Our own file, written by save_state: numpy's RNG state needs the full unpickler.
        torch.load(rng, weights_only=False)
        accelerator.load_state(str(folder))
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        bad = rng if not rng.is_file() else folder
        raise _unreadable(bad, exc) from exc


def recover_outputs(ckpt_dir: Path) -> None:
    """Finish a folder swap a kill cut short (main process only: no other writer exists)."""
    recover_swap(ckpt_dir)


def publish_selected(ckpt_dir: Path) -> None:
    """Copy the checkpoint's dev-selected model to ``selected/`` beside it, atomically (main
    process only). Plain copies: DVC caches these files, and a hard link would tie the cache's
    copy to the checkpoint's."""
    with staging_dir(ckpt_dir.parent / SELECTED_DIR) as tmp:
        shutil.copytree(ckpt_dir / BEST_DIR, tmp, dirs_exist_ok=True)


def restore_logs(ckpt_dir: Path, logs: list[Path]) -> None:
    """Put back the tracker folders as they were at the checkpoint: a killed run may have lost
    them (``dvc repro`` deletes outputs) or logged steps past the checkpoint."""
    for logs_dir in logs:
        saved = ckpt_dir / LOGS_DIR / logs_dir.name
        if saved.is_dir():
            shutil.rmtree(logs_dir, ignore_errors=True)
            shutil.copytree(saved, logs_dir)
