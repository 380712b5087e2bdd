"""A trained model folder (``models/best``): its format and its reader.

Layout, written by :func:`pipeline.train.checkpoint.save_trained`::

    model.safetensors   the state dict (no pickles)
    trained.json        format, params, model config (RemoteConfig.to_dict), tokenizer path,
                        label map, and info (epoch, dev metrics, processes)
    tokenizer/          the text tokenizer, markers included
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Params, params_from_dict
from pipeline.data.records import label_list
from pipeline.model.config import RemoteConfig
from pipeline.model.remote import RemoteModel

__all__ = [
    "WEIGHTS_FILE",
    "TRAINED_FILE",
    "TOKENIZER_DIR",
    "FORMAT_VERSION",
    "TrainedModel",
    "load_trained",
]

WEIGHTS_FILE = "model.safetensors"
TRAINED_FILE = "trained.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


@dataclass
class TrainedModel:
    """A model folder loaded back: the model (eval mode) and what is needed to feed it."""

    model: nn.Module
    params: Params
    labels: list[str]
    tokenizer: Any
    info: dict[str, Any]


def load_trained(folder: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild a model from its folder (config -> random init -> weights), in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    folder = Path(folder)
    meta_path = folder / TRAINED_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a trained model folder (no {TRAINED_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder / meta["tokenizer"]["path"]))
    model = RemoteModel.from_config(RemoteConfig.from_dict(meta["model_config"]), tokenizer)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    model.to(device).eval()
    return TrainedModel(
        model=model,
        params=params_from_dict(meta["params"]),
        labels=label_list(meta["labels"]),
        tokenizer=tokenizer,
        info=meta.get("info", {}),
    )
