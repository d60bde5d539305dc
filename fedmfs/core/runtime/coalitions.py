"""Batched coalition evaluation: modality-level Shapley values from few, large fusion calls.

Given the modality models' class probabilities for the explained samples ``x`` (N,M,C) and the
background ``bg`` (B,M,C) -- computed ONCE, outside this module -- the value of a coalition S of the
client's present modalities is the fusion model's output when modalities in S take the explained
sample's probabilities and the others take a background sample's (interventional), averaged over
the background. This is exactly :mod:`fedmfs.core.shapley`'s definition; this module only changes how the
fusion model is called: every needed coalition is evaluated in a few large batched calls (chunked to
bound memory) instead of one call per coalition.

Two ways to evaluate coalitions (a :data:`CoalitionFn`):

* :func:`fusion_coalition_fn` -- generic: builds the (s*N*B, M, C) tensor of substituted rows with
  ``np.where`` and calls any fusion function (the plain fusion ONNX graph);
* :func:`graph_coalition_fn` -- fast: calls the coalition graph of
  :func:`fedmfs.core.runtime.graphs.fusion_coalition_onnx`, which exploits the fusion model's affine first
  layer.

Exact enumeration for up to :data:`fedmfs.core.shapley.EXACT_MAX` players; beyond, permutation sampling
with antithetic pairs and a standard error: :func:`fedmfs.core.shapley.permutation_from_coalitions`,
the same sampler as the reference :func:`fedmfs.core.shapley.permutation_shapley` (same draws and
values for the same seed), here fed a batched evaluator. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np

from fedmfs.core.errors import ConfigError, DataError
from fedmfs.core.shapley import (
    EXACT_MAX,
    CoalitionFn,
    FusionFn,
    ValueKind,
    coalition_masks,
    modality_scores,
    permutation_from_coalitions,
    shapley_matrix,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "CoalitionFn",
    "ShapleyMethod",
    "ShapleyResult",
    "coalition_values_from_probs",
    "engine_shapley",
    "exact_from_coalitions",
    "fusion_coalition_fn",
    "graph_coalition_fn",
    "permutation_from_coalitions",
]

# Bound on the float32 elements of the largest intermediate tensor of one batched fusion call
# (2^19 elements = 2 MiB): keeps peak memory flat whatever N, B and the number of coalitions. At 2^21
# the coalition graph's few live (S,N,B,H) buffers plus heap fragmentation added ~40 MB of peak RSS
# on ActionSense shapes; at 2^19 the fusion step stays below the modality step's peak (~+7 MB).
DEFAULT_CHUNK_ELEMENTS = 1 << 19

# The evaluators below are CoalitionFn (fedmfs.core.shapley): coalitions (S, P) bool over the players
# -> coalition values v(S): (S, N, C) or (S, N). They reduce over the background chunk by chunk, so
# (S, N, B, C) never exists whole.


class ShapleyMethod(str, Enum):
    AUTO = "auto"
    EXACT = "exact"
    PERMUTATION = "permutation"


@dataclass(frozen=True, slots=True)
class ShapleyResult:
    """Shapley values per sample and modality (shapes as :func:`fedmfs.core.shapley.exact_shapley`):
    ``phi`` (N,M,C) for "prob", (N,M) for "loglik"; ``stderr`` like phi for permutation sampling,
    None when exact; ``scores`` (M,) = :func:`fedmfs.core.shapley.modality_scores` of phi (0 for absent
    modalities); ``method`` the one used; ``coalitions`` the number of coalitions evaluated."""

    phi: np.ndarray
    stderr: np.ndarray | None
    scores: np.ndarray
    method: ShapleyMethod
    coalitions: int


def _full_coalitions(coalitions: np.ndarray, players: np.ndarray, m: int) -> np.ndarray:
    full = np.zeros((coalitions.shape[0], m), dtype=bool)
    full[:, players] = coalitions
    return full


def fusion_coalition_fn(
    fusion: FusionFn,
    x: np.ndarray,
    bg: np.ndarray,
    players: np.ndarray,
    mask: np.ndarray,
    kind: ValueKind = "prob",
    y: np.ndarray | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> CoalitionFn:
    """Coalition evaluation through a plain fusion function on materialised substituted rows."""
    n, m, c = x.shape
    b = bg.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    bg = np.ascontiguousarray(bg, dtype=np.float32)
    per = n * b * m * c
    step = max(1, chunk_elements // per)
    fmask = np.ascontiguousarray(np.broadcast_to(mask.astype(np.float32), (step * n * b, m)))

    def run(coalitions: np.ndarray) -> np.ndarray:
        full = _full_coalitions(coalitions, players, m)
        out = []
        for s0 in range(0, full.shape[0], step):
            sel = full[s0:s0 + step]
            s = sel.shape[0]
            z = np.where(sel[:, None, None, :, None], x[None, :, None], bg[None, None, :])
            p = fusion(z.reshape(s * n * b, m, c), fmask[:s * n * b])
            out.append(coalition_values_from_probs(np.asarray(p, dtype=np.float32).reshape(s, n, b, -1), kind, y))
        return np.concatenate(out)

    return run


def graph_coalition_fn(
    run_graph: Callable[[dict[str, np.ndarray]], np.ndarray],
    x: np.ndarray,
    bg: np.ndarray,
    players: np.ndarray,
    mask: np.ndarray,
    hidden: int,
    kind: ValueKind = "prob",
    y: np.ndarray | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> CoalitionFn:
    """Coalition evaluation through the coalition graph (``run_graph(feeds) -> coalition_probs``)."""
    n, m, c = x.shape
    b = bg.shape[0]
    feeds = {
        "x_probs": np.ascontiguousarray(x, dtype=np.float32),
        "bg_probs": np.ascontiguousarray(bg, dtype=np.float32),
        "mask": np.ascontiguousarray(mask, dtype=np.float32),
    }
    step = max(1, chunk_elements // (n * b * max(hidden, c)))

    def run(coalitions: np.ndarray) -> np.ndarray:
        full = _full_coalitions(coalitions, players, m).astype(np.float32)
        out = [coalition_values_from_probs(run_graph({**feeds, "coalitions": full[s0:s0 + step]}), kind, y)
               for s0 in range(0, full.shape[0], step)]
        return np.concatenate(out)

    return run


def coalition_values_from_probs(p: np.ndarray, kind: ValueKind, y: np.ndarray | None) -> np.ndarray:
    """Fusion outputs (S,N,B,C) -> v(S): (S,N,C) mean probabilities for "prob", (S,N) mean
    true-class log-likelihood for "loglik" (probabilities clipped at 1e-12, as the reference)."""
    if kind == "prob":
        return p.mean(axis=2)
    if y is None:
        raise DataError("the 'loglik' value function needs the true labels y")
    idx = np.broadcast_to(y[None, :, None, None], p.shape[:3] + (1,))
    pt = np.take_along_axis(p, idx, axis=3)[..., 0]
    return np.log(np.clip(pt, 1e-12, None)).mean(axis=2)


@lru_cache(maxsize=16)
def _weights(p: int) -> np.ndarray:
    w = shapley_matrix(p)
    w.setflags(write=False)
    return w


def exact_from_coalitions(evaluate: CoalitionFn, p: int) -> np.ndarray:
    """Exact Shapley values of the P players, (P, N[, C]), from all 2^P coalitions at once."""
    v = evaluate(coalition_masks(p))
    return np.tensordot(_weights(p), v, axes=(1, 0))


def engine_shapley(
    evaluate: CoalitionFn,
    players: np.ndarray,
    m: int,
    method: ShapleyMethod | str = ShapleyMethod.AUTO,
    permutations: int = 64,
    seed: int = 0,
) -> ShapleyResult:
    """Shapley values for ``players`` (indices among the ``m`` modalities) from a coalition evaluator.

    Modalities that are not players get phi = 0 (and stderr 0), as in the reference."""
    try:
        method = ShapleyMethod(method)
    except ValueError as e:
        raise ConfigError(f"unknown Shapley method {method!r}; use auto, exact or permutation") from e
    p = len(players)
    if p == 0:
        raise DataError("no modality is present: there is nothing to explain")
    if method is ShapleyMethod.AUTO:
        method = ShapleyMethod.EXACT if p <= EXACT_MAX else ShapleyMethod.PERMUTATION
    if method is ShapleyMethod.EXACT:
        if p > EXACT_MAX:
            raise ConfigError(f"exact Shapley over {p} modalities needs 2^{p} coalitions; "
                              f"use method='permutation' (exact is capped at {EXACT_MAX})")
        phi_p, se_p, count = exact_from_coalitions(evaluate, p), None, 2**p
    else:
        if permutations < 2:
            raise ConfigError(f"permutations must be >= 2 (one antithetic pair), got {permutations}")
        phi_p, se_p, count = permutation_from_coalitions(evaluate, p, permutations, seed)
    phi = np.zeros((m,) + phi_p.shape[1:])
    phi[players] = phi_p
    phi = np.moveaxis(phi, 0, 1)
    stderr = None
    if se_p is not None:
        se = np.zeros_like(phi_p, shape=(m,) + phi_p.shape[1:])
        se[players] = se_p
        stderr = np.moveaxis(se, 0, 1)
    return ShapleyResult(phi, stderr, modality_scores(phi), method, count)
