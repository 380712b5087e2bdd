"""A trained model folder: its format, its writer and its reader.

The folder is a Hugging Face Hub model repository: ``hf upload <user>/<name> models/best`` publishes
it as is, and :func:`load_trained` (or ``RemoteModel.from_pretrained`` for the bare model) reads it
back from a folder or a Hub id. Layout::

    config.json         the architecture (RemoteConfig's JSON form; RemoteModel.save_pretrained)
    model.safetensors   the state dict (no pickles)
    trained.json        format, params, tokenizer path, label map, and info (epoch, dev metrics,
                        processes)
    tokenizer/          the text tokenizer, markers included
    README.md           the model card (:mod:`pipeline.model.card`)

``train`` keeps the dev-selected folder in ``models/checkpoint/best`` and copies it to
``models/selected`` when it ends; ``evaluate`` scores that on test and writes ``models/best``: the
same files with the card's test metrics.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import (
    ADDED_PARAMS_HINT,
    Params,
    ParamsError,
    params_from_dict,
    params_to_dict,
    with_added_params,
)
from pipeline.data.records import label_list
from pipeline.hub import no_folder_error
from pipeline.io import write_json
from pipeline.model.card import CARD_FILE
from pipeline.model.remote import CONFIG_FILE, WEIGHTS_FILE, RemoteModel

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "TRAINED_FILE",
    "TOKENIZER_DIR",
    "CARD_FILE",
    "FORMAT_VERSION",
    "TrainedModel",
    "write_trained",
    "copy_trained",
    "load_trained",
    "read_trained_params",
    "model_folder",
]

TRAINED_FILE = "trained.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 2  # 2: config.json (the Hub mixin's) instead of trained.json's model_config


@dataclass
class TrainedModel:
    """A model folder loaded back: the model (eval mode) and what is needed to feed it."""

    model: nn.Module
    params: Params
    labels: list[str]
    tokenizer: Any
    info: dict[str, Any]


def write_trained(
    folder: Path,
    model: RemoteModel,
    params: Params,
    labels: list[str],
    tokenizer: Any,
    info: dict[str, Any],
    card: str,
) -> None:
    """Write a model folder into ``folder`` (an empty staging folder: the caller swaps it in)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CARD_FILE).write_text(card)  # before save_pretrained, which keeps an existing card
    model.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    write_json(
        folder / TRAINED_FILE,
        {
            "format": FORMAT_VERSION,
            "params": params_to_dict(params),
            "tokenizer": {"name": params.model.text_model, "path": TOKENIZER_DIR},
            "labels": {label: i for i, label in enumerate(labels)},
            "info": info,
        },
    )


def copy_trained(source: Path, folder: Path, card: str, copy_function: Any = shutil.copy2) -> None:
    """A model folder's files into ``folder`` (a staging folder) with a new card."""
    shutil.copytree(source, folder, copy_function=copy_function, dirs_exist_ok=True)
    (folder / CARD_FILE).unlink(missing_ok=True)
    (folder / CARD_FILE).write_text(card)


def model_folder(name: str | Path) -> Path:
    """A model folder's local path: ``name`` itself (``~`` expanded) where it is a folder or looks
    like a path, else the Hub snapshot of the id ``name`` (downloaded once, then cached)."""
    folder = Path(name).expanduser()
    if folder.is_dir() or str(name).startswith((".", "/", "~")):
        return folder
    from huggingface_hub import snapshot_download  # a Hub id: one download, then cached

    try:
        return Path(snapshot_download(str(name)))
    except (OSError, ValueError) as exc:  # offline, no such repository, not a valid id
        raise no_folder_error(name, exc) from exc


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / TRAINED_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a trained model folder (no {TRAINED_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION} (a folder "
            "written by an older version: retrain, or rerun `dvc repro evaluate` after training)"
        )
    return meta


def _meta_params(folder: Path, meta: dict[str, Any]) -> Params:
    try:
        return params_from_dict(with_added_params(meta["params"]))
    except ParamsError as exc:
        hint = f" ({ADDED_PARAMS_HINT})" if "missing key" in str(exc) else ""
        raise ParamsError(f"{folder / TRAINED_FILE}: params: {exc}{hint}") from exc


def read_trained_params(folder: str | Path) -> Params:
    """The params a model folder (or a Hub id) was trained with (its ``trained.json``),
    validated against this version's schema; no weights are read."""
    folder = model_folder(folder)
    return _meta_params(folder, _read_meta(folder))


def load_trained(folder: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """A model folder (or a Hub id) loaded back through ``RemoteModel.from_pretrained``, in eval
    mode, with its params, labels and tokenizer."""
    from transformers import AutoTokenizer

    folder = model_folder(folder)
    meta = _read_meta(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / meta["tokenizer"]["path"]))
    model = RemoteModel.from_pretrained(folder, map_location=str(device))
    model.check_tokenizer(tokenizer)
    return TrainedModel(
        model=model,
        params=_meta_params(folder, meta),
        labels=label_list(meta["labels"]),
        tokenizer=tokenizer,
        info=meta.get("info", {}),
    )
