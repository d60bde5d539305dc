"""Which modality models to upload: priority (Shapley impact vs size vs recency) and selection rules.

Selection rules are small strategy objects with one method, ``select``; the round driver owns the rest.
:class:`SelectionPolicy` is every setting of what a device uploads (method, gamma, alphas, cap, codec)
with its default, declared once here: the coordinator pushes it in each device's config, the device
selects with exactly what it was sent, and the simulator and the fleet file take their defaults from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Protocol

import numpy as np

from fedmfs.core.payload import Codec

__all__ = [
    "METHODS",
    "AllSelector",
    "Alphas",
    "Method",
    "NoneSelector",
    "PrioritySelector",
    "RandomSelector",
    "SelectionInput",
    "SelectionPolicy",
    "POLICY_KEYS",
    "CAP_RULES",
    "PRIORITIES",
    "evidence_priority",
    "impact_value",
    "Selector",
    "knapsack",
    "minmax",
    "priority",
    "top_gamma",
]


@dataclass(frozen=True, slots=True)
class Alphas:
    """Weights of normalised Shapley impact, (1 - normalised size) and recency in the priority."""

    # chosen on validation runs of tuning seeds (docs/benchmarks.md, "Choosing alpha, recency and gamma"):
    # a heavy recency weight beat mmFedMC's 1/3 each and the paper's 0.2/0.8 without recency
    s: float = 0.2
    c: float = 0.2
    r: float = 0.6

    def __post_init__(self) -> None:
        if not all(np.isfinite((self.s, self.c, self.r))):
            raise ValueError(f"alphas must be finite numbers, got s={self.s}, c={self.c}, r={self.r}")
        if min(self.s, self.c, self.r) < 0:
            raise ValueError(f"alphas must be >= 0, got s={self.s}, c={self.c}, r={self.r}")
        if self.s + self.c + self.r <= 0:
            raise ValueError("at least one alpha must be > 0")


def minmax(v: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; a constant vector maps to all zeros."""
    v = np.asarray(v, dtype=np.float64)
    if v.size == 0:
        return v
    lo, hi = v.min(), v.max()
    return np.zeros_like(v) if hi - lo <= 1e-12 * max(1.0, abs(hi)) else (v - lo) / (hi - lo)


def priority(
    shapley: np.ndarray,
    sizes: np.ndarray,
    alphas: Alphas,
    rounds_since_upload: np.ndarray | None = None,
    round_index: int = 0,
) -> np.ndarray:
    """P_m = a_s * norm(phi_m) + a_c * (1 - norm(size_m)) + a_r * (t - last_m) / (t + 1).

    Normalisation is min-max across this client's modalities (the paper's step 5).
    ``rounds_since_upload`` is t - (last round m was uploaded); for a never-uploaded modality pass t + 1.
    """
    p = alphas.s * minmax(shapley) + alphas.c * (1.0 - minmax(sizes))
    return p + _recency(alphas, rounds_since_upload, round_index)


def _recency(alphas: Alphas, rounds_since_upload: np.ndarray | None, round_index: int) -> np.ndarray | float:
    """a_r * (t - last_m) / (t + 1), the paper's recency term (0 without a history)."""
    if not alphas.r or rounds_since_upload is None:
        return 0.0
    return alphas.r * np.asarray(rounds_since_upload, dtype=np.float64) / (round_index + 1)


def evidence_priority(
    shapley: np.ndarray,
    sizes: np.ndarray,
    alphas: Alphas,
    rounds_since_upload: np.ndarray | None = None,
    round_index: int = 0,
    evidence: float = 0.2,
) -> tuple[np.ndarray, np.ndarray]:
    """The priority whose terms cannot override the evidence: ``(P, eligible)``.

    A modality is **eligible** when its score is above zero and at least ``evidence`` times the client's
    best score: a modality with no evidence of value (pure noise scores about 0 on held-out windows,
    above or below by chance) is never sent because it is small or overdue. Among the eligible ones

        P_m = a_s * phi_m / max(phi) + a_c * (1 - size_m / max(size)) + a_r * (t - last_m) / (t + 1)

    and P_m = 0 for the others. Impact is a share of the best (not min-max: the weakest of several good
    modalities keeps most of its value, where min-max gave it the 0 of noise), size a share of the
    largest model (the smallest one scores about 1, the largest 0), recency as in the paper.
    :func:`priority` is the paper's formula (``priority = "paper"``)."""
    phi = np.asarray(shapley, dtype=np.float64)
    if phi.size == 0:
        return phi, np.zeros(0, bool)
    best = float(phi.max())
    eligible = (phi > 0) & (phi >= evidence * best) if best > 0 else np.zeros(phi.shape, bool)
    size = np.asarray(sizes, dtype=np.float64)
    top = float(size.max()) if size.size else 0.0
    p = alphas.s * (phi / best if best > 0 else np.zeros_like(phi))
    p = p + alphas.c * (1.0 - size / top if top > 0 else np.zeros_like(size))
    p = p + _recency(alphas, rounds_since_upload, round_index)
    return np.where(eligible, p, 0.0), eligible


