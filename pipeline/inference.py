"""Running a model over features: what training (dev scores), ``evaluate`` and ``predict`` share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from pipeline.device import select_device
from pipeline.features.dataset import FeatureDataset, make_loader
from pipeline.model.saved import TrainedModel, load_trained

__all__ = ["to_device", "predict_dataset", "load_for_inference"]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device`` (asynchronous from pinned memory); other values as they
    are."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


@torch.inference_mode()
def predict_dataset(
    model: nn.Module,
    dataset: FeatureDataset,
    batch_size: int,
    device: torch.device | str,
    indices: list[int] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, np.ndarray]:
    """Run the model over (a subset of) a feature split: ``index, gold, pred, pair_kind, probs``.
    ``autocast``: a context factory for mixed precision (``accelerator.autocast``)."""
    device = torch.device(device)
    indices = list(range(len(dataset))) if indices is None else indices
    loader = make_loader(Subset(dataset, indices), batch_size, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    gold, kinds, probs = [], [], []
    for batch in loader:
        gold.append(batch["labels"])
        kinds.append(batch["pair_kind"])
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(to_device(batch, device))
        probs.append(torch.softmax(logits.float(), dim=-1))
    model.train(was_training)
    # One copy back at the end: the device is never waited for between batches.
    prob = torch.cat(probs).cpu().numpy() if probs else np.zeros((0, 0), dtype=np.float32)
    return {
        "index": np.asarray(indices, dtype=np.int64),
        "gold": torch.cat(gold).numpy() if gold else np.zeros(0, dtype=np.int64),
        "pred": prob.argmax(-1) if probs else np.zeros(0, dtype=np.int64),
        "pair_kind": torch.cat(kinds).numpy() if kinds else np.zeros(0, dtype=np.int64),
        "probs": prob,
    }


def load_for_inference(model_dir: str | Path) -> TrainedModel:
    """A trained model folder, loaded onto this process's device (:func:`select_device`)."""
    return load_trained(model_dir, select_device())
