"""Benchmark: seconds per REMOTE training step (forward, backward, AdamW) and peak memory, on CPU.

Base sizes with random weights (BERT-base ``BertConfig()`` + timm ``vit_base_patch32_clip_quickgelu_224``,
12 objects with depth, 28 labels, batch 8), each setting in a fresh subprocess so its peak RSS is its
own. Prints the median step time after a warm-up, the peak RSS, the ratio to the original code's
numbers measured on this kind of machine (2 threads), where the time goes, and the step's compute
floor: its FLOPs (torch's FlopCounterMode) over this machine's best matrix-product rate. The ``small`` setting
keeps 12 layers per tower at hidden 128 (2 heads, intermediate 512); the original's exact small
configuration is not recorded.

    .venv/bin/python bench/model.py            # all settings (slow: minutes per setting)
    .venv/bin/python bench/model.py --quick    # 1 warm-up + 2 steps per setting
    .venv/bin/python bench/model.py --settings realistic,seq128 --steps 5
    .venv/bin/python bench/model.py --settings realistic --ot-modes transport,uniform
    .venv/bin/python bench/model.py --settings seq256 --compile --bf16
    .venv/bin/python bench/model.py --settings seq256 --checkpointing
    .venv/bin/python bench/model.py --settings realistic --depth-embeddings tokens,channel

With several ``--ot-modes`` each setting runs once per mode (``model.ot.mode``), one after the
other in this run, and the uniform mode's step time is printed as a ratio of transport's (target
<= 0.6 at base size with per-batch padding). ``--compile`` adds a run under ``torch.compile``
(inductor, static shapes; its first step compiles and is not timed), ``--bf16`` one under bf16
autocast (fast on CPUs with AMX-BF16, see ``lscpu``), both flags a run with both;
``--checkpointing`` one with ``train.gradient_checkpointing`` (compare its peak RSS). With
``--depth-embeddings tokens,channel`` everything runs once per ``model.depth_embedding`` (8 or 4
vision tokens per object), and a last table gives ``channel`` over ``tokens``. Every run's
median step time is printed over the step's FLOP floor (its FLOPs at this machine's best float32
matrix-product rate), with a summary table at the end; target with ``--compile`` at seq 256:
<= 1.8x the floor.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from pipeline.config import DEPTH_EMBEDDINGS, OT_MODES, OT_SOLVERS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each setting: batch size, hidden size, text width (pad_to: every text padded to it, as with
# data.pad_to_max; None: padded per batch) and the original code's numbers it is compared with (fixed
# measurements on this kind of machine, 2 threads); per-batch padding is compared with the paper's
# seq-256 run. Targets: half the original's time at equal settings, a quarter with per-batch padding.
SETTINGS = {
    "seq256": dict(
        batch=8, hidden=768, pad_to=256, reference_s=24.9, reference_gb=14.1, target=0.5
    ),
    "seq128": dict(
        batch=8, hidden=768, pad_to=128, reference_s=13.5, reference_gb=None, target=0.5
    ),
    "realistic": dict(
        batch=8, hidden=768, pad_to=None, reference_s=24.9, reference_gb=14.1, target=0.25
    ),
    "small": dict(batch=32, hidden=128, pad_to=128, reference_s=6.7, reference_gb=None, target=0.5),
}
SENTENCE = 60  # word pieces per sentence (about), so texts are ~90 tokens with captions
CAPTION = 10  # word pieces per caption


def sentence_lengths(count: int, seed: int) -> list[int]:
    """``count`` sentence lengths in word pieces, uniform in ``SENTENCE -15 .. +15``."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return (SENTENCE - 15 + torch.randint(0, 31, (count,), generator=generator)).tolist()


UNIFORM_TARGET = 0.6  # uniform's step time over transport's (issue: base size, per-batch padding)


