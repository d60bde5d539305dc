"""What one simulated run is: a selection policy (or the holistic baseline), rounds, seed, rule, training.

Defaults come from where each setting is declared: :class:`~fedmfs.core.selection.SelectionPolicy`
(method, gamma, alphas, cap, codec), :class:`~fedmfs.core.settings.TrainConfig` (local training) and
:class:`~fedmfs.coordinator.machine.RoundPolicy` (aggregation rule); this module repeats none of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedmfs.coordinator.machine import RoundPolicy
from fedmfs.core.aggregation import DEFAULT_RULE, make_aggregator
from fedmfs.core.errors import ConfigError
from fedmfs.core.selection import METHODS, POLICY_KEYS, Alphas, SelectionPolicy
from fedmfs.core.settings import TrainConfig

__all__ = ["SimConfig", "BASELINES", "SIM_KEYS", "all_methods"]

# the keys of a `fedmfs simulate --config` file (and its options); a [train] table holds TrainConfig's
SIM_KEYS: dict[str, type] = {
    "preset": str, "data": str, "method": str, "rounds": int, "seed": int, "aggregation": str, "out": str,
    "transport": str, "broker": str, **{k: t for k, t in POLICY_KEYS.items() if k != "method"},
}

# baselines that are not a selection policy of the FedMFS round: each has its own small driver
BASELINES = {
    "holistic": "feature-level fusion FedAvg: one multimodal model, missing modalities zero-filled",
}


def all_methods() -> dict[str, str]:
    """Every ``--method``: the selection methods, then the baselines, with their descriptions."""
    return {**{k: m.description for k, m in METHODS.items()}, **BASELINES}


@dataclass(frozen=True, slots=True)
class SimConfig:
    policy: SelectionPolicy = field(default_factory=SelectionPolicy)
    rounds: int = RoundPolicy().rounds_total
    seed: int = 0
    aggregation: str = DEFAULT_RULE
    train: TrainConfig = field(default_factory=TrainConfig)
    baseline: str | None = None     # a name of BASELINES: run it instead of the FedMFS round

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ConfigError(f"unknown baseline {self.baseline!r}; choose one of: {', '.join(BASELINES)}")
        try:
            make_aggregator(self.aggregation)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    @classmethod
    def build(cls, method: str | None = None, **kw: Any) -> SimConfig:
        """From flat settings (``method``, ``gamma``, ``alphas``, ``cap_bytes``, ``codec``, ``rounds``,
        ``seed``, ``aggregation``, ``train``); what is not given takes its one declared default."""
        keys = ("gamma", "cap_bytes", "codec", "alphas", "cap_rule", "priority", "evidence", "upload_seconds")
        pol: dict[str, Any] = {k: kw.pop(k) for k in keys if k in kw}
        baseline = method if method in BASELINES else None
        if method is not None and baseline is None:
            pol["method"] = method
        if "alphas" in pol:
            a = pol.pop("alphas")
            pol.update(alpha_s=a.s, alpha_c=a.c, alpha_r=a.r)
        try:
            policy = SelectionPolicy.from_dict(pol)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return cls(policy=policy, baseline=baseline, **kw)

    @property
    def method(self) -> str:
        return self.baseline or self.policy.method

    @property
    def alphas(self) -> Alphas:
        return self.policy.alphas

    def to_dict(self) -> dict:
        p = self.policy
        return {"method": self.method, "rounds": self.rounds, "gamma": p.gamma,
                "alphas": {"s": p.alphas.s, "c": p.alphas.c, "r": p.alphas.r}, "cap_bytes": p.cap_bytes,
                "codec": p.codec, "cap_rule": p.cap_rule, "priority": p.priority, "evidence": p.evidence,
                "upload_seconds": p.upload_seconds,
                "seed": self.seed, "aggregation": self.aggregation,
                "train": asdict(self.train)}
