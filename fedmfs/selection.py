"""Which modality models to upload: priority (Shapley impact vs size vs recency) and selection rules.

Selection rules are small strategy objects with one method, ``select``; the round driver owns the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Protocol, Sequence

import numpy as np

__all__ = [
    "Alphas", "minmax", "priority", "top_gamma", "knapsack", "SelectionInput", "Selector",
    "PrioritySelector", "RandomSelector", "AllSelector", "NoneSelector",
]


@dataclass(frozen=True, slots=True)
class Alphas:
    """Weights of normalised Shapley impact, (1 - normalised size) and recency in the priority."""

    s: float = 0.5
    c: float = 0.5
    r: float = 0.0

    def __post_init__(self) -> None:
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
    if alphas.r and rounds_since_upload is not None:
        p = p + alphas.r * np.asarray(rounds_since_upload, dtype=np.float64) / (round_index + 1)
    return p


def top_gamma(prio: np.ndarray, gamma: int) -> list[int]:
    """Indices of the ``gamma`` highest priorities (ties: lower index first)."""
    order = sorted(range(len(prio)), key=lambda i: (-prio[i], i))
    return sorted(order[: max(0, gamma)])


def knapsack(prio: np.ndarray, sizes: Sequence[int], cap: int, gamma: int | None = None) -> list[int]:
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
    name: str

    def select(self, inp: SelectionInput, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        """Return the chosen modalities and the priority of every modality."""


@dataclass(frozen=True, slots=True)
class PrioritySelector:
    """FedMFS: top-gamma by priority, or the best subset under the byte cap."""

    alphas: Alphas
    name: str = "fedmfs"

    def select(self, inp: SelectionInput, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        p = priority(inp.shapley, inp.sizes, self.alphas, inp.rounds_since_upload, inp.round_index)
        if inp.cap_bytes is None:
            idx = top_gamma(p, inp.gamma)
        else:
            idx = knapsack(p, inp.sizes, inp.cap_bytes, inp.gamma)
        return [inp.modalities[i] for i in idx], p


@dataclass(frozen=True, slots=True)
class RandomSelector:
    """FLASH-style: gamma modalities uniformly at random (those that fit the cap, if one is set)."""

    name: str = "random"

    def select(self, inp: SelectionInput, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        order = rng.permutation(len(inp.modalities))
        chosen, used = [], 0
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
