"""The vision tower by name, as far as the stages before the model need it: the timm name it
stands for, its tiny preset, and the pixel normalization it brings (its timm ``pretrained_cfg``).

:mod:`pipeline.model.towers` builds the tower from :func:`timm_name`; the features stage and
``predict`` normalize the crops with :func:`pixel_normalization` of the same name, so a tower chosen
by name sees its crops normalized as it was trained.
"""

from __future__ import annotations

from pipeline.hub import resolve

__all__ = ["TINY_VISION_ARCHITECTURE", "TINY_VISION_ARGS", "timm_name", "pixel_normalization"]

# Tiny preset: the paper's structure (CLIP ViT with QuickGELU, patch 32) at hidden size 64.
TINY_VISION_ARCHITECTURE = "vit_base_patch32_clip_quickgelu_224"
TINY_VISION_ARGS = {"embed_dim": 64, "depth": 4, "num_heads": 4}


def timm_name(name: str) -> str:
    """The name ``timm.create_model`` takes for a vision tower name: the tiny preset's
    architecture, ``local-dir:<folder>`` for a timm export folder, else the name itself."""
    source = resolve(name)
    if source.kind == "tiny":
        return TINY_VISION_ARCHITECTURE
    if source.kind == "local":
        if not (source.path / "config.json").is_file():
            raise FileNotFoundError(
                f"{source.path}: not a vision tower folder (expected config.json naming a timm "
                "architecture and model.safetensors, as written by save_vision_tower)"
            )
        return f"local-dir:{source.path}"
    return source.name


def pixel_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel RGB mean and std (of pixels in [0, 1]) from the tower's ``pretrained_cfg``."""
    import timm
    import torch

    with torch.device("meta"):  # only the config is wanted: no weights allocated or initialized
        model = timm.create_model(timm_name(name), pretrained=False, num_classes=0)
    config = timm.data.resolve_data_config(model=model)
    return tuple(config["mean"]), tuple(config["std"])