def top_gamma(prio: np.ndarray, gamma: int) -> list[int]:
    """Indices of the ``gamma`` highest priorities (ties: lower index first)."""
    order = sorted(range(len(prio)), key=lambda i: (-prio[i], i))
    return sorted(order[: max(0, gamma)])


def knapsack(prio: np.ndarray, sizes: Sequence[int] | np.ndarray, cap: int, gamma: int | None = None) -> list[int]:
    """The subset with the highest total priority whose total size fits ``cap`` (and has at most
    ``gamma`` members). Exact: every subset is enumerated (M is small). Ties: fewer bytes, then the
    lexicographically smallest index set."""
    m = len(prio)
    if m > 20:
        raise ValueError(f"exact selection over {m} modalities is too costly (max 20)")
    best: tuple | None = None
    kmax = m if gamma is None else min(gamma, m)
    for k in range(1, kmax + 1):
        for s in combinations(range(m), k):
            b = sum(int(sizes[i]) for i in s)
            if b > cap:
                continue
            key = (-round(float(sum(prio[i] for i in s)), 9), b, s)
            if best is None or key < best:
                best = key
    if best is None:
        return []
    return list(best[2])


@dataclass(frozen=True, slots=True)
class SelectionInput:
    """What a client knows when it chooses: its modalities, their scores, sizes and upload history."""

    modalities: tuple[str, ...]
    shapley: np.ndarray
    sizes: np.ndarray
    rounds_since_upload: np.ndarray
    round_index: int
    gamma: int
    cap_bytes: int | None = None


