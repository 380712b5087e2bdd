"""The device check: everything that needs a GPU, as one command that writes its figures to a file.

    python -m bench.device                  # on a CUDA machine: device-report.json and a table
    python -m bench.device --smoke          # the same code at tiny sizes on the CPU (CI runs it)
    make device-check                       # the first, into bench/results/

Sections, in the order they run (each in its own subprocess with a time limit, so a crash, an
out-of-memory or a compile that does not end costs that section only; the report is rewritten
after every section, so a killed run keeps what it measured):

- ``environment``: GPU name, memory, driver, CUDA, library versions, the commit;
- ``gpu_tests``: ``pytest -m gpu`` (CUDA against CPU, the fused Sinkhorn against POT, bf16 steps,
  the depth, caption and train stages on CUDA, two processes where there are two GPUs), each
  test's outcome logged as it ends (``bench.pytest_log``), so one past the limit keeps the rest;
- ``train_step:*``: REMOTE training steps at the paper's sizes (BERT-base + ViT-B/32 shapes,
  random weights, 12 objects with depth, 28 labels, batch 32; texts padded to ``max_seq`` 256 as
  ``data.pad_to_max`` does, or per batch at realistic lengths; the paper preset's OT solver):
  median step time and peak memory (``torch.cuda.max_memory_allocated``) for fp32 (TF32 matrix
  products, ``train.tf32``; once also strict fp32), bf16 autocast and bf16 + ``torch.compile``,
  each with and without ``train.gradient_checkpointing``;
- ``depth``: Depth-Anything-V2-Large's architecture (random weights) through the depth stage's
  inference on 640x480 images (model input 686x518), batch 1 and 16, fp16 and bf16: images/s;
- ``caption``: a Qwen2.5-VL-7B-shaped model (random weights, built on the GPU in bf16) through
  the caption stage's ``Captioner``, batch 1 and 16, 24 new tokens: items/s and tokens/s.

``--smoke`` runs the same code on the CPU at tiny sizes (a 4-layer model of hidden 32, the tiny
depth model and captioner, a few steps); its compile uses the ``aot_eager`` backend, because
inductor needs minutes for even the tiny model on 2 cores (``tests/test_compile.py`` checks
inductor's numbers). Its figures only show that the code runs. Targets are checked on a GPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import operator
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# name -> (time limit in seconds on a GPU, what it measures); run in this order while the
# budget lasts. Eager step groups come before compiled ones: a compile may not finish in time.
SECTIONS: dict[str, int] = {
    "environment": 60,
    "gpu_tests": 180,
    "train_step:max_seq:eager": 120,
    "depth": 90,
    "caption": 150,
    "train_step:max_seq:compile": 150,
    "train_step:per_batch:eager": 90,
    "train_step:max_seq:compile+checkpointing": 150,
    "train_step:per_batch:compile": 150,
    "train_step:per_batch:compile+checkpointing": 150,
}
BUDGET_S = 450  # the whole check: under 8 minutes on one GPU (issue #16)
RESERVE_S = 15  # left for writing the report when the budget runs out
# How the status of a section starts when its time limit or the budget cut it short.
CUT_BY_TIME = ("timeout after", "skipped: time budget")

# Targets on a GPU (issue #16), checked on the report: (comparison, limit). The words:
# at most half, at most 0.5x, at least 3x, at least 4x, under 8 minutes.
TARGETS = {
    "bf16 + compile step time / fp32 eager step time (max_seq 256)": ("<=", 0.5),
    "peak memory with / without checkpointing (fp32, max_seq 256)": ("<=", 0.5),
    "depth images/s, batch 16 / batch 1 (fp16)": (">=", 3.0),
    "caption items/s, batch 16 / batch 1": (">=", 4.0),
    "whole check, seconds": ("<", 480.0),
}
_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


# ---------------------------------------------------------------------------------------------
# Sizes


def sizes(smoke: bool) -> dict[str, Any]:
    """What each section runs at: the paper's sizes on a GPU, tiny ones for ``--smoke``."""
    if smoke:
        return {
            "model": {"hidden": 32, "layers": 4, "iterations": 5, "objects": 4},
            "batch": 4,
            "max_seq": 128,
            "warmup": 1,
            "steps": 2,
            "compile_backend": "aot_eager",
            "depth": {"large": False, "image": (48, 64), "batches": (1, 4), "images": 8},
            "caption": {"seven_b": False, "batches": (1, 4), "items": 8, "new_tokens": 8},
        }
    return {
        "model": {"hidden": 768, "layers": 12, "iterations": 50, "objects": 12},
        "batch": 32,
        "max_seq": 256,
        "warmup": 2,
        "steps": 5,
        "compile_backend": "inductor",
        "depth": {"large": True, "image": (480, 640), "batches": (1, 16), "images": 64},
        "caption": {"seven_b": True, "batches": (1, 16), "items": 32, "new_tokens": 24},
    }


