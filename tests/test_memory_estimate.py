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


class _Encoder:
    gradient_checkpointing = None


class _Linear(torch.nn.Module):
    """A 4 -> 3 linear layer (60 bytes of weights) that records, for each forward, the autocast
    dtype (False when off), its training mode and its encoder's checkpointing flag."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.encoder = _Encoder()
        self.seen = []

    def forward(self, batch):
        autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
        self.seen.append((autocast, self.training, self.encoder.gradient_checkpointing))
        return self.linear(batch["x"])


def _linear_batch() -> dict:
    # 32 + 16 bytes
    return {"x": torch.ones(2, 4), "labels": torch.tensor([0, 2]), "name": "not a tensor"}


@pytest.mark.parametrize(("checkpointing", "bf16"), [(False, False), (True, True)])
def test_step_memory_counts_the_batch_and_trains_as_told(checkpointing, bf16):
    model = _Linear().eval()
    memory = step_memory(model, _linear_batch(), checkpointing=checkpointing, bf16=bf16)
    assert memory["weights"] * 2**30 == 60 + 48  # the weights and the batch's tensors
    autocast = torch.bfloat16 if bf16 else False
    assert model.seen == [(autocast, True, checkpointing)] * 2


def test_to_fake_replaces_every_parameter_and_buffer_and_keeps_what_trains():
    from torch._subclasses.fake_tensor import FakeTensor

    model = _Linear()
    model.linear.bias.requires_grad_(False)
    model.register_buffer("counts", torch.arange(3))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        batch = to_fake(model, _linear_batch(), mode)
    tensors = [*model.parameters(), *model.buffers(), batch["x"], batch["labels"]]
    assert all(isinstance(t, FakeTensor) for t in tensors)
    assert [p.requires_grad for p in model.parameters()] == [True, False]
    assert batch["name"] == "not a tensor"
    assert [tuple(t.shape) for t in tensors] == [(3, 4), (3,), (3,), (2, 4), (2,)]


def test_the_command_passes_its_sizes_and_prints_in_the_unit_asked(monkeypatch, capsys):
    import bench.memory
    import bench.model

    built, settings = [], []

    def build(**kwargs):
        built.append(kwargs)
        return _Linear(), {"input_ids": torch.zeros(2, 9, dtype=torch.long)} | _linear_batch()

    def memory(model, batch, *, checkpointing, bf16):
        settings.append((checkpointing, bf16))
        return {"weights": 0.5, "between_steps": 1.25, "peak": 2.0 + checkpointing + 4 * bf16}

    monkeypatch.setattr(bench.model, "build_model_and_batch", build)
    monkeypatch.setattr(bench.memory, "step_memory", memory)
    bench.memory.main([])
    bench.memory.main(["--batch", "8", "--per-batch", "--unit", "MiB", "--solver", "fused"])
    assert built == [
        {"batch": 32, "hidden": 768, "layers": 12, "objects": 12, "pad_to": 256,
         "solver": "log_sinkhorn", "iterations": 50, "depth_embedding": "tokens"},
        {"batch": 8, "hidden": 768, "layers": 12, "objects": 12, "pad_to": None,
         "solver": "fused", "iterations": 50, "depth_embedding": "tokens"},
    ]  # fmt: skip
    assert settings == [(False, False), (True, False), (False, True), (True, True)] * 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[3:7] == [
        "| fp32 | False | 0.50 | 1.25 | 2.00 |",
        "| fp32 | True | 0.50 | 1.25 | 3.00 |",
        "| bf16 | False | 0.50 | 1.25 | 6.00 |",
        "| bf16 | True | 0.50 | 1.25 | 7.00 |",
    ]
    assert lines[7].endswith("MiB of tensor storage")
    assert lines[10:] == [
        "| fp32 | False | 512.00 | 1280.00 | 2048.00 |",
        "| fp32 | True | 512.00 | 1280.00 | 3072.00 |",
        "| bf16 | False | 512.00 | 1280.00 | 6144.00 |",
        "| bf16 | True | 512.00 | 1280.00 | 7168.00 |",
    ]
