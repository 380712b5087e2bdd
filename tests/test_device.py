"""pipeline.device: the allocator setting every stage process starts with, and where and in which
precision the code runs (launch, device, determinism, TF32, dtypes, autocast)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import pipeline.device
from pipeline.device import (
    autocast,
    effective_dtype,
    is_distributed_launch,
    process_state,
    select_device,
    set_determinism,
    set_tf32,
    torch_dtype,
)

# Allocate, touch and free a 64 MiB buffer nine times: the fewest minor page faults of an
# allocation after the first (the fewest: the first reuses may still grow the heap; measured
# here: 16384, 16384, 16384, then 0 from the fourth on, at worst).
PROBE = """
import resource, sys
import torch
from pipeline.device import keep_freed_memory
took = keep_freed_memory()
size = 64 * 2**20 // 4
torch.ones(size)  # allocated, touched, freed
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, min(faults))
"""


def _probe(**env: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    took, faults = out.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096  # 16384 pages of 4 KiB
    took, reused = _probe()
    assert took == "True" and reused < pages // 20, reused
    # REMOTE_SYSTEM_MALLOC=1 keeps glibc's defaults: a block this big is a fresh mmap each time,
    # faulted in again (in 4 KiB pages, or 2 MiB ones where transparent huge pages are always on).
    took, fresh = _probe(REMOTE_SYSTEM_MALLOC="1")
    assert took == "False" and fresh > max(10 * reused, 16), (fresh, reused)


def test_a_launch_is_more_than_one_process_in_the_world(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not is_distributed_launch()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not is_distributed_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert is_distributed_launch()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process on each of two machines
    assert is_distributed_launch()


@pytest.mark.parametrize(
    ("world_size", "cuda", "cpu"),
    [("2", False, True), ("2", True, False), (None, False, False), ("1", False, False)],
)
def test_accelerate_is_told_cpu_only_for_a_launch_without_cuda(monkeypatch, world_size, cuda, cpu):
    # accelerate picks gloo only when told "cpu"; a single process keeps its defaults.
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(pipeline.device, "PartialState", lambda cpu: {"cpu": cpu})
    assert process_state() == {"cpu": cpu}


def test_the_device_is_this_processs_local_gpu_else_the_cpu(monkeypatch):
    state = type("State", (), {"process_index": 3, "local_process_index": 1})()
    monkeypatch.setattr(pipeline.device, "process_state", lambda: state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # The fourth process of the launch, the second on its machine: its machine's GPU 1.
    assert select_device() == torch.device("cuda", 1)


@pytest.fixture
def determinism_restored():
    threads = torch.get_num_threads()
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def test_one_thread_is_a_thread_count_not_torchs_default(determinism_restored):
    torch.set_num_threads(2)
    set_determinism(1, False)
    assert torch.get_num_threads() == 1


def test_determinism_sets_the_cublas_workspace_unless_the_user_did(
    monkeypatch, determinism_restored
):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    set_determinism(0, False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    set_determinism(0, True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the smaller, also deterministic one
    set_determinism(0, True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_tf32_switches_matrix_products_only():
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    try:
        for enabled in (True, False, True):
            set_tf32(enabled)
            assert torch.backends.cuda.matmul.allow_tf32 is enabled
            assert torch.backends.cudnn.allow_tf32 is cudnn  # convolutions keep the default
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def test_the_dtype_names_and_the_dtype_that_runs():
    assert [torch_dtype(n) for n in ("float32", "float16", "bfloat16")] == [
        torch.float32,
        torch.float16,
        torch.bfloat16,
    ]
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert [effective_dtype(n, gpu) for n in ("float32", "float16", "bfloat16")] == [
        "float32",
        "float16",
        "bfloat16",
    ]
    assert [effective_dtype(n, cpu) for n in ("float16", "bfloat16")] == ["float32", "float32"]


def test_autocast_only_for_reduced_precision_on_a_gpu():
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert isinstance(autocast(cpu, "bfloat16"), contextlib.nullcontext)
    assert isinstance(autocast(gpu, "float32"), contextlib.nullcontext)
    for name, dtype in [("float16", torch.float16), ("bfloat16", torch.bfloat16)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # without CUDA, torch warns that it stays off
            context = autocast(gpu, name)
        assert isinstance(context, torch.autocast)
        assert (context.device, context.fast_dtype) == ("cuda", dtype)