# ---------------------------------------------------------------------------------------------
# Sections (each runs in a child process)


def environment(smoke: bool) -> dict[str, Any]:
    import accelerate
    import timm
    import torch
    import transformers

    info: dict[str, Any] = {
        "smoke": smoke,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "accelerate": accelerate.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": _git(["rev-parse", "HEAD"]),
        "dirty": bool(_git(["status", "--porcelain", "--untracked-files=no"])),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            driver=_nvidia_smi("driver_version"),
        )
    return info


def gpu_tests(smoke: bool, limit: float) -> dict[str, Any]:
    """``pytest -m gpu``, ended 15 s before the section's ``limit`` so that what it finished is
    reported."""
    # A test module that cannot be imported there (a package the GPU image lacks) is reported
    # as an error, and the GPU tests still run.
    args = ["-m", "gpu", "--continue-on-collection-errors", "tests"]
    return run_pytest(args, max(10.0, limit - 15))


def run_pytest(args: list[str], limit: float, cwd: Path = ROOT) -> dict[str, Any]:
    """``pytest args`` in a process group of its own, killed after ``limit`` seconds; each
    test's outcome as it was logged (``bench.pytest_log``), so a killed run keeps the tests it
    finished; ``exit_code`` None and ``timed_out`` then."""
    from bench.pytest_log import LOG_ENV

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "tests.jsonl"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["-p", "bench.pytest_log", *args]
        env = _child_env() | {LOG_ENV: str(log)}
        returncode, output = run_group(command, limit, merge_stdout=True, cwd=cwd, env=env)
        lines = log.read_text().splitlines() if log.is_file() else []
    tests = [json.loads(line) for line in lines]
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    result = {"exit_code": returncode, "timed_out": returncode is None, **counts, "tests": tests}
    if returncode not in (0, 5) and not tests:  # 5: no test selected
        result["log"] = output[-2000:]
    return result


def train_step(smoke: bool, padding: str, mode: str) -> dict[str, Any]:
    """One group of training-step measurements; ``padding`` ``max_seq`` or ``per_batch``;
    ``mode`` ``eager``, ``compile`` or ``compile+checkpointing``."""
    import torch

    from bench.model import build_model_and_batch
    from pipeline.device import set_tf32
    from pipeline.inference import to_device

    size = sizes(smoke)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, batch = build_model_and_batch(
        batch=size["batch"],
        pad_to=size["max_seq"] if padding == "max_seq" else None,
        solver="log_sinkhorn",  # the paper preset's
        **size["model"],
    )
    model, batch = model.to(device).train(), to_device(batch, device)
    if mode == "eager":
        configs = [
            ("fp32", False, False, True),
            ("fp32", False, True, True),
            ("bf16", False, False, True),
            ("bf16", False, True, True),
        ]
        if padding == "max_seq":
            configs.insert(1, ("fp32", False, False, False))  # strict fp32, the paper preset
    else:
        configs = [("bf16", True, mode == "compile+checkpointing", True)]
    results = []
    for precision, compiled, checkpointing, tf32 in configs:
        set_tf32(tf32)
        model.encoder.gradient_checkpointing = checkpointing
        results.append(
            _time_steps(model, batch, device, precision, compiled, size, tf32)
            | {"padding": padding, "checkpointing": checkpointing}
        )
    return {"tokens": list(batch["input_ids"].shape), "configs": results}


