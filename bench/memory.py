"""Peak tensor memory of a REMOTE training step at any size, in about a minute on a CPU, without the memory or a GPU.

    python -m bench.memory                              # the paper setup: batch 32, texts padded to 256
    python -m bench.memory --batch 16 --per-batch       # other sizes; --help for all

The model's weights and the batch become fake tensors (``FakeTensorMode``: shapes, dtypes and
storages, no data, no arithmetic) and two AdamW training steps run on them, forward, backward and
optimizer step, while a dispatch mode counts the bytes of every tensor storage alive. It prints,
for fp32 and bf16 autocast, each without and with ``train.gradient_checkpointing``: the weights
(and batch), the weights with AdamW's state between steps, and the peak inside the second step.

The count is what ``torch.cuda.max_memory_allocated`` counts, without the caching allocator's
rounding, cuBLAS/cuDNN workspaces and the CUDA context. Operators run as on the CPU (the fake
tensors live there: autograd cannot run on fake CUDA tensors without a GPU), so attention keeps
what the CPU's kernels keep: with dropout on, the math path's probabilities, ``[B, heads, T, T]``
per layer, which a GPU's fused attention does not store. A Sinkhorn operator (``fused``,
``log_sinkhorn``) is one call on fake tensors: its outputs count, the temporaries inside its
iterations (a few ``[b, n, m]`` tensors at a time) do not.
"""

from __future__ import annotations

import argparse
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.config import DEPTH_EMBEDDINGS

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive: those operators create inside the mode and those
    :meth:`add` registers, each counted once; ``current`` and its ``peak``."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the storage's identity (views share it)
        if key in self._alive:
            return
        size = storage.nbytes()
        self._alive[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self._alive.pop(key, None)
        if size is not None:
            self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.add(value)
        return out


def to_fake(
    model: torch.nn.Module,
    batch: dict[str, Any],
    mode,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Replace ``model``'s parameters and buffers by fake tensors (in place; on ``device`` if
    given, what ``model.to(device)`` would move, strides kept) and return the batch with fake
    tensors (on ``device`` too)."""

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        tensor = mode.from_tensor(tensor.detach())
        return tensor if device is None else tensor.to(device, non_blocking=True)

    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                module._parameters[name] = torch.nn.Parameter(
                    fake(parameter), parameter.requires_grad
                )
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = fake(buffer)
    return {k: fake(v) if torch.is_tensor(v) else v for k, v in batch.items()}


def step_memory(
    model: torch.nn.Module, batch: dict[str, Any], *, checkpointing: bool, bf16: bool
) -> dict[str, float]:
    """Bytes (GiB) of two AdamW training steps of ``model`` on ``batch`` (fake or real tensors):
    ``weights`` (with the batch), ``between_steps`` (weights and optimizer state) and ``peak``
    (inside the second step)."""
    from torch.nn import functional as F

    from pipeline.train.loop import build_optimizer

    model.train()
    model.encoder.gradient_checkpointing = checkpointing
    tracker = LiveBytes()
    for tensor in [*model.parameters(), *model.buffers(), *batch.values()]:
        if torch.is_tensor(tensor):
            tracker.add(tensor)
    weights = tracker.current
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.01, decay_norms_and_biases=True)
    with tracker:
        for step in range(2):
            if step == 1:
                between, tracker.peak = tracker.current, tracker.current
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(batch)
            F.cross_entropy(logits.float(), batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"weights": weights / GIB, "between_steps": between / GIB, "peak": tracker.peak / GIB}


def main(argv: list[str] | None = None) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bench.model import build_model_and_batch

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] + " The defaults are the paper setup.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=32, help="samples per step")
    parser.add_argument("--max-seq", type=int, default=256, help="pad texts to this length")
    parser.add_argument("--per-batch", action="store_true", help="pad per batch, not to --max-seq")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size of both towers")
    parser.add_argument("--layers", type=int, default=12, help="layers of both towers")
    parser.add_argument("--objects", type=int, default=12, help="object slots (data.max_objects)")
    parser.add_argument("--solver", default="log_sinkhorn", help="model.ot.solver")
    parser.add_argument("--iterations", type=int, default=50, help="model.ot.iterations")
    parser.add_argument(
        "--depth-embedding", choices=DEPTH_EMBEDDINGS, default="tokens",
        help="model.depth_embedding (channel: 4 vision tokens per object, not 8)",
    )  # fmt: skip
    parser.add_argument("--unit", choices=["GiB", "MiB"], default="GiB")
    args = parser.parse_args(argv)
    scale = {"GiB": 1, "MiB": 1024}[args.unit]
    model, batch = build_model_and_batch(
        batch=args.batch,
        hidden=args.hidden,
        layers=args.layers,
        objects=args.objects,
        pad_to=None if args.per_batch else args.max_seq,
        solver=args.solver,
        iterations=args.iterations,
        depth_embedding=args.depth_embedding,
    )
    tokens = list(batch["input_ids"].shape)
    rows = []
    # One fake model for every setting: a run leaves no gradients (set to None) and no
    # optimizer state (a new optimizer each) behind.
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = to_fake(model, batch, mode)
        for bf16 in (False, True):
            for checkpointing in (False, True):
                memory = step_memory(model, fake, checkpointing=checkpointing, bf16=bf16)
                rows.append(("bf16" if bf16 else "fp32", checkpointing, memory))
    print(
        f"batch {args.batch}, tokens {tokens}, hidden {args.hidden}, {args.layers} layers, "
        f"{args.objects} objects, model.ot.solver {args.solver}, model.depth_embedding "
        f"{args.depth_embedding}; {args.unit} of tensor storage"
    )
    print("| precision | checkpointing | weights + batch | + AdamW state | peak in a step |")
    print("|---|---|---|---|---|")
    for precision, checkpointing, m in rows:
        cells = [f"{m[k] * scale:.2f}" for k in ("weights", "between_steps", "peak")]
        print(f"| {precision} | {checkpointing} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
