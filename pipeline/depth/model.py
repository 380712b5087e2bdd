"""Depth-Anything-V2 by name (``tiny``, a local folder, or a hub id) and batched inference.

``infer_depth`` returns the model's raw output (relative inverse depth, larger = nearer, not
normalized) at the model's output size; the depth stage stores it as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline.device import autocast
from pipeline.hub import resolve

if TYPE_CHECKING:
    import torch
    from transformers import DepthAnythingForDepthEstimation

__all__ = [
    "depth_processor",
    "tiny_depth_model",
    "load_depth_model",
    "preprocess",
    "predict_depth",
    "infer_depth",
]


def depth_processor(short_side: int) -> Any:
    """The released Depth-Anything-V2 image processor settings, at ``short_side`` pixels."""
    from transformers import DPTImageProcessor

    return DPTImageProcessor(
        size={"height": short_side, "width": short_side},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        do_pad=False,
        resample=Image.Resampling.BICUBIC,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def tiny_depth_model(seed: int = 0) -> tuple[DepthAnythingForDepthEstimation, Any]:
    """A 121k-parameter Depth-Anything-V2 with seeded random weights and its image processor."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
    )

    backbone = Dinov2Config(
        image_size=56,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        fusion_hidden_size=16,
        neck_hidden_sizes=[8, 16, 32, 32],
        head_hidden_size=8,
        reassemble_hidden_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config)
    processor = depth_processor(56)
    return model.eval(), processor


def load_depth_model(name: str) -> tuple[DepthAnythingForDepthEstimation, Any]:
    """Model and image processor by name: "tiny", a local folder, or a hub id (same loader)."""
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation

    source = resolve(name)
    if source.kind == "tiny":
        return tiny_depth_model()
    location = str(source.path) if source.kind == "local" else source.name
    try:
        processor = AutoImageProcessor.from_pretrained(location)
        model = DepthAnythingForDepthEstimation.from_pretrained(location)
    except OSError as exc:
        raise OSError(
            f"depth.model={name!r}: cannot load it ({exc}). Without network, download the model "
            "to a folder and set depth.model to that folder."
        ) from exc
    return model.eval(), processor


def preprocess(processor: Any, image: Image.Image) -> torch.Tensor:
    """One image as the model's input, ``[3, h, w]``; h and w follow the image's aspect ratio."""
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def predict_depth(
    model: DepthAnythingForDepthEstimation,
    processor: Any,
    images: Sequence[Image.Image],
    batch_size: int,
    dtype: str,
) -> list[np.ndarray]:
    """Raw depth (float32 ``[h, w]`` at the model's output size) per image, in input order."""
    return infer_depth(model, [preprocess(processor, im) for im in images], batch_size, dtype)


def infer_depth(
    model: DepthAnythingForDepthEstimation,
    pixels: Sequence[torch.Tensor],
    batch_size: int,
    dtype: str,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Raw depth per preprocessed image, in input order.

    Inputs are batched with others of the same size (in order of first appearance), so no batch
    carries padding; ``dtype`` float16/bfloat16 turns on autocast on a GPU.
    """
    import torch

    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(pixels):
        groups.setdefault(tuple(p.shape), []).append(i)
    out: list[np.ndarray | None] = [None] * len(pixels)
    with torch.inference_mode(), autocast(device, dtype):
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                batch = torch.stack([pixels[i] for i in chunk]).to(device, non_blocking=True)
                predicted = model(pixel_values=batch).predicted_depth.float().cpu().numpy()
                for i, depth in zip(chunk, predicted, strict=True):
                    out[i] = depth
                if on_batch is not None:
                    on_batch(len(chunk))
    return out  # type: ignore[return-value]
