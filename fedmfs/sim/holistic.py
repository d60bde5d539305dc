"""Holistic feature-level fusion FedAvg: the paper's strongest non-selective baseline.

Not a selection policy of the FedMFS round (there are no per-modality models to choose from), so it
has this small driver of its own and its own report rows; it trains with the learner's one training
loop (:func:`fedmfs.learner.training.sgd_epochs`).

One multimodal model per client: an LSTM encoder per modality, the last hidden states concatenated
(zeros for a modality the client lacks) -> linear -> LogSoftmax. Every client uploads the whole model
every round; the server averages with sample-count weights (FedAvg).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedmfs.core.aggregation import WeightedMean
from fedmfs.core.data.format import Fleet
from fedmfs.core.modality import DatasetSpec
from fedmfs.core.payload import Codec, ModelHeader, decode_model, encode_model, state_digest
from fedmfs.core.seeds import seed_for
from fedmfs.learner.models import numpy_to_state, state_to_numpy
from fedmfs.learner.training import sgd_epochs
from fedmfs.sim.config import SimConfig
from fedmfs.sim.report import report_envelope

__all__ = ["HolisticModel", "aggregate_holistic", "run_holistic"]

State = dict[str, np.ndarray]


class HolisticModel(nn.Module):
    def __init__(self, spec: DatasetSpec):
        super().__init__()
        self.names = spec.names
        self.encoders = nn.ModuleDict({m.name: nn.LSTM(m.features, m.hidden, batch_first=True)
                                       for m in spec.modalities})
        self.head = nn.Linear(sum(m.hidden for m in spec.modalities), spec.num_classes)
        self.hidden = {m.name: m.hidden for m in spec.modalities}

    def forward(self, x: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        feats = []
        for m in self.names:
            if m in x:
                v = x[m].reshape(n, x[m].shape[1], -1)
                h, _ = self.encoders[m](v)
                feats.append(h[:, -1, :])
            else:
                feats.append(torch.zeros(n, self.hidden[m]))  # missing modality: zero-filled features
        return torch.log_softmax(self.head(torch.cat(feats, -1)), -1)


def _train(model: HolisticModel, x: dict[str, np.ndarray], y: np.ndarray, cfg, rng) -> None:
    xt = {m: torch.from_numpy(v) for m, v in x.items()}
    yt = torch.from_numpy(y)
    sgd_epochs(model, lambda b: nn.functional.nll_loss(model({m: v[b] for m, v in xt.items()}, len(b)), yt[b]),
               len(y), cfg, rng)


def _group(name: str) -> str:
    """The aggregation group of a parameter: its modality's encoder, or the shared head."""
    return name.split(".")[1] if name.startswith("encoders.") else "head"


def aggregate_holistic(previous: State, uploads: list[tuple[State, float, tuple[str, ...]]]) -> tuple[State, int]:
    """FedAvg per parameter group: each modality's encoder over the uploads of clients that have the
    modality (an absent modality's untouched encoder would dilute it), the head over all uploads;
    a group nobody uploaded keeps ``previous``. Returns the new state and the number of uploads."""
    groups: dict[str, WeightedMean] = {}
    for state, weight, modalities in uploads:
        for g in {"head", *modalities}:
            part = {k: v for k, v in state.items() if _group(k) == g}
            groups.setdefault(g, WeightedMean()).add(part, weight)
    out = dict(previous)
    for agg in groups.values():
        out.update(agg.result())
    return out, len(uploads)


def run_holistic(fleet: Fleet, cfg: SimConfig, progress: bool = False,
                 on_round: Callable[[dict], None] | None = None) -> dict:
    """Rounds of holistic FedAvg under the run's policy: every client uploads its whole model each
    round, encoded with the policy's codec (the server averages what it received, decoded), and not
    at all when the encoded model exceeds the policy's byte cap."""
    spec = fleet.spec
    policy = cfg.policy
    torch.manual_seed(seed_for(cfg.seed, 0x401))
    global_state = state_to_numpy(HolisticModel(spec))
    rounds, cumulative = [], 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.rounds * len(fleet.clients), desc="holistic", unit="client", leave=False)
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        received: list[tuple[State, float, tuple[str, ...]]] = []
        uploads = []
        for i, c in enumerate(fleet.clients):
            model = HolisticModel(spec)
            numpy_to_state(model, global_state)
            xtr, ytr = c.split(True)
            _train(model, xtr, ytr, cfg.train, np.random.default_rng(seed_for(cfg.seed, i, r, 0x401)))
            payload = encode_model(state_to_numpy(model), ModelHeader(r, "holistic", c.n_train, Codec(policy.codec)))
            if policy.cap_bytes is not None and len(payload) > policy.cap_bytes:
                continue   # the whole model does not fit the device's cap: nothing is sent
            received.append((decode_model(payload)[1], float(c.n_train), tuple(c.modalities)))
            uploads.append({"device": c.name, "modality": "holistic", "bytes": len(payload)})
            if bar is not None:
                bar.update(1)
        global_state, count = aggregate_holistic(global_state, received)
        model = HolisticModel(spec)
        numpy_to_state(model, global_state)
        accs = {}
        with torch.no_grad():
            for c in fleet.clients:
                xte, yte = c.split(False)
                pred = model({m: torch.from_numpy(v) for m, v in xte.items()}, len(yte)).argmax(-1).numpy()
                accs[c.name] = float((pred == yte).mean()) if len(yte) else 0.0
        nbytes = sum(u["bytes"] for u in uploads)
        cumulative += nbytes
        row = {"round": r, "accuracy": float(np.mean(list(accs.values()))), "client_accuracy": accs,
               "uploads": uploads, "upload_bytes": nbytes, "cumulative_bytes": cumulative,
               "aggregated": {"holistic": count} if count else {}, "clients": {},
               "global_versions": {"holistic": r + 1}, "seconds": time.perf_counter() - t0}
        rounds.append(row)
        if on_round is not None:
            on_round(row)
    if bar is not None:
        bar.close()
    return report_envelope(fleet, cfg, rounds, {"holistic": state_digest(global_state)}, "inproc")