class Selector(Protocol):
    @property
    def name(self) -> str: ...

    def select(self, inp: SelectionInput, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        """Return the chosen modalities and the priority of every modality."""


@dataclass(frozen=True, slots=True)
class PrioritySelector:
    """FedMFS: the top-gamma modalities by priority; when they do not fit the byte cap, the subset of
    at most gamma modalities that fits and is worth the most under ``cap_rule``:

    * ``"impact"`` (default): value_m = phi+_m / max(phi+) * (1 + alpha_r * (t - last_m) / (t + 1)): the
      Shapley impact, with recency as a bonus on it; size is only the knapsack's weight (it is what the
      cap spends), and a modality of no positive impact costs bytes for nothing, so it is not sent;
    * ``"priority"``: value_m = P_m, the priority itself (fedmfs 0.1.0's rule). The priority already
      rewards small size, so many small models can outweigh the one large informative model.

    A cap that the top-gamma choice fits changes nothing (the cap does not change gamma's meaning)."""

    alphas: Alphas
    name: str = "fedmfs"
    cap_rule: str = "impact"
    kind: str = "evidence"          # PRIORITIES: evidence_priority, or the paper's priority()
    evidence: float = 0.2

    def select(self, inp: SelectionInput, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        if self.kind == "paper":
            p = priority(inp.shapley, inp.sizes, self.alphas, inp.rounds_since_upload, inp.round_index)
            eligible = np.ones(len(p), bool)
        else:
            p, eligible = evidence_priority(inp.shapley, inp.sizes, self.alphas, inp.rounds_since_upload,
                                            inp.round_index, self.evidence)
        # top-gamma among the eligible: fewer than gamma when fewer modalities show value
        idx = [i for i in top_gamma(np.where(eligible, p, -np.inf), inp.gamma) if eligible[i]]
        if inp.cap_bytes is not None and sum(int(inp.sizes[i]) for i in idx) > inp.cap_bytes:
            value = p if self.cap_rule == "priority" else impact_value(inp, self.alphas)
            # an ineligible modality is worth nothing: the knapsack (fewer bytes at equal value) skips it
            idx = knapsack(np.where(eligible, value, 0.0), inp.sizes, inp.cap_bytes, inp.gamma)
            idx = [i for i in idx if eligible[i]]
        return [inp.modalities[i] for i in idx], p


def impact_value(inp: SelectionInput, alphas: Alphas) -> np.ndarray:
    """value_m = phi+_m / max(phi+) * (1 + a_r * (t - last_m) / (t + 1)): what an upload is expected to
    add (its Shapley impact, scaled to the client's best modality) with the priority's recency term as a
    bonus on it. A modality of no positive impact is worth nothing however stale, so the knapsack (which
    prefers fewer bytes at equal value) spends no bytes on it."""
    phi = np.clip(np.asarray(inp.shapley, dtype=np.float64), 0.0, None)
    top = phi.max() if phi.size else 0.0
    v = phi / top if top > 0 else np.zeros_like(phi)
    if alphas.r:
        v = v * (1.0 + alphas.r * np.asarray(inp.rounds_since_upload, dtype=np.float64) / (inp.round_index + 1))
    return v


@dataclass(frozen=True, slots=True)
class RandomSelector:
    """FLASH-style: gamma modalities uniformly at random (those that fit the cap, if one is set)."""

    name: str = "random"

    def select(self, inp: SelectionInput, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        order = rng.permutation(len(inp.modalities))
        chosen: list[int] = []
        used = 0
        for i in order:
            if len(chosen) >= inp.gamma:
                break
            if inp.cap_bytes is not None and used + inp.sizes[i] > inp.cap_bytes:
                continue
            chosen.append(int(i))
            used += int(inp.sizes[i])
        return [inp.modalities[i] for i in sorted(chosen)], np.zeros(len(inp.modalities))


@dataclass(frozen=True, slots=True)
class AllSelector:
    """Upload every modality model (gamma = M), capped if a cap is set (then by smallest size first)."""

    name: str = "all"

    def select(self, inp: SelectionInput, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        if inp.cap_bytes is None:
            return list(inp.modalities), np.ones(len(inp.modalities))
        idx = knapsack(np.ones(len(inp.modalities)), inp.sizes, inp.cap_bytes)
        return [inp.modalities[i] for i in idx], np.ones(len(inp.modalities))


@dataclass(frozen=True, slots=True)
class NoneSelector:
    """Local-only: nothing leaves the device."""

    name: str = "local"

    def select(self, inp: SelectionInput, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        return [], np.zeros(len(inp.modalities))


# ---------------------------------------------------------------------------------- the registry

@dataclass(frozen=True, slots=True)
class Method:
    """A selection method: its description (``fedmfs methods``) and how it builds its selector."""

    name: str
    description: str
    make: Callable[[SelectionPolicy], Selector]
    every_modality: bool = False   # gamma is the number of modalities the client has


METHODS: Mapping[str, Method] = {m.name: m for m in (
    Method("fedmfs", "FedMFS: top-gamma modalities by priority (Shapley vs size vs recency) among those whose "
           "score shows value (priority = evidence; `paper`: the paper's formula over all); under a byte "
           "cap that they exceed, the subset of most impact that fits",
           lambda p: PrioritySelector(p.alphas, cap_rule=p.cap_rule, kind=p.priority, evidence=p.evidence)),
    Method("all", "every modality model every round (gamma = M)", lambda p: AllSelector(), every_modality=True),
    Method("random", "FLASH-style: gamma modalities chosen uniformly at random", lambda p: RandomSelector()),
    Method("size_only", "priority from model size alone (alpha_s = 0; the paper's formula: no Shapley gate)",
           lambda p: PrioritySelector(Alphas(0.0, 1.0, p.alphas.r), name="size_only", cap_rule="priority",
                                      kind="paper")),
    Method("shapley_only", "priority from Shapley impact alone (alpha_c = 0)",
           lambda p: PrioritySelector(Alphas(1.0, 0.0, p.alphas.r), name="shapley_only", cap_rule=p.cap_rule,
                                      kind=p.priority, evidence=p.evidence)),
    Method("local", "no federation: every client keeps its local models", lambda p: NoneSelector()),
)}


# the flat keys of a policy (fleet file tables, config messages, simulate options) and their TOML types
POLICY_KEYS: Mapping[str, type] = {"method": str, "gamma": int, "alpha_s": float, "alpha_c": float,
                                   "alpha_r": float, "cap_bytes": int, "codec": str, "cap_rule": str,
                                   "priority": str, "evidence": float, "upload_seconds": float}
CAP_RULES = ("impact", "priority")
# the priority's form: "evidence" (evidence_priority: a modality must show value to be sent) or "paper"
# (the paper's P = a_s norm(phi) + a_c (1 - norm(size)) + a_r recency over every modality)
PRIORITIES = ("evidence", "paper")


@dataclass(frozen=True, slots=True)
class SelectionPolicy:
    """What a device uploads each round; the one place these settings and their defaults live.

    ``cap_bytes`` None means no cap (top-gamma alone decides); ``codec`` is the encoding of the
    uploaded weights (part of their size)."""

    method: str = "fedmfs"
    gamma: int = 1
    alphas: Alphas = field(default_factory=Alphas)
    cap_bytes: int | None = None
    codec: str = "fp32"
    cap_rule: str = "impact"     # what a binding cap maximises (PrioritySelector); CAP_RULES
    priority: str = "evidence"   # PRIORITIES
    # the share of the client's best score a modality needs to be sent (priority = "evidence")
    evidence: float = 0.2
    # dynamic bandwidth: the seconds a round's uploads may take on the device's link. A device that has
    # measured its link rate caps its round at rate x upload_seconds bytes (and at cap_bytes); None:
    # the cap is cap_bytes alone
    upload_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.cap_rule not in CAP_RULES:
            raise ValueError(f"cap_rule must be one of {', '.join(CAP_RULES)}, got {self.cap_rule!r}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if (isinstance(self.evidence, bool) or not isinstance(self.evidence, (int, float))
                or not 0.0 <= self.evidence <= 1.0):
            raise ValueError(f"evidence must be a number in [0, 1] (a share of the best score), got {self.evidence!r}")
        u = self.upload_seconds
        if u is not None and (isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u < 1e6):
            raise ValueError(f"upload_seconds must be a number of seconds > 0 (or absent: no time budget), got {u!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 0:
            raise ValueError(f"gamma must be an integer >= 0, got {self.gamma!r}")
        if self.cap_bytes is not None and (isinstance(self.cap_bytes, bool) or not isinstance(self.cap_bytes, int)
                                           or self.cap_bytes <= 0):
            raise ValueError(f"cap_bytes must be a positive integer (or absent: no cap), got {self.cap_bytes!r}")
        try:
            Codec(self.codec)
        except ValueError as e:
            raise ValueError(f"codec must be one of {', '.join(c.value for c in Codec)}, got {self.codec!r}") from e

    def selector(self) -> Selector:
        return METHODS[self.method].make(self)

    def gamma_for(self, modalities: int) -> int:
        """The number of modality models a client with ``modalities`` of them may upload."""
        return modalities if METHODS[self.method].every_modality else self.gamma

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "gamma": self.gamma, "alpha_s": self.alphas.s, "alpha_c": self.alphas.c,
                "alpha_r": self.alphas.r, "cap_bytes": self.cap_bytes, "codec": self.codec,
                "cap_rule": self.cap_rule, "priority": self.priority, "evidence": self.evidence,
                "upload_seconds": self.upload_seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SelectionPolicy:
        """From the flat keys of :meth:`to_dict` (a fleet file table, a config message); missing
        keys take the defaults above. Raises ValueError naming the bad value."""
        base = cls()
        a = base.alphas
        return cls(method=d.get("method", base.method), gamma=d.get("gamma", base.gamma),
                   alphas=Alphas(float(d.get("alpha_s", a.s)), float(d.get("alpha_c", a.c)),
                                 float(d.get("alpha_r", a.r))),
                   cap_bytes=d.get("cap_bytes", base.cap_bytes), codec=d.get("codec", base.codec),
                   cap_rule=d.get("cap_rule", base.cap_rule), priority=d.get("priority", base.priority),
                   evidence=d.get("evidence", base.evidence),
                   upload_seconds=d.get("upload_seconds", base.upload_seconds))

    def link_cap(self, rate: float | None) -> int | None:
        """The byte cap of a round on a link of ``rate`` bytes/s: ``cap_bytes``, lowered to
        ``rate x upload_seconds`` when both are known (dynamic bandwidth)."""
        if self.upload_seconds is None or rate is None or not math.isfinite(rate) or rate <= 0:
            return self.cap_bytes
        budget = max(1, int(rate * self.upload_seconds))
        return budget if self.cap_bytes is None else min(self.cap_bytes, budget)
