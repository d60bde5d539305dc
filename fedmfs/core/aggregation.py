"""Per-modality aggregation on the coordinator.

The paper's rule is a weighted mean over the clients that uploaded the modality, weights = their
sample counts. :class:`WeightedMean` streams: it keeps one float64 accumulator per tensor, so its
memory is O(model size) whatever the number of uploads, and partial sums combine (several workers).
Robust rules (trimmed mean, median) must see every upload and keep them: O(uploads) memory.

Bounded influence (docs/protocol.md): before any rule sees an upload, the coordinator clips its update
against the current global, :func:`clip_update` to :func:`clip_bound`; under the weighted mean the
weight is also bounded (the fleet's ``max_samples``), so one device of weight w displaces a global
from the honest-only one by at most ``w / (w + W_honest) * (C + ||mean honest update||)`` per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["DEFAULT_RULE", "RULES", "Aggregator", "Median", "TrimmedMean", "WeightedMean", "clip_bound", "clip_update",
           "make_aggregator", "state_norm", "update_norm"]

State = dict[str, np.ndarray]

DEFAULT_RULE = "weighted_mean"     # the paper's rule
RULES = ("weighted_mean", "trimmed_mean", "median")


class Aggregator(Protocol):
    @property
    def count(self) -> int: ...

    @property
    def weight(self) -> float: ...

    def add(self, state: State, weight: float) -> None: ...

    def result(self) -> State: ...


def _check(ref: State | None, state: State) -> None:
    if ref is None:
        return
    if set(ref) != set(state):
        raise ValueError(f"tensor names differ: missing {sorted(set(ref) - set(state))}, "
                         f"unexpected {sorted(set(state) - set(ref))}")
    for k in ref:
        if ref[k].shape != state[k].shape:
            raise ValueError(f"tensor {k!r}: shape {state[k].shape} != {ref[k].shape}")


@dataclass
class WeightedMean:
    """Streaming sum of weight * tensor and of weights, in float64."""

    sums: State = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0

    def add(self, state: State, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"weight must be > 0, got {weight}")
        _check(self.sums or None, state)
        if not self.sums:
            self.sums = {k: np.zeros(v.shape, np.float64) for k, v in state.items()}
        for k, v in state.items():
            self.sums[k] += float(weight) * np.asarray(v, np.float64)
        self.weight += float(weight)
        self.count += 1

    def merge(self, other: WeightedMean) -> None:
        """Combine another worker's partial sum (aggregation is additive)."""
        if not other.count:
            return
        _check(self.sums or None, other.sums)
        if not self.sums:
            self.sums = {k: np.zeros(v.shape, np.float64) for k, v in other.sums.items()}
        for k, v in other.sums.items():
            self.sums[k] += v
        self.weight += other.weight
        self.count += other.count

    def result(self) -> State:
        if not self.count:
            raise ValueError("no uploads to aggregate")
        return {k: (v / self.weight).astype(np.float32) for k, v in self.sums.items()}


@dataclass
class _Collect:
    states: list = field(default_factory=list)
    weights: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.states)

    @property
    def weight(self) -> float:
        return float(sum(self.weights))

    def add(self, state: State, weight: float) -> None:
        _check(self.states[0] if self.states else None, state)
        self.states.append({k: np.asarray(v, np.float64) for k, v in state.items()})
        self.weights.append(float(weight))


@dataclass
class TrimmedMean(_Collect):
    """Coordinate-wise mean after dropping the ``trim`` fraction of extremes at each end (unweighted)."""

    trim: float = 0.1

    def result(self) -> State:
        if not self.states:
            raise ValueError("no uploads to aggregate")
        n = len(self.states)
        k = int(np.floor(self.trim * n))
        if 2 * k >= n:
            k = (n - 1) // 2
        out = {}
        for name in self.states[0]:
            a = np.sort(np.stack([s[name] for s in self.states]), axis=0)
            out[name] = a[k:n - k].mean(0).astype(np.float32)
        return out


@dataclass
class Median(_Collect):
    """Coordinate-wise median (unweighted)."""

    def result(self) -> State:
        if not self.states:
            raise ValueError("no uploads to aggregate")
        return {k: np.median(np.stack([s[k] for s in self.states]), axis=0).astype(np.float32)
                for k in self.states[0]}


def state_norm(state: State) -> float:
    """The L2 norm of a model's parameters taken as one vector (float64)."""
    return float(np.sqrt(sum(float(np.square(np.asarray(v, np.float64)).sum()) for v in state.values())))


def update_norm(state: State, reference: State) -> float:
    """||state - reference||, the L2 norm of an update over all tensors as one vector (float64)."""
    return state_norm({k: np.asarray(state[k], np.float64) - reference[k] for k in state})


def clip_bound(reference: State, max_ratio: float, min_rms: float) -> float:
    """C = max(max_ratio * ||reference||, min_rms * sqrt(P)), P the number of parameters: the largest
    update norm counted in full. Relative to the global so it scales with the model's weights; the floor
    (an RMS per parameter, so it scales with the model's size) keeps a near-zero global from freezing."""
    params = sum(int(np.size(v)) for v in reference.values())
    return max(max_ratio * state_norm(reference), min_rms * float(np.sqrt(params)))


def clip_update(state: State, reference: State, max_norm: float) -> State:
    """Scale ``state - reference`` down to L2 norm ``max_norm`` (norm clipping against a bad client):
    reference + d * min(1, max_norm / ||d||). Within the bound ``state`` is returned as it is."""
    d = {k: np.asarray(state[k], np.float64) - reference[k] for k in state}
    norm = state_norm(d)
    if norm <= max_norm or norm == 0:
        return state
    f = max_norm / norm
    return {k: (reference[k] + f * d[k]).astype(np.float32) for k in state}


def make_aggregator(rule: str = DEFAULT_RULE, trim: float = 0.1) -> Aggregator:
    if rule == "weighted_mean":
        return WeightedMean()
    if rule == "trimmed_mean":
        return TrimmedMean(trim=trim)
    if rule == "median":
        return Median()
    raise ValueError(f"unknown aggregation rule {rule!r}; use one of {', '.join(RULES)}")