def _time_steps(model, batch, device, precision: str, compiled: bool, size: dict, tf32: bool):
    import torch
    from torch.nn import functional as F

    from pipeline.train.loop import build_optimizer

    cuda = device.type == "cuda"
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.01, decay_norms_and_biases=True)
    if compiled:
        torch._dynamo.reset()
    forward = (
        torch.compile(model, backend=size["compile_backend"], dynamic=False) if compiled else model
    )
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if precision == "bf16"
        else contextlib.nullcontext
    )
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(size["warmup"] + size["steps"]):
        _synchronize(device)
        start = time.perf_counter()
        with autocast():
            logits = forward(batch)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = times[size["warmup"] :]
    name = precision if precision == "bf16" or tf32 else "fp32 strict"
    return {
        "precision": f"{name}{' + compile' if compiled else ''}",
        "tf32": tf32 and cuda,
        "median_step_s": statistics.median(timed),
        "steps_s": [round(t, 4) for t in timed],
        "first_step_s": round(times[0], 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if cuda
        else None,
        "losses_finite": all(map(math.isfinite, losses)),
    }


def depth(smoke: bool) -> dict[str, Any]:
    """Images/s of the depth stage's inference (resize and normalize on the device included)."""
    import numpy as np
    import torch

    from pipeline.depth.model import infer_depth, place_depth_model, random_depth_model

    size = sizes(smoke)["depth"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch.device(device):  # built where it runs: no copy of the large model's weights
        model = random_depth_model("large" if size["large"] else "tiny")
    model = place_depth_model(model, device)
    generator = torch.Generator().manual_seed(0)
    height, width = size["image"]
    images = [
        torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        for _ in range(size["images"])
    ]
    dtypes = ("float16", "bfloat16") if device.type == "cuda" else ("float32",)
    runs = []
    for dtype in dtypes:
        for batch_size in size["batches"]:
            count = len(images) if batch_size > 1 else len(images) // 4
            infer_depth(model, images[:batch_size], batch_size, dtype)  # warm-up
            _synchronize(device)
            start = time.perf_counter()
            maps = infer_depth(model, images[:count], batch_size, dtype)
            seconds = time.perf_counter() - start
            runs.append(
                {
                    "dtype": dtype,
                    "batch_size": batch_size,
                    "images": count,
                    "images_per_s": count / seconds,
                    "map_shape": list(maps[0].shape),
                    "finite": all(bool(np.isfinite(m).all()) for m in maps),
                }
            )
    parameters = sum(p.numel() for p in model.parameters())
    return {"model_parameters": parameters, "device": str(device), "runs": runs}


def caption_setting(smoke: bool, device: str):
    """``(processor, model, image size)`` of the caption section: the tiny captioner, or for
    the GPU a Qwen2.5-VL-7B-shaped model with the real image processor's sizes (one token per
    28x28 pixels: a 448x336 image gives 192 image tokens, as a photo or an object crop does for
    the 7B model)."""
    from pipeline.caption.captioner import build_tiny_captioner

    processor, model = build_tiny_captioner()
    if not sizes(smoke)["caption"]["seven_b"]:
        return processor, model, (64, 48)
    from transformers import Qwen2VLImageProcessor

    # Qwen2.5-VL-7B-Instruct's preprocessor_config.json; a size of its own (transformers 5.17
    # edits the class's default size in place).
    processor.image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 12845056}
    )
    return processor, _qwen_7b_shaped(processor.tokenizer, device), (448, 336)


