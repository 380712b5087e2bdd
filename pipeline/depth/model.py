"""Depth-Anything-V2 by name (``tiny``, a local folder, or a hub id) and batched inference.

Inputs are prepared as the original's ``infer_image`` did (:func:`input_size`, :func:`prepare_batch`).
``infer_depth`` returns the model's raw output (relative inverse depth, larger = nearer, not
normalized) at the model's output size; the depth stage stores it as it is, and the features stage
upsamples it to the image's size on read, as the original did after inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.device import autocast
from pipeline.hub import resolve

if TYPE_CHECKING:
    import torch
    from transformers import DepthAnythingForDepthEstimation

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "input_size",
    "input_settings",
    "image_tensor",
    "prepare_batch",
    "DEPTH_ARCHITECTURES",
    "random_depth_model",
    "tiny_depth_model",
    "load_depth_model",
    "place_depth_model",
    "predict_depth",
    "infer_depth",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_multiple(x: float, multiple: int, minimum: int) -> int:
    """``x`` rounded (half to even, as numpy) to a multiple of ``multiple``; rounded up instead
    when that falls below ``minimum``."""
    y = round(x / multiple) * multiple
    if y < minimum:
        y = math.ceil(x / multiple) * multiple
    return int(y)


def input_size(width: int, height: int, lower_bound: int, multiple: int) -> tuple[int, int]:
    """The original's model input ``(width, height)`` for an image (Depth-Anything-V2
    ``infer_image``, ``Resize(keep_aspect_ratio=True, resize_method="lower_bound")``): scaled by the
    larger of ``lower_bound / height`` and ``lower_bound / width``, so both sides are at least
    ``lower_bound``, each side then a multiple of ``multiple``. 600 x 400 -> 777 x 518 -> 784 x 518."""
    scale = max(lower_bound / height, lower_bound / width)
    return (
        _to_multiple(scale * width, multiple, lower_bound),
        _to_multiple(scale * height, multiple, lower_bound),
    )


def input_settings(model: DepthAnythingForDepthEstimation) -> tuple[int, int]:
    """``(lower_bound, multiple)`` of a model's input: its backbone's image and patch sizes
    (518 and 14 for the released Depth-Anything-V2 checkpoints, as the original's input size)."""
    backbone = model.config.backbone_config
    return int(backbone.image_size), int(backbone.patch_size)


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a uint8 ``[3, H, W]`` tensor (what the depth stage hands the device)."""
    import torch

    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def prepare_batch(
    images: Sequence[torch.Tensor], lower_bound: int, multiple: int, device: torch.device
) -> torch.Tensor:
    """uint8 ``[3, H, W]`` images that share one :func:`input_size` -> the model's input
    ``[N, 3, h, w]`` on ``device``: scaled to [0, 1], resized bicubic (no antialiasing, as OpenCV's
    ``INTER_CUBIC``), normalized with ImageNet mean and std, all in torch on ``device``."""
    import torch
    from torch.nn import functional as F

    resized = []
    for image in images:
        width, height = input_size(image.shape[2], image.shape[1], lower_bound, multiple)
        pixels = image.to(device, non_blocking=True)[None].float() / 255.0
        if (height, width) != tuple(pixels.shape[2:]):
            pixels = F.interpolate(
                pixels, size=(height, width), mode="bicubic", align_corners=False
            )
        resized.append(pixels)
    batch = torch.cat(resized)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]
    return (batch - mean) / std


# Depth-Anything-V2 architectures with random weights: (DINOv2 backbone, DPT head) settings.
# "tiny" (121k parameters, input lower bound 56) runs every code path offline; "small" has
# Depth-Anything-V2-Small's sizes with a lower bound of 112 (not 518) so it finishes on a CPU;
# "large" is Depth-Anything-V2-Large's architecture (the device check's throughput model).
DEPTH_ARCHITECTURES = {
    "tiny": (
        {"image_size": 56, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
         "mlp_ratio": 2, "out_indices": [1, 2, 3, 4]},
        {"fusion_hidden_size": 16, "neck_hidden_sizes": [8, 16, 32, 32], "head_hidden_size": 8,
         "reassemble_hidden_size": 32},
    ),
    "small": (
        {"image_size": 112, "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
         "mlp_ratio": 4, "out_indices": [3, 6, 9, 12]},
        {"fusion_hidden_size": 64, "neck_hidden_sizes": [48, 96, 192, 384], "head_hidden_size": 32,
         "reassemble_hidden_size": 384},
    ),
    "large": (
        {"image_size": 518, "hidden_size": 1024, "num_hidden_layers": 24,
         "num_attention_heads": 16, "mlp_ratio": 4, "out_indices": [5, 12, 18, 24],
         "layerscale_value": 1.0},
        {"fusion_hidden_size": 256, "neck_hidden_sizes": [256, 512, 1024, 1024],
         "head_hidden_size": 32, "reassemble_hidden_size": 1024,
         "reassemble_factors": [4, 2, 1, 0.5]},
    ),
}  # fmt: skip


def random_depth_model(architecture: str, seed: int = 0) -> DepthAnythingForDepthEstimation:
    """A Depth-Anything-V2 of :data:`DEPTH_ARCHITECTURES` with seeded random weights (patch 14),
    built on the current default device, in eval mode."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
    )

    backbone, head = DEPTH_ARCHITECTURES[architecture]
    config = DepthAnythingConfig(
        backbone_config=Dinov2Config(patch_size=14, reshape_hidden_states=False, **backbone),
        **head,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DepthAnythingForDepthEstimation(config)
    return model.eval()


def tiny_depth_model(seed: int = 0) -> DepthAnythingForDepthEstimation:
    """A 121k-parameter Depth-Anything-V2 with seeded random weights (input lower bound 56)."""
    return random_depth_model("tiny", seed)


def load_depth_model(name: str) -> DepthAnythingForDepthEstimation:
    """The model by name: "tiny", a local folder, or a hub id (same loader). Its input is prepared
    by :func:`prepare_batch` (the original's resize), not by the checkpoint's image processor."""
    from transformers import DepthAnythingForDepthEstimation

    source = resolve(name)
    if source.kind == "tiny":
        return tiny_depth_model()
    location = str(source.path) if source.kind == "local" else source.name
    try:
        model = DepthAnythingForDepthEstimation.from_pretrained(location)
    except OSError as exc:
        raise OSError(
            f"depth.model={name!r}: cannot load it ({exc}). Without network, download the model "
            "to a folder and set depth.model to that folder."
        ) from exc
    return model.eval()


def place_depth_model(
    model: DepthAnythingForDepthEstimation, device: torch.device
) -> DepthAnythingForDepthEstimation:
    """The model on ``device``; on a GPU in channels-last memory format, which cuDNN's
    convolutions (the DPT neck and head) prefer, its inputs following (:func:`infer_depth`)."""
    import torch

    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def predict_depth(
    model: DepthAnythingForDepthEstimation,
    images: Sequence[Image.Image],
    batch_size: int,
    dtype: str,
) -> list[np.ndarray]:
    """Raw depth (float32 ``[h, w]`` at the model's input size) per image, in input order."""
    return infer_depth(model, [image_tensor(im) for im in images], batch_size, dtype)


def infer_depth(
    model: DepthAnythingForDepthEstimation,
    images: Sequence[torch.Tensor],
    batch_size: int,
    dtype: str,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Raw depth per uint8 ``[3, H, W]`` image (:func:`image_tensor`), in input order.

    Images are batched with others of the same model input size (:func:`input_size`, in order of
    first appearance), so no batch carries padding; resizing and normalizing run on the model's
    device (:func:`prepare_batch`); ``dtype`` float16/bfloat16 turns on autocast on a GPU.
    """
    import torch

    device = next(model.parameters()).device
    lower_bound, multiple = input_settings(model)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        size = input_size(image.shape[2], image.shape[1], lower_bound, multiple)
        groups.setdefault(size, []).append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    with torch.inference_mode():
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                batch = prepare_batch([images[i] for i in chunk], lower_bound, multiple, device)
                if device.type == "cuda":
                    batch = batch.contiguous(memory_format=torch.channels_last)
                with autocast(device, dtype):
                    predicted = model(pixel_values=batch).predicted_depth
                for i, depth in zip(chunk, predicted.float().cpu().numpy(), strict=True):
                    out[i] = depth
                if on_batch is not None:
                    on_batch(len(chunk))
    return out  # type: ignore[return-value]
