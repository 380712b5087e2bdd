"""``python -m bench.device``: the smoke run on the CPU writes every section, and the targets are
read from a report as the issue states them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.device import SECTIONS, TARGETS, check_targets, table

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "device-report.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.device", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert sorted(sections) == sorted(SECTIONS)  # the JSON sorts its keys
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(SECTIONS, "ok")

    env = sections["environment"]["result"]
    assert env["smoke"] is True and env["torch"] and env["commit"]
    tests = sections["gpu_tests"]["result"]
    # Without CUDA every GPU test is collected and skipped cleanly.
    assert (tests["passed"], tests["failed"]) == (0, 0) and tests["skipped"] >= 10
    assert all("CUDA" in t["message"] or "2 GPUs" in t["message"] for t in tests["tests"])

    configs = [
        c
        for name, s in sections.items()
        if name.startswith("train_step")
        for c in s["result"]["configs"]
    ]
    seen = {(c["padding"], c["precision"], c["checkpointing"]) for c in configs}
    for padding in ("max_seq", "per_batch"):
        for precision in ("fp32", "bf16", "bf16 + compile"):
            for checkpointing in (False, True):
                assert (padding, precision, checkpointing) in seen
    assert ("max_seq", "fp32 strict", False) in seen
    assert all(c["losses_finite"] and c["median_step_s"] > 0 for c in configs)

    for name, unit, count in (
        ("depth", "images_per_s", "images"),
        ("caption", "items_per_s", "items"),
    ):
        runs = sections[name]["result"]["runs"]
        assert [r["batch_size"] for r in runs] == [1, 4]
        assert all(r[unit] > 0 and r[count] > 0 for r in runs)
    assert all(r["finite"] for r in sections["depth"]["result"]["runs"])
    assert all(r["answers"] == r["items"] for r in sections["caption"]["result"]["runs"])

    assert report["table"] in result.stdout
    assert "| max_seq | bf16 + compile | True |" in report["table"]


def _report(**results) -> dict:
    sections = {name: {"status": "ok", "result": result} for name, result in results.items()}
    return {"smoke": False, "seconds": 400.0, "sections": sections}


def _config(precision: str, checkpointing: bool, step: float, memory: float) -> dict:
    return {
        "padding": "max_seq",
        "precision": precision,
        "checkpointing": checkpointing,
        "median_step_s": step,
        "first_step_s": step,
        "peak_memory_gib": memory,
    }


def test_targets_are_read_from_the_report():
    report = _report(
        **{
            "train_step:max_seq:eager": {
                "configs": [_config("fp32", False, 1.0, 40.0), _config("fp32", True, 1.3, 18.0)]
            },
            "train_step:max_seq:compile": {"configs": [_config("bf16 + compile", False, 0.4, 30)]},
            "depth": {
                "runs": [
                    {"dtype": "float16", "batch_size": 1, "images_per_s": 10.0},
                    {"dtype": "float16", "batch_size": 16, "images_per_s": 25.0},
                ]
            },
        }
    )
    targets = {t["target"]: t for t in check_targets(report)}
    assert list(targets) == list(TARGETS)
    step = targets["bf16 + compile step time / fp32 eager step time (max_seq 256)"]
    assert (step["value"], step["holds"]) == (pytest.approx(0.4), True)
    memory = targets["peak memory with / without checkpointing (fp32, max_seq 256)"]
    assert (memory["value"], memory["holds"]) == (pytest.approx(0.45), True)
    depth = targets["depth images/s, batch 16 / batch 1 (fp16)"]
    assert (depth["value"], depth["holds"]) == (pytest.approx(2.5), False)
    # A section that did not run leaves its target open, not failed.
    caption = targets["caption items/s, batch 16 / batch 1"]
    assert (caption["value"], caption["holds"]) == (None, None)
    assert targets["whole check, seconds"]["holds"] is True
    text = table(report)
    assert "| depth images/s, batch 16 / batch 1 (fp16) | >= 3 | 2.5 | False |" in text


def test_the_gpu_caption_setting_has_the_7b_shapes():
    """The caption section's GPU setting, built on the meta device (its code runs nowhere else
    before a GPU does): Qwen2.5-VL-7B's 8.29 B parameters in bfloat16, and 192 image tokens per
    448x336 image, also after the tiny captioner's processor was built in the same process."""
    import torch
    from PIL import Image

    from bench.device import caption_setting, image_tokens

    processor, model, image_size = caption_setting(smoke=False, device="meta")
    parameters = sum(p.numel() for p in model.parameters())
    assert 8.25e9 < parameters < 8.35e9, parameters
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert image_size == (448, 336)
    assert image_tokens(processor, Image.new("RGB", image_size)) == (448 // 28) * (336 // 28)
    tiny, _, tiny_size = caption_setting(smoke=True, device="cpu")
    assert image_tokens(tiny, Image.new("RGB", tiny_size)) == 4  # at most 56x56 pixels


def test_a_section_past_its_limit_is_killed_with_its_children(tmp_path):
    """The time limit ends the section's whole process group: a grandchild (as the gpu_tests
    section's pytest and its stage commands) does not run on beside the next section."""
    import os

    from bench.device import run_group

    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    begin = time.perf_counter()
    returncode, stderr = run_group([sys.executable, "-c", script], limit=3)
    assert returncode is None and "started" in stderr
    assert time.perf_counter() - begin < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed; gone once its parent (init) reaps it
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{grandchild}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grandchild {grandchild} still runs")
    assert run_group([sys.executable, "-c", "import sys; sys.exit(3)"], limit=30) == (3, "")


def test_pytest_results_are_kept_as_they_come_and_survive_the_time_limit(tmp_path):
    """The gpu_tests section's pytest: every outcome (a setup error, a skip, a module that cannot
    be imported) logged the moment it is known, so a run killed at its limit keeps the tests it
    finished."""
    from bench.device import run_pytest

    (tmp_path / "test_mixed.py").write_text(
        "import time\n"
        "import pytest\n"
        "@pytest.fixture\n"
        "def broken():\n"
        "    raise RuntimeError('no fixture')\n"
        "def test_a_passes():\n"
        "    pass\n"
        "def test_b_fails():\n"
        "    assert 1 == 2\n"
        "@pytest.mark.skip(reason='needs a CUDA GPU')\n"
        "def test_c_skips():\n"
        "    pass\n"
        "def test_d_setup_errors(broken):\n"
        "    pass\n"
        "def test_e_hangs():\n"
        "    time.sleep(120)\n"
    )
    (tmp_path / "test_unimportable.py").write_text("import not_a_package_anywhere\n")
    begin = time.perf_counter()
    result = run_pytest(["--continue-on-collection-errors", "."], limit=20, cwd=tmp_path)
    assert time.perf_counter() - begin < 60
    assert result["timed_out"] is True and result["exit_code"] is None
    outcomes = {t["test"]: (t["outcome"], t["message"]) for t in result["tests"]}
    assert outcomes["test_mixed.py::test_a_passes"] == ("passed", "")
    assert outcomes["test_mixed.py::test_b_fails"][0] == "failed"
    assert "assert 1 == 2" in outcomes["test_mixed.py::test_b_fails"][1]
    assert outcomes["test_mixed.py::test_c_skips"] == ("skipped", "needs a CUDA GPU")
    assert outcomes["test_mixed.py::test_d_setup_errors"][0] == "failed"
    assert "no fixture" in outcomes["test_mixed.py::test_d_setup_errors"][1]
    unimportable = outcomes["test_unimportable.py"]
    assert unimportable[0] == "failed" and "not_a_package_anywhere" in unimportable[1]
    assert "test_mixed.py::test_e_hangs" not in outcomes  # killed while it ran
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 3, 1)
