"""Where inference runs and in which precision: one rule for the depth, caption, evaluate and
predict code (training gets its device from accelerate)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

import torch
from accelerate import PartialState

__all__ = [
    "DTYPES",
    "is_distributed_launch",
    "keep_freed_memory",
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


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# Set to 1 to keep glibc's own malloc settings (keep_freed_memory does nothing).
SYSTEM_MALLOC_ENV = "REMOTE_SYSTEM_MALLOC"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default every block over 32 MB (most activations at paper sizes) is a fresh ``mmap``: each
    allocation page-faults its whole size in and each free unmaps it. A CPU training step at seq 256
    refaults about 2 GB this way (0.5 M faults of ~3 us here). With ``mmap`` off and no trimming,
    a step reuses the heap that earlier steps grew; the peak RSS stays the same (measured: 13.0 GB
    either way, at 12% less time per step: ``bench/model.py``). Numbers are unchanged: only where
    memory comes from. Process-wide and idempotent; ``REMOTE_SYSTEM_MALLOC=1`` opts out. Returns
    whether the settings took (False off glibc)."""
    if os.environ.get(SYSTEM_MALLOC_ENV) == "1":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mmap off (glibc still falls back to it when the heap cannot grow); trim -1: never (mallopt(3))
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


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
