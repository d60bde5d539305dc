"""The local training loop, one copy: SGD over shuffled mini-batches, for a budget of epochs with a
floor of optimiser steps, optionally stopped early on a validation loss.

Both the per-modality models of a FedMFS learner and the holistic baseline's one multimodal model
train through :func:`sgd_epochs`; only the loss of a batch differs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmfs.core.settings import TrainConfig

__all__ = ["sgd_epochs", "epoch_budget"]


def epoch_budget(n: int, cfg: TrainConfig) -> int:
    """Epochs to run over ``n`` rows: ``cfg.epochs``, raised until there are at least ``cfg.min_steps``
    optimiser steps (with ten windows and batches of 32, five epochs are five steps: too few to learn)."""
    if n <= 0 or cfg.epochs == 0:
        return 0
    per_epoch = math.ceil(n / cfg.batch_size)
    return max(cfg.epochs, math.ceil(cfg.min_steps / per_epoch))


def sgd_epochs(model: nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor], n: int, cfg: TrainConfig,
               rng: np.random.Generator, val_loss: Callable[[], float] | None = None) -> int:
    """Train ``model`` in place: :func:`epoch_budget` passes over ``n`` rows in a fresh ``rng`` order
    each, one SGD step (learning rate ``cfg.lr``) per batch of ``cfg.batch_size`` row indices;
    ``batch_loss(indices)`` returns the batch's loss.

    Early stopping: with ``val_loss`` (the loss on windows not trained on, evaluated without grad) and
    ``cfg.patience > 0``, the loss is measured before training and after every epoch; training stops
    after ``patience`` epochs without improvement and the model keeps the weights of its best epoch
    (which may be the weights it started from). Returns the optimiser steps taken. Leaves eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    stop_early = val_loss is not None and cfg.patience > 0
    best, best_state, stale = math.inf, None, 0

    def check() -> bool:
        nonlocal best, best_state, stale
        model.eval()
        with torch.no_grad():
            loss = float(val_loss())  # type: ignore[misc]
        model.train()
        if loss < best - 1e-6:
            best, best_state, stale = loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
        return stale >= cfg.patience

    steps = 0
    model.train()
    if stop_early:
        check()
    for _ in range(epoch_budget(n, cfg)):
        order = rng.permutation(n)
        for i in range(0, len(order), cfg.batch_size):
            b = torch.from_numpy(order[i:i + cfg.batch_size])
            for p in params:
                p.grad = None
            batch_loss(b).backward()
            # torch.optim.SGD's step without momentum or decay, written out: the same update bit for
            # bit, and no torch.optim (whose first step imports torch's compiler stack: +73 MiB)
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-cfg.lr)
            steps += 1
        if stop_early and check():
            break
    if stop_early and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return steps