def caption(smoke: bool) -> dict[str, Any]:
    """Items/s and generated tokens/s of the caption stage's ``Captioner.describe``."""
    import torch
    from PIL import Image

    from pipeline.caption.captioner import Captioner

    size = sizes(smoke)["caption"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor, model, image_size = caption_setting(smoke, device)
    # Random weights stop at a random end token; every item generates the same count here.
    model.generation_config.min_new_tokens = size["new_tokens"]
    dtype = "bfloat16" if device == "cuda" else "float32"
    captioner = Captioner(
        processor, model, "captioner", dtype=dtype, max_new_tokens=size["new_tokens"], device=device
    )
    generator = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(
            torch.randint(0, 256, (image_size[1], image_size[0], 3), generator=generator)
            .to(torch.uint8)
            .numpy()
        )
        for _ in range(size["items"])
    ]
    prompts = [f"Describe the object {i} in this image in a few words." for i in range(len(images))]
    runs = []
    for batch_size in size["batches"]:
        count = len(images) if batch_size > 1 else len(images) // 4
        captioner.describe(prompts[:batch_size], images[:batch_size])  # warm-up
        _synchronize(torch.device(device))
        start = time.perf_counter()
        answers = []
        for i in range(0, count, batch_size):
            answers += captioner.describe(prompts[i : i + batch_size], images[i : i + batch_size])
        seconds = time.perf_counter() - start
        runs.append(
            {
                "dtype": dtype,
                "batch_size": batch_size,
                "items": count,
                "items_per_s": count / seconds,
                "new_tokens_per_s": count * size["new_tokens"] / seconds,
                # one per item (the 7B-shaped model's random token ids mostly lie outside the
                # tiny tokenizer's vocabulary and decode to nothing)
                "answers": len(answers),
            }
        )
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "model_parameters": parameters,
        "image_tokens_per_item": image_tokens(processor, images[0]),
        "dtype": dtype,
        "device": device,
        "runs": runs,
    }


def image_tokens(processor: Any, image: Any) -> int:
    """The image placeholder tokens the processor gives ``image`` in a prompt: the image's share
    of the model's prefill."""
    token = "<|image_pad|>"
    text = f"<|vision_start|>{token}<|vision_end|>Describe it."
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"]
    return int((ids == processor.tokenizer.convert_tokens_to_ids(token)).sum())


def _qwen_7b_shaped(tokenizer: Any, device: str):
    """Qwen2.5-VL-7B-Instruct's architecture, random weights, built on ``device`` in bf16; its
    special-token ids are the tiny tokenizer's (the real tokenizer needs the hub)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from pipeline.caption.captioner import qwen_special_ids

    ids = qwen_special_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 128000,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [16, 24, 24],
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def run_section(name: str, smoke: bool, limit: float) -> dict[str, Any]:
    if name == "environment":
        return environment(smoke)
    if name == "gpu_tests":
        return gpu_tests(smoke, limit)
    if name == "depth":
        return depth(smoke)
    if name == "caption":
        return caption(smoke)
    _, padding, mode = name.split(":")
    return train_step(smoke, padding, mode)


# ---------------------------------------------------------------------------------------------
# The report


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value (None where a section did not run) and whether it
    holds: True, False, or None (open) with a ``note`` saying why. A smoke run's figures say
    nothing about a GPU: its targets are all open."""
    sections = report["sections"]

    def config(section: str, precision: str, checkpointing: bool) -> dict | None:
        for c in sections.get(section, {}).get("result", {}).get("configs", []):
            if (c["precision"], c["checkpointing"]) == (precision, checkpointing):
                return c
        return None

    def rate(section: str, key: str, batch_size: int, dtype: str | None = None) -> float | None:
        for run in sections.get(section, {}).get("result", {}).get("runs", []):
            if run["batch_size"] == batch_size and dtype in (None, run.get("dtype")):
                return run[key]
        return None

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a / b

    fp32 = config("train_step:max_seq:eager", "fp32", False)
    fp32_ckpt = config("train_step:max_seq:eager", "fp32", True)
    fast = config("train_step:max_seq:compile", "bf16 + compile", False)
    batches = sizes(False)
    big_depth, big_caption = batches["depth"]["batches"][1], batches["caption"]["batches"][1]
    step, memory, depth, caption, seconds = TARGETS
    values = {
        step: ratio(fast and fast["median_step_s"], fp32 and fp32["median_step_s"]),
        memory: ratio(fp32_ckpt and fp32_ckpt["peak_memory_gib"], fp32 and fp32["peak_memory_gib"]),
        depth: ratio(
            rate("depth", "images_per_s", big_depth, "float16"),
            rate("depth", "images_per_s", 1, "float16"),
        ),
        caption: ratio(
            rate("caption", "items_per_s", big_caption), rate("caption", "items_per_s", 1)
        ),
        seconds: report.get("seconds"),
    }
    # A time is no speed when the run it times diverged.
    diverged = [c["precision"] for c in (fp32, fast) if c is not None and not c["losses_finite"]]
    unfinished = {n: s["status"] for n, s in sections.items() if s["status"] != "ok"}
    notes: dict[str, tuple[bool | None, str]] = {}
    if diverged:
        notes[step] = (False, f"losses not finite: {', '.join(diverged)}")
    cut = sorted(n for n, status in unfinished.items() if status.startswith(CUT_BY_TIME))
    missing = [n for n in SECTIONS if n not in sections]
    if cut:  # the check needed more time than it had
        notes[seconds] = (False, f"cut by the time budget: {', '.join(cut)}")
    elif unfinished or missing:
        left = sorted(unfinished) + missing
        notes[seconds] = (None, f"not every section ran to its end: {', '.join(left)}")
    out = []
    for name, (compare, limit) in TARGETS.items():
        value = values[name]
        target = {"target": name, "limit": f"{compare} {limit:g}", "value": value}
        if report["smoke"]:
            holds, note = None, "smoke run: tiny sizes on the CPU"
        elif name in notes:
            holds, note = notes[name]
        else:
            holds, note = None if value is None else _COMPARE[compare](value, limit), None
        out.append(target | {"holds": holds} | ({"note": note} if note else {}))
    return out


