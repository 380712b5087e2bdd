"""The two pre-trained towers, chosen by name: a BERT text tower and a timm ViT.

Names resolve through :func:`pipeline.hub.resolve`:

- ``"tiny"``: a small random model built from a preset config (offline);
- a local folder: the text tower is a transformers folder (``save_pretrained``); the vision tower is a
  timm export folder (``config.json`` naming the architecture and its arguments + ``model.safetensors``,
  written by :func:`save_vision_tower`), loaded by timm's ``local-dir:`` source;
- anything else: a hub id for transformers, a timm model name (``vit_base_patch32_clip_quickgelu_224.openai``).

Local folders and hub names go through the same loader calls (``AutoModel.from_pretrained`` and
``timm.create_model``). Each loader also returns a JSON spec that rebuilds the architecture without
weights, which is what a trained model's config stores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pipeline.hub import is_tiny, resolve
from pipeline.io import staging_dir
from pipeline.vision import TINY_VISION_ARCHITECTURE, TINY_VISION_ARGS, timm_name

__all__ = [
    "TINY_TEXT_CONFIG",
    "TINY_VISION_ARCHITECTURE",
    "TINY_VISION_ARGS",
    "load_text_tower",
    "text_spec",
    "text_tower_from_spec",
    "load_vision_tower",
    "vision_tower_from_spec",
    "save_vision_tower",
    "vision_spec",
]

# Tiny preset: the paper's structure (BERT) at hidden size 64; the ViT's is in pipeline.vision.
TINY_TEXT_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
}


def _check_bert(config: Any, name: str) -> None:
    if config.model_type != "bert":
        raise ValueError(
            f"text tower {name!r}: model type {config.model_type!r} is not supported; the dual-stream "
            "encoder reuses BERT layers, so use a BERT-architecture model (model_type 'bert')"
        )
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"text tower {name!r}: only absolute position embeddings are supported")


def load_text_tower(name: str, pretrained: bool, vocab_size: int) -> tuple[nn.Module, dict]:
    """A ``BertModel`` (no pooler) with ``vocab_size`` token embeddings, and its rebuild spec."""
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel

    source = resolve(name)
    if source.kind == "tiny":
        model = BertModel(
            BertConfig(vocab_size=vocab_size, **TINY_TEXT_CONFIG), add_pooling_layer=False
        )
    else:
        location = str(source.path or source.name)
        config = AutoConfig.from_pretrained(location)
        _check_bert(config, name)
        if pretrained:
            model = AutoModel.from_pretrained(location, add_pooling_layer=False)
        else:
            model = AutoModel.from_config(config, add_pooling_layer=False)
    if model.get_input_embeddings().num_embeddings != vocab_size:
        _resize_embeddings(model, vocab_size)
    return model, text_spec(model)


def text_spec(model: nn.Module) -> dict:
    """The rebuild spec of a ``BertModel``: its whole config, less the label maps of a
    classification head it does not have (BERT's default ``LABEL_0``/``LABEL_1`` would sit in a
    saved ``config.json`` beside the model's own labels)."""
    config = model.config.to_dict()
    for key in ("id2label", "label2id"):
        config.pop(key, None)
    return {"bert_config": config}


def _resize_embeddings(model: nn.Module, vocab_size: int) -> None:
    """Resize the token embeddings to ``vocab_size`` rows (the tokenizer adds the 12 entity markers,
    :data:`pipeline.text.MARKERS`); each new row is drawn independently from
    ``N(0, initializer_range)`` with torch's global generator, as in the original. transformers 5's
    default mean-resizing would start all markers as one vector."""
    import torch

    old_size = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    if vocab_size > old_size:
        rows = model.get_input_embeddings().weight
        with torch.no_grad():
            rows[old_size:].normal_(0.0, model.config.initializer_range)


def text_tower_from_spec(spec: dict) -> nn.Module:
    """A randomly initialized text tower with the architecture of ``spec``."""
    from transformers import BertConfig, BertModel

    config = BertConfig.from_dict(spec["bert_config"])
    _check_bert(config, "from config")
    return BertModel(config, add_pooling_layer=False)


def vision_spec(model: nn.Module) -> dict:
    """The rebuild spec of a timm ViT: its architecture name and constructor arguments."""
    from timm.models import get_model_args

    args = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_args(model).items()}
    return {"architecture": model.pretrained_cfg["architecture"], "model_args": args}


def load_vision_tower(name: str, pretrained: bool) -> tuple[nn.Module, dict]:
    """A timm ViT without classifier (pretrained weights when asked and available), and its spec."""
    import timm

    if is_tiny(name):
        model = timm.create_model(
            TINY_VISION_ARCHITECTURE, pretrained=False, num_classes=0, **TINY_VISION_ARGS
        )
    else:
        model = timm.create_model(timm_name(name), pretrained=pretrained, num_classes=0)
    return model, vision_spec(model)


def vision_tower_from_spec(spec: dict) -> nn.Module:
    """A randomly initialized vision tower with the architecture of ``spec``."""
    import timm

    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["model_args"].items()}
    args["num_classes"] = 0
    return timm.create_model(spec["architecture"], pretrained=False, **args)


def save_vision_tower(model: nn.Module, folder: str | Path) -> Path:
    """Write a timm ViT as a folder that :func:`load_vision_tower` loads (timm's own export format:
    ``config.json`` with the architecture and its arguments, ``model.safetensors``), atomically."""
    from timm.models import save_for_hf

    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder}: already exists")
    with staging_dir(folder) as tmp:
        save_for_hf(model, str(tmp), safe_serialization=True)
    return folder
