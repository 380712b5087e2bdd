"""Where inference runs and in which precision: one rule for the depth, caption, evaluate and
predict code (training gets its device from accelerate)."""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import PartialState

__all__ = [
    "DTYPES",
    "is_distributed_launch",
    "process_state",
    "select_device",
    "set_determinism",
    "set_tf32",
    "torch_dtype",
    "effective_dtype",
    "autocast",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_distributed_launch() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started several processes; read from its
    environment, before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state() -> PartialState:
    """This process's place in a launch: accelerate's ``PartialState`` (``process_index``,
    ``num_processes``, ``local_process_index``, ``device``, ``is_main_process``). Without CUDA a
    launch of several processes must say "cpu" for accelerate to pick gloo."""
    return PartialState(cpu=is_distributed_launch() and not torch.cuda.is_available())


def select_device() -> torch.device:
    """This process's GPU under a launcher (the first outside one) when CUDA is available, else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", process_state().local_process_index)
    return torch.device("cpu")


def set_determinism(threads: int, deterministic: bool) -> None:
    """Fix what the numbers of a run depend on besides the seed (process-wide).

    ``threads > 0`` sets torch's intra-op thread count (it overrides ``OMP_NUM_THREADS``): a CPU
    reduction splits its work by thread, so its rounding, and after a few hundred steps the trained
    weights, depend on it. ``deterministic`` turns on ``torch.use_deterministic_algorithms`` (warning
    instead of failing where an op has no deterministic kernel) and the cuBLAS workspace setting it
    needs on GPUs. What stays outside: the CPU kind (AVX2 and AVX-512 kernels round differently) and
    the library versions.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def set_tf32(enabled: bool) -> None:
    """Float32 matrix products on GPUs in TF32 (Ampere and later; ~10 significant bits in the
    products, float32 accumulation) or in full float32, PyTorch's default and the original's. No
    effect on the CPU; convolutions keep PyTorch's default (TF32 allowed in cuDNN)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled


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
