"""Running a model over features: what training (dev scores), ``evaluate`` and ``predict`` share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from pipeline.device import select_device
from pipeline.features.dataset import FeatureDataset, make_loader
from pipeline.model.saved import TrainedModel, load_trained

__all__ = ["to_device", "predict_dataset", "load_for_inference"]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
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
    indices = list(range(len(dataset))) if indices is None else indices
    loader = make_loader(Subset(dataset, indices), batch_size)
    was_training = model.training
    model.eval()
    gold, kinds, probs = [], [], []
    for batch in loader:
        batch = to_device(batch, torch.device(device))
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = model(batch)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        gold.append(batch["labels"].cpu())
        kinds.append(batch["pair_kind"].cpu())
    model.train(was_training)
    prob = torch.cat(probs).numpy() if probs else np.zeros((0, 0), dtype=np.float32)
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
