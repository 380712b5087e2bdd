"""Where inference runs and in which precision: one rule for the depth, caption, evaluate and
predict code (training gets its device from accelerate)."""

from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["DTYPES", "select_device", "torch_dtype", "effective_dtype", "autocast"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def select_device() -> torch.device:
    """GPU ``LOCAL_RANK`` (0 outside a launcher) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def torch_dtype(name: str) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` -> the torch dtype."""
    return DTYPES[name]


def effective_dtype(name: str, device: torch.device) -> str:
    """The dtype that runs: reduced precision only where autocast serves it (a GPU); the CPU
    always computes in float32."""
    return name if device.type == "cuda" else "float32"


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on a GPU; a no-op on the CPU or for float32."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=torch_dtype(dtype))
    return contextlib.nullcontext()
