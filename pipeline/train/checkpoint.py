"""What the training loop writes: the dev-selected model folder and the resumable checkpoint.

Layout under the train stage's ``out_dir`` (``models/``)::

    best/          the dev-selected model (format: :mod:`pipeline.model.saved`)
    checkpoint/    the state after the last finished epoch: model.safetensors, state.pt (optimizer,
                   scheduler, scaler, per-process RNG and data-order states; plain tensors and
                   containers only), meta.json (progress), and copies of best/ and the dvclive
                   folder so a rerun can restore them

Both are written into a temp folder and swapped in (:func:`pipeline.io.staging_dir`), so a kill
never leaves half a model that a rerun would trust.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import Params, params_to_dict, section_hash
from pipeline.io import recover_swap, staging_dir, tree_sha256, write_json
from pipeline.model.saved import FORMAT_VERSION, TOKENIZER_DIR, TRAINED_FILE, WEIGHTS_FILE

__all__ = [
    "CHECKPOINT_META",
    "CHECKPOINT_STATE",
    "Progress",
    "save_trained",
    "run_fingerprint",
    "save_checkpoint",
    "read_checkpoint",
    "load_checkpoint_weights",
    "load_checkpoint_state",
    "restore_outputs",
    "recover_outputs",
    "rng_state",
    "set_rng_state",
]

log = logging.getLogger(__name__)

CHECKPOINT_META = "meta.json"
CHECKPOINT_STATE = "state.pt"


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_trained(
    folder: str | Path,
    model: nn.Module,
    params: Params,
    labels: list[str],
    tokenizer: Any,
    info: dict[str, Any] | None = None,
) -> None:
    """Write a self-contained model folder atomically (no pickles: safetensors + JSON)."""
    with staging_dir(folder) as tmp:
        save_file(_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        write_json(
            tmp / TRAINED_FILE,
            {
                "format": FORMAT_VERSION,
                "params": params_to_dict(params),
                "model_config": model.config.to_dict(),
                "tokenizer": {"name": params.model.text_model, "path": TOKENIZER_DIR},
                "labels": {label: i for i, label in enumerate(labels)},
                "info": info or {},
            },
        )


# ---------------------------------------------------------------------------------------------
# RNG state of one process, in plain containers (torch.load(weights_only=True) reads it back).


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": np_state[1].tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np.array(np_state["keys"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The resumable checkpoint.


@dataclass
class Progress:
    """What the loop needs to continue; saved in the checkpoint's meta.json."""

    epoch: int = 0  # epochs finished
    global_step: int = 0  # optimizer steps taken
    best_score: float = -1.0
    best_epoch: int = 0
    epochs_since_best: int = 0
    finished: bool = False
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def run_fingerprint(params: Params, features_dir: Path, labels: list[str]) -> str:
    """What a checkpoint must match to be resumed: all params, the label map and the bytes of the
    feature cache (hashed: a second or two per GB, once per run)."""
    return section_hash(params, labels, tree_sha256(features_dir))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_checkpoint(
    folder: Path,
    *,
    fingerprint: str,
    progress: Progress,
    model: nn.Module,
    training_state: dict[str, Any],
    best_dir: Path,
    live_dir: Path,
) -> None:
    """Write ``checkpoint/`` atomically; ``training_state`` (optimizer, scheduler, scaler, sampler
    and RNG states) goes into ``state.pt``."""
    with staging_dir(folder) as tmp:
        save_file(_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        torch.save(training_state, tmp / CHECKPOINT_STATE)
        # The best model changes rarely and its files are never rewritten in place: hard links
        # make these copies free where the file system allows.
        if best_dir.is_dir():
            shutil.copytree(best_dir, tmp / "best", copy_function=_link_or_copy)
        if live_dir.is_dir():
            shutil.copytree(live_dir, tmp / "dvclive")
        write_json(
            tmp / CHECKPOINT_META,
            {"format": FORMAT_VERSION, "fingerprint": fingerprint, **progress.__dict__},
        )


def read_checkpoint(folder: Path, fingerprint: str) -> Progress | None:
    """The checkpoint's progress when it exists and matches this run, else None."""
    meta_path = folder / CHECKPOINT_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _unreadable(meta_path, exc) from exc
    if meta.get("format") != FORMAT_VERSION or meta.get("fingerprint") != fingerprint:
        log.warning("%s: ignoring the checkpoint (params, labels or features changed)", folder)
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


def load_checkpoint_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise _unreadable(path, exc) from exc


def load_checkpoint_state(folder: Path) -> dict[str, Any]:
    path = folder / CHECKPOINT_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise _unreadable(path, exc) from exc


def recover_outputs(best_dir: Path, ckpt_dir: Path) -> None:
    """Finish folder swaps a kill cut short (main process only: no other writer exists)."""
    recover_swap(best_dir)
    recover_swap(ckpt_dir)


def restore_outputs(ckpt_dir: Path, best_dir: Path, live_dir: Path) -> None:
    """Put back ``best/`` and the dvclive logs as they were at the checkpoint: a killed run may
    have lost them (``dvc repro`` deletes outputs) or logged steps past the checkpoint."""
    if (ckpt_dir / "best").is_dir():
        with staging_dir(best_dir) as tmp:
            shutil.copytree(ckpt_dir / "best", tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
    if (ckpt_dir / "dvclive").is_dir():
        shutil.rmtree(live_dir, ignore_errors=True)
        shutil.copytree(ckpt_dir / "dvclive", live_dir)
