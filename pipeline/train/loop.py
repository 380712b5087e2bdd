"""Training loop for REMOTE: dev-selected checkpoints, resumable runs, 1..N processes.

The loop reads top to bottom: seed -> data -> model -> AdamW + linear warm-up -> epochs of
(train, dev score, keep the best, checkpoint). Devices, several processes, mixed precision,
seeding, the training state and the trackers (dvclive, and TensorBoard or W&B on request) come
from :mod:`accelerate`; only the main process writes files and logs.

Layout written under ``out_dir`` (``models/``)::

    checkpoint/    the resumable state after the last finished epoch, with ``best/``, the
                   dev-selected model (:mod:`.checkpoint`)
    selected/      a copy of ``checkpoint/best`` made when training ends: the stage's DVC
                   output, which ``evaluate`` scores and publishes

Results depend on the number of processes: each process draws ``batch_size`` samples per micro-step,
so the effective batch is ``batch_size * processes * grad_accum`` and the number of optimizer steps
(hence the schedule) shrinks accordingly. The same seed and the same number of processes give the
same weights on the same CPU kind with the same ``train.threads`` and library versions (see
:func:`pipeline.device.set_determinism`); a run killed and re-run continues from its last epoch to
the same final weights.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from pipeline.config import Params, flatten, params_to_dict
from pipeline.data.records import Dataset, label_list
from pipeline.device import is_distributed_launch, set_determinism, set_tf32
from pipeline.features.dataset import FeatureDataset, make_loader
from pipeline.inference import predict_dataset, to_device
from pipeline.io import DataError
from pipeline.metrics import score
from pipeline.model.card import model_card
from pipeline.model.regime import RegimeStats, flat_regime, record_regime
from pipeline.model.remote import build_model
from pipeline.model.saved import write_trained
from pipeline.text import load_tokenizer
from pipeline.train.checkpoint import (
    SELECTED_DIR,
    Progress,
    load_checkpoint,
    publish_selected,
    read_checkpoint,
    recover_outputs,
    restore_logs,
    run_fingerprint,
    save_checkpoint,
)

__all__ = [
    "TrainingDiverged",
    "TrainingInterrupted",
    "TrainResult",
    "build_optimizer",
    "train",
]

log = logging.getLogger(__name__)


class TrainingDiverged(ValueError):
    """A non-finite loss or gradient norm: the run stops before the update (a user error: the
    params, usually the learning rate or the OT temperature, do not train)."""


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after_step`` test hook, as if the process had been killed there."""


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, decay_norms_and_biases: bool
) -> torch.optim.AdamW:
    """AdamW over every trainable parameter. ``decay_norms_and_biases`` (the original) decays all
    of them; false exempts biases and norm gains (1-d tensors).

    The fused kernel (CPU and CUDA) does the same update in one pass over each tensor: 0.23 s
    against 1.04 s per step for 342M parameters on 2 CPU threads."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            exempt = param.ndim <= 1 and not decay_norms_and_biases
            (no_decay if exempt else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclass
class TrainResult:
    best_epoch: int
    best_score: float
    epochs_run: int
    resumed_from_epoch: int
    stopped_early: bool
    history: list[dict[str, float]]
    model: nn.Module
    best_dir: Path


# The extra that installs each optional tracker's package (pyproject.toml).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _flat_config(tree: dict[str, Any]) -> dict[str, Any]:
    """Params as ``dotted.key -> scalar`` (TensorBoard's hparams take no nesting and no lists)."""
    flat = flatten(tree)
    return {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in flat.items()}


def _start_trackers(
    accelerator: Accelerator, log_with: list[str], live_dir: Path, resumed: bool, config: dict
) -> None:
    """Start ``train.log_with``'s trackers through accelerate (they write on the main process
    only): dvclive, the one DVC reads, into ``live_dir``; TensorBoard into
    ``<live_dir>/tensorboard/remote``; W&B into ``<live_dir>/wandb``."""
    import importlib.util

    if "dvclive" not in log_with:
        raise ValueError("train.log_with must include dvclive: DVC reads its metrics and plots")
    for name, package in TRACKER_PACKAGES.items():
        if name in log_with and importlib.util.find_spec(package) is None:
            raise ModuleNotFoundError(
                f"train.log_with has {name}, which is not installed: pip install -e '.[{name}]'"
            )
    init_kwargs = {
        "dvclive": {"dir": str(live_dir), "dvcyaml": False, "save_dvc_exp": False},
        "wandb": {"dir": str(live_dir)},
    }
    init_kwargs["dvclive"]["resume"] = resumed
    accelerator.init_trackers("remote", config=_flat_config(config), init_kwargs=init_kwargs)


def _flush_trackers(accelerator: Accelerator) -> None:
    """Write buffered TensorBoard events, so the checkpoint's copy of the logs is complete."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.flush()


def train(
    params: Params,
    features_dir: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    live_dir: str | Path,
    *,
    stop_after_step: int | None = None,
) -> TrainResult:
    """Train REMOTE on the train split, select on dev micro-F1, keep ``checkpoint/`` with the
    dev-selected model in ``checkpoint/best``, and copy that model to ``selected/`` at the end.

    Re-running with the same params, labels and features continues from ``checkpoint/``.
    ``stop_after_step`` (tests) raises :class:`TrainingInterrupted` after that optimizer step.
    """
    tp = params.train
    features_dir, out_dir, live_dir = Path(features_dir), Path(out_dir), Path(live_dir)
    ckpt_dir = out_dir / "checkpoint"

    set_determinism(tp.threads, tp.deterministic)
    accelerator = Accelerator(
        mixed_precision=tp.mixed_precision,
        cpu=is_distributed_launch() and not torch.cuda.is_available(),
        log_with=list(dict.fromkeys(tp.log_with)),
        project_config=ProjectConfiguration(
            project_dir=str(live_dir), logging_dir=str(live_dir / "tensorboard")
        ),
    )
    set_tf32(tp.tf32)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes

    labels = label_list(Dataset(dataset_dir).relations)
    tokenizer = load_tokenizer(params.model.text_model)
    fingerprint = run_fingerprint(params, features_dir, labels)
    if main:
        recover_outputs(ckpt_dir)
    accelerator.wait_for_everyone()
    progress = read_checkpoint(ckpt_dir, fingerprint)
    resumed_from = progress.epoch if progress else 0
    progress = progress or Progress()

    # Each process gets its own dropout stream; the data order is shared (one permutation per
    # epoch, a function of the seed and the epoch, split into disjoint slices).
    set_seed(tp.seed + rank)
    train_set = FeatureDataset.load(features_dir, "train", params, labels)
    dev_set = FeatureDataset.load(features_dir, "valid", params, labels)
    for split in (train_set, dev_set):
        if len(split) == 0:
            raise DataError(f"{split.split}: no samples (training needs train and dev samples)")
    # The original's protocol, opt-in: test is scored every epoch (never used for selection here).
    test_set = (
        FeatureDataset.load(features_dir, "test", params, labels)
        if tp.report_test_each_epoch
        else None
    )
    sampler = DistributedSampler(
        train_set, num_replicas=world, rank=rank, shuffle=True, seed=tp.seed
    )
    train_loader = make_loader(
        train_set,
        tp.batch_size,
        sampler=sampler,
        num_workers=tp.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )

    model = build_model(params, len(labels), tokenizer)
    model.encoder.gradient_checkpointing = tp.gradient_checkpointing
    if tp.optimize == "original":
        # The original optimized only parameters named ``model.*``: the entity projection M and
        # the classifier keep their random init.
        model.head.requires_grad_(False)
    optimizer = build_optimizer(model, tp.lr, tp.weight_decay, tp.decay_norms_and_biases)
    steps_per_epoch = math.ceil(len(train_loader) / tp.grad_accum)
    total_steps = steps_per_epoch * tp.epochs
    # The warm-up length is not rounded: the original passed warmup_ratio * steps, a float, and
    # transformers' schedule is step / warm-up below it, then linear to 0 at the last step.
    scheduler = get_linear_schedule_with_warmup(
        optimizer, tp.warmup_ratio * total_steps, total_steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if tp.compile:
        model = _compile(model, static_shapes=params.data.pad_to_max)
    # Not prepared: accelerate would step it once per process, and its length already counts them.
    accelerator.register_for_checkpointing(scheduler)
    if resumed_from:
        load_checkpoint(accelerator, ckpt_dir)
        if main:
            log.info("resuming after epoch %d (step %d)", progress.epoch, progress.global_step)
            restore_logs(ckpt_dir, [live_dir])
    run_info = {
        "num_processes": world,
        "effective_batch_size": tp.batch_size * world * tp.grad_accum,
        "steps_per_epoch": steps_per_epoch,
        "num_labels": len(labels),
    }
    config = {**params_to_dict(params), "run": run_info}
    _start_trackers(accelerator, tp.log_with, live_dir, bool(resumed_from), config)

    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    dev_shard = list(range(rank, len(dev_set), world))
    test_shard = list(range(rank, len(test_set), world)) if test_set is not None else []
    while not progress.finished:
        epoch = progress.epoch + 1
        sampler.set_epoch(epoch - 1)
        model.train()
        bar = tqdm(
            total=len(train_loader),
            desc=f"epoch {epoch}/{tp.epochs}",
            disable=not main,
            unit="batch",
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,  # a log file gets few lines
        )
        step_losses: list[float] = []
        # The OT regime is read on the main process, from the first micro-batch of every
        # log_every-th step (record_regime: statistics of what the forward computes anyway).
        monitor = unwrapped if main and tp.log_every > 0 else None
        steps = _optimizer_steps(
            accelerator, model, optimizer, train_loader, tp, bar, progress.global_step, monitor
        )
        # What the steps computed stays on the device until a log interval (or the epoch's end)
        # reads it in one transfer: the host never waits for the device inside a step.
        unread: list[StepRecord] = []
        for record in steps:
            # the rate this step's update ran at (warm-up's first update: 0), read before the
            # schedule moves on to the next step's
            record.lr = scheduler.get_last_lr()[0]
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule
                scheduler.step()
            progress.global_step += 1
            record.step = progress.global_step
            unread.append(record)
            if tp.log_every > 0 and progress.global_step % tp.log_every == 0:
                step_losses += _read_steps(accelerator, unread, bar)
            if stop_after_step is not None and progress.global_step >= stop_after_step:
                bar.close()
                raise TrainingInterrupted(f"stopped after step {progress.global_step}")
        step_losses += _read_steps(accelerator, unread, bar)
        bar.close()

        dev_scores = _split_scores(accelerator, unwrapped, dev_set, dev_shard, params, labels)
        score = dev_scores["micro_f1"]
        # The original kept the later epoch on a tie (its `>=`): so does the selection. Patience
        # waits for a strict gain.
        selected = score >= progress.best_score
        gained = score > progress.best_score
        progress.epochs_since_best = 0 if gained else progress.epochs_since_best + 1
        if selected:
            progress.best_score, progress.best_epoch = score, epoch
        progress.epoch = epoch
        epoch_loss = float(np.mean(step_losses))
        entry = {"epoch": epoch, "loss": epoch_loss, "dev_micro_f1": score}
        if test_set is not None:
            # Scoring draws from the RNG (each DataLoader iterator takes a seed): keep it out of
            # the training streams, so the dev-selected run is the one without the switch.
            cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                test_scores = _split_scores(
                    accelerator, unwrapped, test_set, test_shard, params, labels
                )
            entry["test_micro_f1"] = test_scores["micro_f1"]
        progress.history.append(entry)
        progress.stopped_early = 0 < tp.patience <= progress.epochs_since_best
        progress.finished = progress.stopped_early or epoch >= tp.epochs

        if main:
            log.info(
                "epoch %d: loss %.4f, dev micro-F1 %.4f%s",
                epoch, epoch_loss, score, " (best)" if selected else "",
            )  # fmt: skip
            if progress.stopped_early:
                log.info("early stop: no dev improvement for %d epochs", tp.patience)
        values = {"epoch": epoch, "train/epoch_loss": epoch_loss}
        values.update({f"dev/{key}": dev_scores[key] for key in _DEV_METRICS})
        if test_set is not None:
            values["test/micro_f1"] = entry["test_micro_f1"]
        accelerator.log(values, step=progress.global_step)
        summary = {"best/dev_micro_f1": progress.best_score, "best/epoch": progress.best_epoch}
        accelerator.log(summary, step=progress.global_step, log_kwargs={"dvclive": {"plot": False}})

        def write_best(folder: Path, epoch: int = epoch, dev: dict = dev_scores) -> None:
            info = {"epoch": epoch, "dev": dev, "num_processes": world}
            card = model_card(params, labels, info)
            write_trained(folder, unwrapped, params, labels, tokenizer, info, card)

        _flush_trackers(accelerator)
        save_checkpoint(
            accelerator,
            ckpt_dir,
            fingerprint=fingerprint,
            progress=progress,
            write_best=write_best if selected else None,
            logs=[live_dir],
        )

    if main:
        publish_selected(ckpt_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: after the last barrier
    return TrainResult(
        best_epoch=progress.best_epoch,
        best_score=progress.best_score,
        epochs_run=progress.epoch - resumed_from,
        resumed_from_epoch=resumed_from,
        stopped_early=progress.stopped_early,
        history=progress.history,
        model=unwrapped,
        best_dir=out_dir / SELECTED_DIR,
    )


# The name of the profiler range around each step's device work (forward, backward, update).
STEP_RANGE = "train_step"

_DEV_METRICS = ("micro_f1", "micro_precision", "micro_recall", "accuracy", "macro_f1")


@dataclass
class StepRecord:
    """One optimizer step as the device left it: its loss (averaged over micro-batches and
    processes) and gradient norm (None under fp16, whose scaler checks it) as 0-d device tensors,
    and the OT regime's statistics when it was recorded; the loop adds the step number and
    learning rate."""

    loss: torch.Tensor
    grad_norm: torch.Tensor | None
    regime: dict[str, list[RegimeStats]] | None
    step: int = 0
    lr: float = 0.0


# torch.compile's backend for train.compile (tests swap in "aot_eager", which compiles in seconds)
COMPILE_BACKEND = "inductor"


def _compile(model: nn.Module, static_shapes: bool) -> nn.Module:
    """``train.compile``: the prepared model (wrapped for several processes first, the order
    accelerate uses) compiled, with static shapes when every text is padded to ``data.max_seq``;
    otherwise torch marks the text length dynamic after its first change. Not through
    accelerate's dynamo plugin: its process-wide state keeps the first setting a process saw."""
    return torch.compile(model, backend=COMPILE_BACKEND, dynamic=False if static_shapes else None)


def _optimizer_steps(
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    loader: DataLoader,
    tp: Any,
    bar: Any,
    steps_before: int,
    monitor: nn.Module | None,
) -> Iterator[StepRecord]:
    """One epoch: forward/backward every micro-batch, an optimizer step every ``grad_accum``
    of them; yields a :class:`StepRecord` per step, with the OT regime of ``monitor`` on the first
    micro-batch of every ``log_every``-th step of the run (``steps_before`` done before this
    epoch). Nothing here waits for the device.

    A non-finite loss or gradient norm is caught on the device: from that step on, every update is
    skipped (the fused AdamW's ``found_inf``), so the weights stay those before it, until
    :func:`_read_steps` sees it and stops the run."""
    micro_steps = len(loader)
    step_loss = torch.zeros((), device=accelerator.device)
    diverged = torch.zeros((), device=accelerator.device)  # 1.0 once a step was not finite
    step = steps_before + 1
    regime = None
    inner = optimizer.optimizer  # AdamW under accelerate's wrapper
    for index, batch in enumerate(loader):
        # The last group of an epoch may be shorter; its loss is averaged over its own size.
        group_start = index - index % tp.grad_accum
        group_len = min(tp.grad_accum, micro_steps - group_start)
        last_in_group = index == group_start + group_len - 1
        with record_function(STEP_RANGE):  # what profiles count as the step (tests)
            batch = to_device(batch, accelerator.device)
            record = monitor is not None and index == group_start and step % tp.log_every == 0
            # Gradients are all-reduced only on the group's last backward.
            with contextlib.nullcontext() if last_in_group else accelerator.no_sync(model):
                if record:
                    # The monitor's statistics come from an eager forward (a compiled one runs eager).
                    with record_regime(monitor) as regime, torch.compiler.set_stance("force_eager"):
                        logits = model(batch)
                else:
                    logits = model(batch)
                loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
                accelerator.backward(loss / group_len)
            step_loss += loss.detach() / group_len
        bar.update(1)
        if not last_in_group:
            continue
        with record_function(STEP_RANGE):
            if tp.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), tp.max_grad_norm)
            elif accelerator.scaler is None:
                grad_norm = nn.utils.get_total_norm(
                    [p.grad for p in model.parameters() if p.grad is not None]
                )
            else:  # fp16: an overflowing step is the scaler's to skip
                grad_norm = None
            mean_loss = accelerator.reduce(step_loss, "mean")
            finite = torch.isfinite(mean_loss)
            if grad_norm is not None:
                grad_norm = torch.as_tensor(
                    grad_norm, device=mean_loss.device, dtype=mean_loss.dtype
                )
                finite = finite & torch.isfinite(grad_norm)
            diverged = torch.maximum(diverged, (~finite).float())
            if accelerator.scaler is None:
                inner.found_inf = diverged  # the fused AdamW skips its update where this is 1
                optimizer.step()
                del inner.found_inf
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        yield StepRecord(mean_loss, grad_norm, regime)
        step, regime = step + 1, None
        step_loss = torch.zeros((), device=accelerator.device)


