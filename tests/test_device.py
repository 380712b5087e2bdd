"""pipeline.device: the allocator setting every stage process starts with."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