def table(report: dict[str, Any]) -> str:
    """The report as Markdown tables (what the README quotes)."""
    env = report["sections"].get("environment", {}).get("result", {})
    lines = [
        f"Device check on {env.get('gpu', 'CPU (smoke)')}"
        f"{', ' + str(env.get('gpu_memory_gib')) + ' GiB' if env.get('gpu') else ''}, "
        f"driver {env.get('driver')}, CUDA {env.get('cuda_runtime')}, torch {env.get('torch')}, "
        f"commit {str(env.get('commit'))[:10]}{' (dirty)' if env.get('dirty') else ''}; "
        f"{report.get('seconds', 0):.0f} s in all.",
        "",
        "| section | status | seconds |",
        "|---|---|---|",
    ]
    for name, section in report["sections"].items():
        status = section["status"]
        if name == "gpu_tests" and "result" in section:
            r = section["result"]
            status = f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"
            status += " (pytest stopped at its time limit)" if r.get("timed_out") else ""
        lines.append(f"| {name} | {status} | {section.get('seconds', 0):.0f} |")
    lines += [
        "",
        "| padding | precision | checkpointing | median step s | first step s | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, section in report["sections"].items():
        if name.startswith("train_step") and section["status"] == "ok":
            for c in section["result"]["configs"]:
                peak = "–" if c["peak_memory_gib"] is None else f"{c['peak_memory_gib']:.2f}"
                lines.append(
                    f"| {c['padding']} | {c['precision']} | {c['checkpointing']} | "
                    f"{c['median_step_s']:.3f} | {c['first_step_s']:.1f} | {peak} |"
                )
    for name, unit in (("depth", "images_per_s"), ("caption", "items_per_s")):
        section = report["sections"].get(name, {})
        if section.get("status") == "ok":
            label = unit.replace("_per_s", "/s")
            lines += ["", f"| {name}: dtype | batch | {label} |", "|---|---|---|"]
            for run in section["result"]["runs"]:
                lines.append(f"| {run.get('dtype', '')} | {run['batch_size']} | {run[unit]:.2f} |")
    if not report["smoke"]:
        lines += ["", "| target | limit | measured | holds |", "|---|---|---|---|"]
        for t in check_targets(report):
            value = "–" if t["value"] is None else f"{t['value']:.3g}"
            holds = f"{t['holds']} ({t['note']})" if "note" in t else str(t["holds"])
            lines.append(f"| {t['target']} | {t['limit']} | {value} | {holds} |")
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    from pipeline.io import write_json

    write_json(path, report)


# ---------------------------------------------------------------------------------------------
# The parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--out", type=Path, default=Path("device-report.json"))
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help="seconds for the whole check"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated, of: " + ", ".join(SECTIONS)
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    if args.child:
        from pipeline.device import keep_freed_memory

        keep_freed_memory()  # as the stages do
        result = run_section(args.child, args.smoke, args.limit or SECTIONS[args.child])
        write_report(args.out, result)
        return

    names = [n for n in args.sections.split(",") if n]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    report = run_all(names, args.smoke, args.budget, args.out, _print_progress)
    print(report["table"])
    failed = [n for n, s in report["sections"].items() if s["status"] != "ok"]
    if failed:
        print(f"\nnot ok: {', '.join(failed)} (details in {args.out})")
    sys.exit(1 if failed else 0)


def run_all(
    names: list[str],
    smoke: bool,
    budget: float,
    out: Path,
    progress: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """Run ``names`` in order, each in a child process limited to its share of ``budget``;
    rewrite ``out`` after each. A section gets its own limit or what is left, whichever is less,
    and is skipped when under a tenth of its limit is left."""
    start = time.perf_counter()
    report: dict[str, Any] = {"smoke": smoke, "budget_s": budget, "sections": {}}
    for name in names:
        left = budget - (time.perf_counter() - start) - RESERVE_S
        limit = min(SECTIONS[name], left)
        if limit < SECTIONS[name] / 10:
            section = {"status": "skipped: time budget spent", "seconds": 0.0}
        else:
            section = _run_child(name, smoke, limit)
        report["sections"][name] = section
        report["seconds"] = time.perf_counter() - start
        report["targets"] = check_targets(report)
        report["table"] = table(report)
        write_report(out, report)
        if progress is not None:
            progress(name, section)
    return report


def _run_child(name: str, smoke: bool, limit: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "bench.device", "--child", name, "--out", str(result_path)]
        command += ["--limit", str(limit), *(["--smoke"] if smoke else [])]
        begin = time.perf_counter()
        returncode, stderr = run_group(command, limit, cwd=ROOT, env=_child_env())
        if returncode is None:
            return {
                "status": f"timeout after {limit:.0f} s",
                "seconds": time.perf_counter() - begin,
                "log": stderr[-2000:],
            }
        seconds = time.perf_counter() - begin
        if returncode or not result_path.is_file():
            return {
                "status": f"failed (exit {returncode})",
                "seconds": seconds,
                "log": stderr[-4000:],
            }
        result = json.loads(result_path.read_text())
        return {"status": _status(name, result), "seconds": seconds, "result": result}


def _status(name: str, result: dict[str, Any]) -> str:
    """``ok`` for a section that ran to its end, unless it is the GPU tests and a test failed
    (a module that does not import counts as a failed test) or pytest did not finish."""
    if name != "gpu_tests":
        return "ok"
    if result["timed_out"]:
        return "pytest stopped at its time limit"
    if result["failed"]:
        return f"{result['failed']} failed"
    return "ok" if result["exit_code"] == 0 else f"pytest exit {result['exit_code']}"


def run_group(
    command: list[str], limit: float, merge_stdout: bool = False, **popen: Any
) -> tuple[int | None, str]:
    """Run ``command`` in a process session of its own: ``(exit code, stderr)`` (with stdout
    in it for ``merge_stdout``, else stdout is dropped). Past ``limit`` seconds the whole group
    is killed (the gpu_tests section's pytest and the stage commands it starts too, so nothing
    left over shares the GPU with the sections after it) and the exit code is None."""
    child = subprocess.Popen(
        command,
        stdout=subprocess.PIPE if merge_stdout else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if merge_stdout else subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )
    try:
        out, err = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        try:
            out, err = child.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a process outside the group holds the pipe
            out, err = "", ""
        return None, (out if merge_stdout else err) or ""
    return child.returncode, (out if merge_stdout else err) or ""


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the repository importable from the child (bench, pipeline) without an install
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # POT imports jax and cupy where they are installed and, given torch tensors, starts its jax
    # backend first, which takes most of the GPU's memory (images with jax: bench/device_wheels.sh)
    env.setdefault("POT_BACKEND_DISABLE_JAX", "1")
    env.setdefault("POT_BACKEND_DISABLE_CUPY", "1")
    return env


def _print_progress(name: str, section: dict) -> None:
    print(f"{name}: {section['status']} ({section.get('seconds', 0):.0f} s)", flush=True)
    if section["status"] != "ok" and section.get("log"):
        print(section["log"][-1500:], flush=True)


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _git(args: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def _nvidia_smi(field: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0:
            return out.stdout.strip().splitlines()[0]
    return None


if __name__ == "__main__":
    main()
