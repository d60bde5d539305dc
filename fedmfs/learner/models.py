"""PyTorch models: one LSTM per modality and the personalised fusion model (training side only)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.seeds import seed_for

__all__ = ["ModalityModel", "FusionModel", "build_modality_models", "state_to_numpy", "numpy_to_state",
           "initial_globals"]


class ModalityModel(nn.Module):
    """LSTM over (batch, time, *feature_shape) -> linear on the last step -> LogSoftmax (paper recipe)."""

    def __init__(self, spec: ModalitySpec, num_classes: int):
        super().__init__()
        self.spec = spec
        self.lstm = nn.LSTM(spec.features, spec.hidden, batch_first=True)
        self.head = nn.Linear(spec.hidden, num_classes)
        self.out = nn.LogSoftmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], x.shape[1], -1)
        h, _ = self.lstm(x)
        return self.out(self.head(h[:, -1, :]))


class FusionModel(nn.Module):
    """Fuses the modality models' class-probability vectors (B, M, C) with a presence mask (B, M).

    Input ``probs`` holds each modality's probabilities (or one-hot hard labels, the paper's mode);
    rows of absent modalities are ignored through the mask. Output: log-probabilities (B, C).
    """

    def __init__(self, num_modalities: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.num_modalities = num_modalities
        self.num_classes = num_classes
        self.net = nn.Sequential(
            nn.Linear(num_modalities * num_classes + num_modalities, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        self.out = nn.LogSoftmax(dim=-1)

    def forward(self, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = probs * mask.unsqueeze(-1)
        z = torch.cat([z.reshape(z.shape[0], -1), mask], dim=-1)
        return self.out(self.net(z))


def build_modality_models(spec: DatasetSpec) -> dict[str, ModalityModel]:
    return {m.name: ModalityModel(m, spec.num_classes) for m in spec.modalities}


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """A module's parameters as float32 numpy arrays (the wire and aggregation currency)."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in module.state_dict().items()}


def numpy_to_state(module: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load numpy arrays into a module strictly: names and shapes must match exactly."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(
            f"state does not fit the model: missing {missing}, unexpected {unexpected}, "
            f"wrong shape {[(k, tuple(own[k].shape), tuple(state[k].shape)) for k in bad]}"
        )
    module.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in state.items()})


def initial_globals(spec: DatasetSpec, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """The coordinator's initial model per modality: every device starts round 0 from these."""
    out = {}
    for i, m in enumerate(spec.modalities):
        torch.manual_seed(seed_for(seed, 0x6106A1, i))
        out[m.name] = state_to_numpy(ModalityModel(m, spec.num_classes))
    return out
