"""The local training loop, one copy: SGD over shuffled mini-batches for ``epochs`` epochs.

Both the per-modality models of a FedMFS learner and the holistic baseline's one multimodal model
train through :func:`sgd_epochs`; only the loss of a batch differs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmfs.core.settings import TrainConfig

__all__ = ["sgd_epochs"]


def sgd_epochs(model: nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor], n: int, cfg: TrainConfig,
               rng: np.random.Generator) -> None:
    """Train ``model`` in place: ``cfg.epochs`` passes over ``n`` rows in a fresh ``rng`` order each,
    one SGD step (learning rate ``cfg.lr``) per batch of ``cfg.batch_size`` row indices;
    ``batch_loss(indices)`` returns the batch's loss. Leaves the model in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    model.train()
    for _ in range(cfg.epochs):
        order = rng.permutation(n)
        for i in range(0, len(order), cfg.batch_size):
            b = torch.from_numpy(order[i:i + cfg.batch_size])
            opt.zero_grad()
            batch_loss(b).backward()
            opt.step()
    model.eval()
