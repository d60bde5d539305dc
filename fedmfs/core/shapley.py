"""Modality-level Shapley values (numpy only; the reference that the ONNX engine must match).

Players are the modalities a client has. ``v(S)`` is the fusion model's output when the modalities in
``S`` take the explained sample's predictions and every other modality takes a background sample's
(interventional, as the paper's code does), averaged over the background. Two value functions:

* ``"prob"``: the class-probability vector (the paper's; ``phi`` has a class axis, scored as |phi|
  summed over samples and classes);
* ``"loglik"``: the mean log-likelihood of the true class (``phi`` per sample, scored as |phi| summed).

Exact enumeration of all 2^M coalitions for M <= ``EXACT_MAX``; beyond it, permutation sampling with
antithetic pairs and a standard error. Its error, measured against the exact values at M = 12
(``bench/shapley_scaling.py``, docs/benchmarks.md): the rms error falls as 1/sqrt(permutations)
(7.7e-7, 3.9e-7, 1.8e-7, 8.9e-8 at 8, 32, 128, 512 permutations, mean |phi| 6e-5) and the reported
standard error is calibrated (rms error / stderr 0.87-0.95, ~95 % of values within two stderr from
32 permutations on); its cost is the distinct coalitions the chains visit (84, 294, 917, 2329 of
4096 at M = 12). The sampling lives in ONE place,
:func:`permutation_from_coalitions`, which takes any coalition evaluator (:data:`CoalitionFn`): this
reference feeds it :func:`coalition_values`, the device's batched evaluators
(:mod:`fedmfs.core.runtime.coalitions`) feed it ONNX Runtime calls, so both draw the same
permutations and accumulate the same marginal contributions for a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from math import factorial
from typing import Literal

import numpy as np

__all__ = [
    "EXACT_MAX",
    "CoalitionFn",
    "FusionFn",
    "ValueKind",
    "coalition_masks",
    "coalition_values",
    "exact_shapley",
    "modality_scores",
    "modality_gains",
    "permutation_from_coalitions",
    "permutation_shapley",
    "shapley_from_coalition_values",
    "shapley_matrix",
]

EXACT_MAX = 12
ValueKind = Literal["prob", "loglik"]
# fusion(probs (n, M, C) float32, mask (n, M) float32) -> class probabilities (n, C)
FusionFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
# coalitions (S, P) bool over the players -> coalition values v(S): (S, N, C) or (S, N)
CoalitionFn = Callable[[np.ndarray], np.ndarray]


def coalition_masks(m: int) -> np.ndarray:
    """All 2^m coalitions as a (2^m, m) bool matrix; row ``s`` has bit ``j`` of ``s`` in column ``j``."""
    s = np.arange(2**m)[:, None]
    return ((s >> np.arange(m)[None, :]) & 1).astype(bool)


def shapley_matrix(m: int) -> np.ndarray:
    """The (m, 2^m) matrix W with ``phi = W @ v`` for coalition values ``v`` indexed by bitmask."""
    masks = coalition_masks(m)
    size = masks.sum(1)
    w = np.zeros((m, 2**m))
    fac = [factorial(k) for k in range(m + 1)]
    for j in range(m):
        without = np.nonzero(~masks[:, j])[0]
        wt = np.array([fac[size[s]] * fac[m - size[s] - 1] / fac[m] for s in without])
        w[j, without | (1 << j)] += wt
        w[j, without] -= wt
    return w


def shapley_from_coalition_values(v: np.ndarray) -> np.ndarray:
    """Shapley values from the values of all 2^m coalitions (axis 0); returns (m, *v.shape[1:])."""
    m = int(np.log2(v.shape[0]))
    if 2**m != v.shape[0]:
        raise ValueError(f"need 2^m coalition values, got {v.shape[0]}")
    return np.tensordot(shapley_matrix(m), v, axes=(1, 0))


def _value(out: np.ndarray, kind: ValueKind, y: np.ndarray | None) -> np.ndarray:
    """Map fusion outputs (n_x, n_bg, C) to values averaged over the background."""
    if kind == "prob":
        return out.mean(axis=1)
    if y is None:
        raise ValueError("the 'loglik' value function needs the true labels y")
    p = out[np.arange(out.shape[0]), :, y]  # (n_x, n_bg)
    return np.log(np.clip(p, 1e-12, None)).mean(axis=1)


def coalition_values(
    fusion: FusionFn,
    x: np.ndarray,
    background: np.ndarray,
    players: np.ndarray,
    mask: np.ndarray,
    kind: ValueKind = "prob",
    y: np.ndarray | None = None,
    coalitions: np.ndarray | None = None,
) -> np.ndarray:
    """v(S) for the given coalitions over ``players`` (indices into the modality axis).

    ``x`` (N, M, C) and ``background`` (B, M, C) are the modality models' probability outputs;
    ``mask`` (M,) marks the modalities the client has. Returns (n_coalitions, N, C) for "prob",
    (n_coalitions, N) for "loglik".
    """
    n, m_all, c = x.shape
    b = background.shape[0]
    if coalitions is None:
        coalitions = coalition_masks(len(players))
    fmask = np.broadcast_to(mask.astype(np.float32), (n * b, m_all))
    out = []
    for row in coalitions:
        z = np.broadcast_to(background[None], (n, b, m_all, c)).copy()
        on = players[row]
        z[:, :, on, :] = x[:, None, on, :]
        p = fusion(z.reshape(n * b, m_all, c), fmask).reshape(n, b, -1)
        out.append(_value(p, kind, y))
    return np.stack(out)


def exact_shapley(
    fusion: FusionFn,
    x: np.ndarray,
    background: np.ndarray,
    mask: np.ndarray,
    kind: ValueKind = "prob",
    y: np.ndarray | None = None,
) -> np.ndarray:
    """Exact Shapley values per sample and modality: (N, M, C) for "prob", (N, M) for "loglik".

    Modalities outside ``mask`` are not players and get 0.
    """
    players = np.nonzero(mask)[0]
    if len(players) > EXACT_MAX:
        raise ValueError(f"exact Shapley over {len(players)} modalities is too costly; use permutation_shapley")
    v = coalition_values(fusion, x, background, players, mask, kind, y)
    phi_players = shapley_from_coalition_values(v)  # (P, N[, C])
    out = np.zeros((x.shape[1],) + v.shape[1:])
    out[players] = phi_players
    return np.moveaxis(out, 0, 1)


def permutation_from_coalitions(
    evaluate: CoalitionFn, p: int, permutations: int, seed: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Antithetic permutation sampling over ``p`` players: (phi, stderr, coalitions evaluated), phi
    (P, N[, C]). Each antithetic pair (a permutation and its reverse) is one draw.

    ``evaluate`` maps coalition rows (S, P) bool to their values (S, N[, C]); it is called once, with
    every coalition any chain visits (sorted by bitmask), so a batched evaluator needs few calls."""
    rng = np.random.default_rng(seed)
    pairs = max(1, permutations // 2)
    perms = [rng.permutation(p) for _ in range(pairs)]
    needed = {0}
    for perm in perms:
        for order in (perm, perm[::-1]):
            bits = 0
            for j in order:
                bits |= 1 << int(j)
                needed.add(bits)
    keys = np.array(sorted(needed), dtype=np.int64)
    rows = ((keys[:, None] >> np.arange(p)[None, :]) & 1).astype(bool)
    values = evaluate(rows)
    pos = {int(k): i for i, k in enumerate(keys)}
    draws = []
    for perm in perms:
        est = np.zeros((p,) + values.shape[1:])
        for order in (perm, perm[::-1]):
            bits = 0
            prev = values[pos[0]]
            for j in order:
                bits |= 1 << int(j)
                cur = values[pos[bits]]
                est[j] += (cur - prev) / 2.0
                prev = cur
        draws.append(est)
    d = np.stack(draws)
    mean = d.mean(0)
    se = d.std(0, ddof=1) / np.sqrt(len(draws)) if len(draws) > 1 else np.full_like(mean, np.inf)
    return mean, se, len(keys)


def permutation_shapley(
    fusion: FusionFn,
    x: np.ndarray,
    background: np.ndarray,
    mask: np.ndarray,
    kind: ValueKind = "prob",
    y: np.ndarray | None = None,
    permutations: int = 64,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Permutation-sampling estimate with antithetic pairs; returns (phi, standard error), same shapes
    as :func:`exact_shapley`: :func:`permutation_from_coalitions` with :func:`coalition_values` as
    the evaluator. Modalities outside ``mask`` are not players and get 0 (and stderr 0)."""
    players = np.nonzero(mask)[0]

    def evaluate(coalitions: np.ndarray) -> np.ndarray:
        return coalition_values(fusion, x, background, players, mask, kind, y, coalitions)

    mean, se, _ = permutation_from_coalitions(evaluate, len(players), permutations, seed)
    out = np.zeros((x.shape[1],) + mean.shape[1:])
    err = np.zeros_like(out)
    out[players], err[players] = mean, se
    return np.moveaxis(out, 0, 1), np.moveaxis(err, 0, 1)


def modality_scores(phi: np.ndarray) -> np.ndarray:
    """One impact score per modality: |phi| summed over samples (and classes), as the paper does."""
    a = np.abs(phi)
    return a.sum(axis=tuple(i for i in range(a.ndim) if i != 1))


def modality_gains(phi: np.ndarray, lower_bound: bool = False) -> np.ndarray:
    """One signed score per modality from "loglik" Shapley values (N, M): the mean contribution to the
    true class's log-likelihood. A modality that helps scores above 0; one whose contribution is large
    but harmful (noise the fusion trusts) scores below 0, where :func:`modality_scores` would count it.

    ``lower_bound``: the mean minus two standard errors over the samples, so that a modality counts only
    as far as its help is sure: a pure-noise modality the fusion leans on has a mean near 0 and a
    large spread (it helps some windows by chance and hurts others), and lands below 0."""
    if phi.ndim != 2:
        raise ValueError(f"gains need per-sample log-likelihood values (N, M), got shape {phi.shape}")
    mean = phi.mean(axis=0)
    if not lower_bound or len(phi) < 2:
        return mean
    return mean - 2.0 * phi.std(axis=0, ddof=1) / np.sqrt(len(phi))