def build(setting: dict, solver: str, ot_mode: str = "transport", depth_embedding: str = "tokens"):
    """The model (random weights) and one batch for a setting."""
    return build_model_and_batch(
        batch=setting["batch"],
        hidden=setting["hidden"],
        pad_to=setting["pad_to"],
        solver=solver,
        ot_mode=ot_mode,
        depth_embedding=depth_embedding,
    )


def build_model_and_batch(
    *,
    batch: int,
    hidden: int,
    pad_to: int | None,
    solver: str,
    ot_mode: str = "transport",
    layers: int = 12,
    iterations: int = 50,
    objects: int = 12,
    depth_embedding: str = "tokens",
):
    """REMOTE with random weights, BERT-base and ViT-B/32 shapes at ``hidden`` 768 and 12 layers
    (28 labels, ``objects`` object slots with depth placed as ``model.depth_embedding`` says), and
    one batch of ``batch`` samples whose texts are padded to ``pad_to`` (None: to the longest,
    lengths as the realistic setting's)."""
    import torch
    from transformers import BertConfig

    from pipeline.config import default_params
    from pipeline.model.config import RemoteConfig
    from pipeline.model.example import random_batch
    from pipeline.model.remote import RemoteModel
    from pipeline.text import MARKERS, load_tokenizer

    heads = 12 if hidden == 768 else 2
    text = BertConfig(
        vocab_size=30522 + len(MARKERS),
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
    )
    vision_args = {} if (hidden, layers) == (768, 12) else {"embed_dim": hidden, "num_heads": heads}
    if layers != 12:
        vision_args["depth"] = layers
    params = default_params(
        {
            "data.pad_to_max": pad_to is not None,
            "data.max_seq": pad_to or 256,
            "data.max_objects": objects,
            # the paper's 7 and 8 of 12 layers; proportionally for fewer
            "model.pool_after_layer": layers * 7 // 12,
            "model.fusion_start_layer": layers * 8 // 12,
            "model.ot.solver": solver,
            "model.ot.mode": ot_mode,
            "model.ot.iterations": iterations,
            "model.depth_embedding": depth_embedding,
        },
    )
    config = RemoteConfig.from_params(
        params,
        28,
        {"bert_config": text.to_dict()},
        {"architecture": "vit_base_patch32_clip_quickgelu_224", "model_args": vision_args},
    )
    torch.manual_seed(0)
    model = RemoteModel(config)
    # Word-piece ids only need to be valid: the tiny tokenizer's ids are a subset of BERT-base's.
    tokenizer = load_tokenizer("tiny")
    lengths = sentence_lengths(batch, seed=1)
    example = random_batch(
        tokenizer, lengths, max_objects=objects, caption_length=CAPTION, pad_to=pad_to, seed=2
    )
    # As FeatureDataset says it: the model then reads nothing back from the device.
    example["text_padded"] = bool(example["attention_mask"].min() == 0)
    return model, example


class Timers:
    """Wall time per component: forward and backward hooks on the model's modules."""

    def __init__(self, model) -> None:
        self.total = defaultdict(float)
        self._start = {}
        groups = {
            "embeddings": [model.text_embeddings, model.object_embeddings],
            "text layers": list(model.encoder.text_layers),
            "vision layers": list(model.encoder.vision_layers),
            "OT": list(model.encoder.text_transport or [])
            + list(model.encoder.vision_transport or []),
            "MoE": [m for m in (model.text_moe, model.object_moe) if m is not None],
            "head": [model.head],
        }
        for name, modules in groups.items():
            for module in modules:
                module.register_forward_pre_hook(self._enter(name, "forward"))
                module.register_forward_hook(self._exit(name, "forward"))
                module.register_full_backward_pre_hook(self._enter(name, "backward"))
                module.register_full_backward_hook(self._exit(name, "backward"))

    def _enter(self, name, phase):
        def hook(*_):
            self._start[(name, phase)] = time.perf_counter()

        return hook

    def _exit(self, name, phase):
        def hook(*_):
            start = self._start.pop((name, phase), None)
            if start is not None:
                self.total[f"{name} ({phase})"] += time.perf_counter() - start

        return hook