def _read_steps(accelerator: Any, records: list[StepRecord], bar: Any) -> list[float]:
    """Bring the unread steps' losses and gradient norms to the host in one transfer, log them
    (with each recorded OT regime) and empty ``records``; a non-finite value stops the run,
    naming the first step that had one (its update and every later one were skipped)."""
    if not records:
        return []
    no_norm = torch.zeros((), device=records[0].loss.device)
    values = torch.stack(
        [torch.stack([r.loss, no_norm if r.grad_norm is None else r.grad_norm]) for r in records]
    ).tolist()
    for record, (loss, norm) in zip(records, values, strict=True):
        if not math.isfinite(loss) or not math.isfinite(norm):
            checked = "not checked (fp16)" if record.grad_norm is None else norm
            raise TrainingDiverged(
                f"train: step {record.step}: loss {loss}, gradient norm {checked}: training "
                "diverged and was stopped; the weights are those before this step (its update "
                "and every later one were skipped) and models/checkpoint/best keeps the last "
                "finite epoch's model, if any (check train.lr, model.ot.epsilon, "
                "train.mixed_precision)"
            )
        regime = flat_regime(record.regime) if record.regime is not None else {}
        accelerator.log({"train/loss": loss, "train/lr": record.lr, **regime}, step=record.step)
    bar.set_postfix(loss=f"{values[-1][0]:.4f}", refresh=False)
    records.clear()
    return [loss for loss, _ in values]


def _split_scores(
    accelerator: Any,
    model: nn.Module,
    split: FeatureDataset,
    shard: list[int],
    params: Params,
    labels: list[str],
) -> dict[str, Any]:
    """Metrics of a split (dev; test under ``train.report_test_each_epoch``): each process predicts
    its shard, every process gets them all."""
    out = predict_dataset(
        model, split, params.train.eval_batch_size, accelerator.device, shard,
        accelerator.autocast,
    )  # fmt: skip
    columns = ("index", "gold", "pred", "pair_kind")
    rows = sorted(gather_object(list(zip(*(out[c].tolist() for c in columns), strict=True))))
    _, gold, pred, kinds = zip(*rows, strict=True)
    return score(gold, pred, kinds, labels)
