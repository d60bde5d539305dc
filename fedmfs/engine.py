"""The in-process FedMFS engine: K clients and the server in one process, round by round.

This is the reference the MQTT deployment must reproduce (same seed, same global models). The server
side (:class:`GlobalModels`) is pure: it takes one round's uploads and returns the new globals.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from fedmfs.aggregation import make_aggregator
from fedmfs.client import LocalClient, TrainConfig, seed_for
from fedmfs.data.format import Fleet
from fedmfs.errors import ConfigError
from fedmfs.modality import DatasetSpec
from fedmfs.models import ModalityModel, state_to_numpy
from fedmfs.payload import decode_model, state_digest
from fedmfs.report import report_envelope
from fedmfs.selection import (AllSelector, Alphas, NoneSelector, PrioritySelector, RandomSelector,
                              Selector)

__all__ = ["METHODS", "SimConfig", "GlobalModels", "Upload", "make_selector", "run_simulation",
           "initial_globals"]

State = dict[str, np.ndarray]

METHODS = {
    "fedmfs": "FedMFS: top-gamma modalities by priority (Shapley vs size vs recency), knapsack under a cap",
    "all": "every modality model every round (gamma = M)",
    "random": "FLASH-style: gamma modalities chosen uniformly at random",
    "size_only": "priority from model size alone (alpha_s = 0)",
    "shapley_only": "priority from Shapley impact alone (alpha_c = 0)",
    "local": "no federation: every client keeps its local models",
    "holistic": "feature-level fusion FedAvg: one multimodal model, missing modalities zero-filled",
}


@dataclass(frozen=True, slots=True)
class SimConfig:
    method: str = "fedmfs"
    rounds: int = 10
    gamma: int = 1
    alphas: Alphas = field(default_factory=lambda: Alphas(1 / 3, 1 / 3, 1 / 3))
    cap_bytes: int | None = None
    seed: int = 0
    aggregation: str = "weighted_mean"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.gamma < 0:
            raise ConfigError(f"gamma must be >= 0, got {self.gamma}")
        if self.cap_bytes is not None and self.cap_bytes <= 0:
            raise ConfigError(f"cap_bytes must be > 0, got {self.cap_bytes}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["alphas"] = asdict(self.alphas)
        return d


def make_selector(cfg: SimConfig) -> Selector:
    if cfg.method == "fedmfs":
        return PrioritySelector(cfg.alphas)
    if cfg.method == "size_only":
        return PrioritySelector(Alphas(0.0, 1.0, cfg.alphas.r), name="size_only")
    if cfg.method == "shapley_only":
        return PrioritySelector(Alphas(1.0, 0.0, cfg.alphas.r), name="shapley_only")
    if cfg.method == "random":
        return RandomSelector()
    if cfg.method == "all":
        return AllSelector()
    if cfg.method == "local":
        return NoneSelector()
    raise ConfigError(f"method {cfg.method!r} has no modality selector")


@dataclass(frozen=True, slots=True)
class Upload:
    device: str
    modality: str
    samples: int
    state: State
    nbytes: int


def initial_globals(spec: DatasetSpec, seed: int) -> State:
    """The server's initial model per modality (every client starts round 0 from these)."""
    out = {}
    for i, m in enumerate(spec.modalities):
        torch.manual_seed(seed_for(seed, 0x6106A1, i))
        out[m.name] = state_to_numpy(ModalityModel(m, spec.num_classes))
    return out