VARIANTS = ("eager", "compile", "bf16", "bf16+compile", "checkpointing")


def run_child(
    name: str,
    solver: str,
    ot_mode: str,
    steps: int,
    warmup: int,
    threads: int,
    profile: bool,
    variant: str = "eager",
    depth_embedding: str = "tokens",
) -> dict:
    import contextlib

    import torch
    from torch.nn import functional as F

    from pipeline.device import keep_freed_memory
    from pipeline.train.loop import build_optimizer

    keep_freed_memory()  # as the stages do (python -m stages)
    torch.set_num_threads(threads)
    model, batch = build(SETTINGS[name], solver, ot_mode, depth_embedding)
    model.train()
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.01, decay_norms_and_biases=True)
    compiled = "compile" in variant
    # Module hooks would be traced into a compiled graph: time components in eager runs only.
    timers = Timers(model) if profile and not compiled else None
    model.encoder.gradient_checkpointing = variant == "checkpointing"
    forward = torch.compile(model, dynamic=False) if compiled else model
    precision = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if "bf16" in variant
        else contextlib.nullcontext
    )
    times, phases, first_step = [], defaultdict(float), None
    for step in range(warmup + steps):
        if timers is not None and step == warmup:
            timers.total.clear()
        start = time.perf_counter()
        with precision():
            loss = F.cross_entropy(forward(batch).float(), batch["labels"])
        forward_end = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        if step == 0:
            first_step = end - start  # with a compile, the compile's time
        if step >= warmup:
            times.append(end - start)
            phases["forward"] += forward_end - start
            phases["backward"] += backward - forward_end
            phases["optimizer"] += end - backward
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    breakdown = {k: v / steps for k, v in phases.items()}
    if timers is not None:
        breakdown.update({k: v / steps for k, v in timers.total.items()})
    # After the steps (it takes an unchecked step's memory), without checkpointing's
    # recomputation: every variant's floor is the same step's FLOPs.
    model.encoder.gradient_checkpointing = False
    flops = count_flops(model, batch)
    return {
        "setting": name,
        "variant": variant,
        "depth_embedding": depth_embedding,
        "tokens": list(batch["input_ids"].shape),
        "real_tokens": int(batch["attention_mask"].sum()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_s": times,
        "median_s": statistics.median(times),
        "first_step_s": first_step,
        "peak_rss_gb": rss_gb,
        "breakdown_s": breakdown,
        "gflop": flops / 1e9,
        "gemm_gflops": gemm_rate(),
    }


def count_flops(model, batch) -> float:
    """Floating-point operations of one forward + backward (matrix products and convolutions,
    as torch's FlopCounterMode counts them; the optimizer's few element-wise passes are left out)."""
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(batch), batch["labels"]).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def gemm_rate() -> float:
    """This machine's best float32 matrix-product rate (GFLOP/s) over a few step-sized shapes."""
    import torch

    best = 0.0
    for m, k, n in ((792, 768, 768), (6144, 768, 768), (4096, 768, 3072), (768, 6144, 768)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS)
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--ot-solver",
        default="fused",
        choices=OT_SOLVERS,
        help="model.ot.solver for every setting (default: fused)",
    )
    parser.add_argument(
        "--ot-modes",
        default="transport",
        help="comma-separated model.ot.mode values, each run per setting (default: transport)",
    )
    parser.add_argument("--ot-mode", default="transport", help=argparse.SUPPRESS)  # a child's
    parser.add_argument(
        "--depth-embeddings",
        default="tokens",
        help="comma-separated model.depth_embedding values, each run per setting (default: tokens)",
    )
    parser.add_argument("--depth-embedding", default="tokens", help=argparse.SUPPRESS)  # a child's
    parser.add_argument(
        "--compile", action="store_true", help="also run each setting under torch.compile"
    )
    parser.add_argument("--bf16", action="store_true", help="also run each under bf16 autocast")
    parser.add_argument(
        "--checkpointing",
        action="store_true",
        help="also run each with train.gradient_checkpointing (eager): its peak RSS against eager's",
    )
    parser.add_argument("--variant", default="eager", help=argparse.SUPPRESS)  # a child's
    parser.add_argument("--quick", action="store_true", help="1 warm-up step + 2 timed steps")
    parser.add_argument("--no-profile", action="store_true", help="skip the per-component timers")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 2, 1
    if args.child:
        result = run_child(
            args.child, args.ot_solver, args.ot_mode, args.steps, args.warmup, args.threads,
            not args.no_profile, args.variant, args.depth_embedding,
        )  # fmt: skip
        print(json.dumps(result))
        return

    names = [n for n in args.settings.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    modes = [m for m in args.ot_modes.split(",") if m]
    if not modes or set(modes) - set(OT_MODES):
        parser.error(f"--ot-modes {args.ot_modes!r}: expected some of {', '.join(OT_MODES)}")
    embeddings = [e for e in args.depth_embeddings.split(",") if e]
    if not embeddings or set(embeddings) - set(DEPTH_EMBEDDINGS):
        parser.error(
            f"--depth-embeddings {args.depth_embeddings!r}: "
            f"expected some of {', '.join(DEPTH_EMBEDDINGS)}"
        )
    variants = ["eager"]
    variants += ["compile"] if args.compile else []
    variants += ["bf16"] if args.bf16 else []
    variants += ["bf16+compile"] if args.compile and args.bf16 else []
    variants += ["checkpointing"] if args.checkpointing else []
    print(
        f"threads={args.threads} steps={args.steps} warmup={args.warmup} "
        f"model.ot.solver={args.ot_solver} model.ot.mode={','.join(modes)} "
        f"model.depth_embedding={','.join(embeddings)} variants={','.join(variants)}"
    )
    summary = []
    for name in names:
        for embedding in embeddings:
            medians = {}
            for mode in modes:
                for variant in variants:
                    result = run_setting(name, mode, args, variant, embedding)
                    if result is not None:
                        summary.append(result | {"ot_mode": mode})
                        if variant == "eager":
                            medians[mode] = result["median_s"]
            if len(medians) == 2:
                ratio = medians["uniform"] / medians["transport"]
                print(
                    f"\n{name} ({embedding}): model.ot.mode uniform / transport step time = "
                    f"{medians['uniform']:.2f} / {medians['transport']:.2f} s = {ratio:.2f} "
                    f"(target <= {UNIFORM_TARGET})"
                )
    print_summary(summary)
    print_embedding_ratios(summary)


def print_summary(results: list[dict]) -> None:
    """Every run's median step time against one FLOP floor per run of this command: at the best
    float32 matrix-product rate any of its runs measured (each measures its own, and on a shared
    machine they differ by up to a quarter; the best is the machine's)."""
    if not results:
        return
    best = max(r["gemm_gflops"] for r in results)
    print(f"\nFLOP floors at {best:.0f} GFLOP/s, the best matrix-product rate of these runs")
    print(
        "| setting | model.depth_embedding | model.ot.mode | variant | median s/step | "
        "first step s | floor s | ratio | peak RSS GB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        floor = r["gflop"] / best
        print(
            f"| {r['setting']} | {r['depth_embedding']} | {r['ot_mode']} | {r['variant']} | "
            f"{r['median_s']:.2f} | {r['first_step_s']:.1f} | {floor:.2f} | "
            f"{r['median_s'] / floor:.2f} | {r['peak_rss_gb']:.2f} |"
        )


def embedding_ratios(results: list[dict]) -> list[tuple[tuple[str, str, str], dict[str, float]]]:
    """For each setting, OT mode and variant run with both depth embeddings: ``channel`` over
    ``tokens`` in step time, FLOPs and peak RSS."""
    runs = {(r["setting"], r["ot_mode"], r["variant"], r["depth_embedding"]): r for r in results}
    out = []
    for (setting, mode, variant, embedding), channel in runs.items():
        tokens = runs.get((setting, mode, variant, "tokens"))
        if embedding != "channel" or tokens is None:
            continue
        ratios = {key: channel[key] / tokens[key] for key in ("median_s", "gflop", "peak_rss_gb")}
        out.append(((setting, mode, variant), ratios))
    return out


def print_embedding_ratios(results: list[dict]) -> None:
    rows = embedding_ratios(results)
    if not rows:
        return
    print("\nmodel.depth_embedding channel / tokens, same setting, OT mode and variant")
    print("| setting | model.ot.mode | variant | step time | GFLOP | peak RSS |")
    print("|---|---|---|---|---|---|")
    for (setting, mode, variant), r in rows:
        print(
            f"| {setting} | {mode} | {variant} | {r['median_s']:.2f} | {r['gflop']:.2f} | "
            f"{r['peak_rss_gb']:.2f} |"
        )


def run_setting(
    name: str,
    mode: str,
    args: argparse.Namespace,
    variant: str = "eager",
    depth_embedding: str = "tokens",
) -> dict | None:
    """One setting in a fresh subprocess; prints its report and returns its result."""
    command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--threads", str(args.threads)]
    command += ["--ot-solver", args.ot_solver, "--ot-mode", mode, "--variant", variant]
    command += ["--depth-embedding", depth_embedding]
    if args.no_profile:
        command.append("--no-profile")
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        print(f"{name} ({depth_embedding}, {mode}, {variant}): failed\n{out.stderr[-3000:]}")
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    report(name, mode, result)
    return result


def report(name: str, mode: str, result: dict) -> None:
    setting = SETTINGS[name]
    width = f"padded to {setting['pad_to']}" if setting["pad_to"] else "padded per batch"
    print(
        f"\n{name} (model.depth_embedding {result['depth_embedding']}, model.ot.mode {mode}, "
        f"{result['variant']}): hidden {setting['hidden']}, batch x tokens "
        f"{result['tokens']} ({width}, {result['real_tokens']} real tokens), "
        f"{result['parameters'] / 1e6:.0f}M parameters"
    )
    steps = ", ".join(f"{t:.2f}" for t in result["step_s"])
    ratio = result["median_s"] / setting["reference_s"]
    print(
        f"  median {result['median_s']:.2f} s/step ({steps}); original {setting['reference_s']} s"
        f" -> ratio {ratio:.2f} (target <= {setting['target']})"
    )
    floor = result["gflop"] / result["gemm_gflops"]
    print(
        f"  compute: {result['gflop']:.0f} GFLOP per step (forward + backward); at this "
        f"machine's best float32 matrix-product rate ({result['gemm_gflops']:.0f} GFLOP/s) that "
        f"is at least {floor:.1f} s: step / floor = {result['median_s'] / floor:.2f}; first step "
        f"{result['first_step_s']:.1f} s"
    )
    memory = f"  peak RSS {result['peak_rss_gb']:.2f} GB"
    if setting["reference_gb"]:
        memory += f" (original at seq 256: {setting['reference_gb']} GB)"
    print(memory)
    parts = result["breakdown_s"]
    for phase in ("forward", "backward", "optimizer"):
        share = 100 * parts[phase] / result["median_s"]
        inside = sorted(
            ((k.split(" (")[0], v) for k, v in parts.items() if k.endswith(f"({phase})")),
            key=lambda kv: -kv[1],
        )
        detail = ", ".join(f"{k} {v:.2f}" for k, v in inside if v >= 0.005)
        print(
            f"  {phase:<9} {parts[phase]:6.2f} s {share:5.1f}%"
            + (f"  [{detail}]" if detail else "")
        )


if __name__ == "__main__":
    main()
