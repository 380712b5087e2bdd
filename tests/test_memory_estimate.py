"""``bench/memory.py``: the live-storage count against a hand count, and its fake-tensor
estimate of a training step against the same step on real tensors; ``bench/model.py``'s depth
embedding comparison."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.memory import LiveBytes, step_memory, to_fake
from bench.model import build_model_and_batch, embedding_ratios


def test_live_bytes_counts_each_storage_once_while_it_lives():
    tracker = LiveBytes()
    with tracker:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2  # 4,000 more
        view = b[:10]  # a view: no new storage
        assert (tracker.current, tracker.peak) == (8000, 8000)
        del a
        assert (tracker.current, tracker.peak) == (4000, 8000)
        c = torch.zeros(10, dtype=torch.float64)  # 80
        assert (tracker.current, tracker.peak) == (4080, 8000)
        del b
        assert tracker.current == 4080  # the view keeps b's storage
        del view, c
        assert tracker.current == 0
    outside = torch.ones(5)
    tracker.add(outside)
    tracker.add(outside[1:])
    assert tracker.current == 20


def tiny(solver: str):
    model, batch = build_model_and_batch(
        batch=3, hidden=32, layers=4, pad_to=128, solver=solver, iterations=3, objects=4
    )
    return model, batch


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("solver", ["sinkhorn", "log_sinkhorn"])
def test_the_fake_estimate_is_the_real_steps_count(solver, checkpointing):
    """Fake tensors count what the same two steps on real tensors count; the Sinkhorn operator
    (log_sinkhorn) is one opaque call on fake tensors, so the temporaries of its iterations are
    missing there: the estimate is short by at most a few of its [b, n, m] tensors."""
    torch.manual_seed(0)
    model, batch = tiny(solver)
    real = step_memory(model, batch, checkpointing=checkpointing, bf16=False)
    model, batch = tiny(solver)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = step_memory(
            model, to_fake(model, batch, mode), checkpointing=checkpointing, bf16=False
        )
    assert fake["weights"] == real["weights"] > 0
    # between steps AdamW adds two moments per parameter and a float32 step count per tensor
    # (and the fused kernel a few bytes of its own)
    parameters = [p for p in model.parameters() if p.requires_grad]
    adam = sum(2 * p.numel() * p.element_size() + 4 for p in parameters) / 2**30
    assert fake["between_steps"] == real["between_steps"]
    assert adam <= real["between_steps"] - real["weights"] <= adam + 1024 / 2**30
    if solver == "sinkhorn":  # no custom operator: the same operators run
        assert fake["peak"] == real["peak"]
    else:
        assert real["peak"] - 0.05 * (real["peak"] - real["between_steps"]) <= fake["peak"]
        assert fake["peak"] <= real["peak"]


def test_checkpointing_lowers_the_estimated_peak():
    memory = {}
    for checkpointing in (False, True):
        model, batch = tiny("log_sinkhorn")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = to_fake(model, batch, mode)
            memory[checkpointing] = step_memory(
                model, fake, checkpointing=checkpointing, bf16=False
            )
    above = {k: m["peak"] - m["between_steps"] for k, m in memory.items()}
    assert above[True] < 0.8 * above[False]


def test_the_command_prints_every_setting(capsys):
    from bench.memory import main

    main(["--batch", "2", "--hidden", "32", "--layers", "4", "--objects", "4"]
         + ["--iterations", "3", "--max-seq", "128", "--unit", "MiB"])  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("batch 2, tokens [2, 128], hidden 32, 4 layers, 4 objects")
    assert lines[0].endswith("MiB of tensor storage")
    rows = [line.split(" | ") for line in lines[3:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("| fp32", "False"), ("| fp32", "True"), ("| bf16", "False"), ("| bf16", "True")
    ]  # fmt: skip
    peaks = [float(r[4].rstrip(" |")) for r in rows]
    assert all(peak > float(r[3]) for peak, r in zip(peaks, rows, strict=True))


def test_a_depth_channel_halves_the_vision_tokens_and_lowers_the_estimated_peak():
    per_object, peaks = {}, {}
    for embedding in ("tokens", "channel"):
        model, batch = build_model_and_batch(
            batch=3, hidden=32, layers=4, pad_to=128, solver="log_sinkhorn", iterations=3,
            objects=4, depth_embedding=embedding,
        )  # fmt: skip
        per_object[embedding] = model.object_embeddings.tokens_per_object
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = to_fake(model, batch, mode)
            peaks[embedding] = step_memory(model, fake, checkpointing=False, bf16=False)["peak"]
    assert per_object == {"tokens": 8, "channel": 4}  # 64-px crops, 32-px patches
    assert peaks["channel"] < peaks["tokens"]


def test_embedding_ratios_pair_each_channel_run_with_its_tokens_run():
    def run(setting, mode, variant, embedding, seconds, gflop, rss):
        return {"setting": setting, "ot_mode": mode, "variant": variant,
                "depth_embedding": embedding, "median_s": seconds, "gflop": gflop,
                "peak_rss_gb": rss}  # fmt: skip

    results = [
        run("seq256", "transport", "eager", "tokens", 10.0, 2000.0, 8.0),
        run("seq256", "transport", "compile", "tokens", 8.0, 2000.0, 6.0),
        run("seq256", "transport", "eager", "channel", 9.0, 1500.0, 7.0),
        run("seq256", "uniform", "eager", "channel", 5.0, 1000.0, 4.0),  # no tokens run: left out
        run("realistic", "transport", "eager", "tokens", 4.0, 800.0, 3.0),
        run("realistic", "transport", "eager", "channel", 3.0, 600.0, 3.0),
    ]
    assert embedding_ratios(results) == [
        (("seq256", "transport", "eager"), {"median_s": 0.9, "gflop": 0.75, "peak_rss_gb": 0.875}),
        (
            ("realistic", "transport", "eager"),
            {"median_s": 0.75, "gflop": 0.75, "peak_rss_gb": 1.0},
        ),
    ]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--depth-embeddings", "tokens,rgbd", "expected some of tokens, channel"),
        ("--depth-embeddings", ",", "expected some of tokens, channel"),
        ("--ot-modes", "uniform,none", "expected some of transport, uniform"),
    ],
)
def test_the_model_bench_refuses_unknown_names_before_running(monkeypatch, capsys, flag, value,
                                                               message):  # fmt: skip
    from bench import model

    monkeypatch.setattr("sys.argv", ["bench/model.py", flag, value])
    with pytest.raises(SystemExit) as exit_info:
        model.main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