class GlobalModels:
    """Per-modality global models with a version each (0 = the initial model, never aggregated)."""

    def __init__(self, spec: DatasetSpec, seed: int, rule: str = "weighted_mean"):
        self.spec = spec
        self.rule = rule
        self.states: dict[str, State] = initial_globals(spec, seed)
        self.versions: dict[str, int] = {m: 0 for m in spec.names}

    def for_training(self, round_index: int) -> dict[str, State]:
        """Round 0 starts every client from the common initial models; later rounds from every global
        that has been aggregated at least once (a never-uploaded modality keeps training locally)."""
        if round_index == 0:
            return dict(self.states)
        return self.for_deployment()

    def for_deployment(self) -> dict[str, State]:
        return {m: s for m, s in self.states.items() if self.versions[m] > 0}

    def aggregate(self, uploads: list[Upload]) -> dict[str, int]:
        """Weighted mean per modality over its uploaders (sample counts as weights); a modality nobody
        uploaded keeps its previous global. Uploads are summed in device order for reproducibility.
        Returns the number of uploads aggregated per modality."""
        counts: dict[str, int] = {}
        for m in self.spec.names:
            ups = sorted((u for u in uploads if u.modality == m), key=lambda u: u.device)
            if not ups:
                continue
            agg = make_aggregator(self.rule)
            for u in ups:
                agg.add(u.state, float(u.samples))
            self.states[m] = agg.result()
            self.versions[m] += 1
            counts[m] = len(ups)
        return counts

    def digests(self) -> dict[str, str]:
        return {m: state_digest(s) for m, s in self.states.items()}


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False)


def run_simulation(fleet: Fleet, cfg: SimConfig, progress: bool = False,
                   on_round: Callable[[dict], None] | None = None) -> dict:
    """Run ``cfg.rounds`` rounds of ``cfg.method`` on ``fleet``; return the report dict."""
    torch.set_num_threads(cfg.train.threads)
    if cfg.method == "holistic":
        from fedmfs.baselines import run_holistic

        return run_holistic(fleet, cfg, progress=progress, on_round=on_round)
    spec = fleet.spec
    selector = make_selector(cfg)
    gamma = len(spec.names) if cfg.method == "all" else cfg.gamma
    clients = [LocalClient(spec, c, cfg.train, cfg.seed, i) for i, c in enumerate(fleet.clients)]
    server = GlobalModels(spec, cfg.seed, cfg.aggregation)
    rounds = []
    bar = _progress(cfg.rounds * len(clients), f"{cfg.method}", progress)
    cumulative = 0
    for r in range(cfg.rounds):
        t0 = time.perf_counter()
        start = server.for_training(r)
        uploads: list[Upload] = []
        per_client = {}
        for c in clients:
            upd = c.local_round(r, start)
            choice = c.choose(upd, selector, gamma, cfg.cap_bytes, r)
            for m in choice.modalities:
                state = upd.states[m]
                if cfg.train.codec != "fp32":
                    # aggregate what the coordinator would receive: the decoded fp16/int8 payload
                    state = decode_model(c.payload(upd, m, r))[1]
                uploads.append(Upload(c.data.name, m, upd.samples, state, upd.sizes[m]))
            c.mark_uploaded(choice.modalities, r)
            per_client[c.data.name] = {
                "shapley": upd.shapley, "sizes": upd.sizes, "priorities": choice.priorities,
                "choice": list(choice.modalities), "stage1_accuracy": upd.stage1_accuracy,
            }
            if bar is not None:
                bar.update(1)
        counts = server.aggregate(uploads) if cfg.method != "local" else {}
        deploy = server.for_deployment()
        accs = {}
        for c in clients:
            c.stage2(deploy, r)
            accs[c.data.name] = c.evaluate()
        nbytes = sum(u.nbytes for u in uploads)
        cumulative += nbytes
        row = {
            "round": r,
            "accuracy": float(np.mean(list(accs.values()))),
            "client_accuracy": accs,
            "uploads": [{"device": u.device, "modality": u.modality, "bytes": u.nbytes} for u in uploads],
            "upload_bytes": nbytes,
            "cumulative_bytes": cumulative,
            "aggregated": counts,
            "clients": per_client,
            "global_versions": dict(server.versions),
            "seconds": time.perf_counter() - t0,
        }
        rounds.append(row)
        if on_round is not None:
            on_round(row)
    if bar is not None:
        bar.close()
    return report_envelope(fleet, cfg, rounds, server.digests(), "inproc")
