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
* :func:`graph_coalition_fn` -- calls the coalition role of the coalition graph of
  :func:`fedmfs.core.runtime.graphs.fusion_coalition_onnx`, which exploits the fusion model's affine first
  layer (the engine of model sets built before issue 16, and of graphs built with ``tiles=False``);
* :func:`split_coalition_fn` (:class:`SplitCoalitions`) -- for graphs with the split role, when asked
  for (``EdgeRuntime(shapley_engine="split")``): hidden units always on or off over a coalition's rows
  become an affine part, only the mixed ones go through the ReLU and the second layer (dense groups
  take the tile role). Faster only when few units are mixed (near-uniform modality outputs); 4x slower
  than tiled on trained models' sharp outputs (docs/benchmarks.md), so not the default;
* :func:`tiled_coalition_fn` (:class:`TiledCoalitions`) -- the default for graphs with terms and tile
  roles (with or without the split role):
  for exact values the players split in two halves, so a coalition's first-layer
  pre-activation is one add of two precomputed tables, and phi is reduced block by block. At
  M = 12 on ActionSense shapes it is ~1.6x to 2x faster than the coalition role (docs/benchmarks.md).

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
    "SplitCoalitions",
    "TiledCoalitions",
    "coalition_values_from_probs",
    "engine_shapley",
    "exact_from_coalitions",
    "fusion_coalition_fn",
    "graph_coalition_fn",
    "split_coalition_fn",
    "tiled_coalition_fn",
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


# a tile's softmax denominators (sums of unshifted exp(logits) over the classes) must lie in
# [SUMS_MIN, inf): below, the largest logit of a row is under about -69 and exp would lose precision in
# the subnormal range; above, it overflowed. Such a tile is redone from its logits, shifted by the row
# maximum (the reference's way). Shifting every row instead would cost a pass over the logits.
SUMS_MIN = 1e-30

# run(feeds, output names) -> outputs: one call of the coalition graph (graphs.fusion_coalition_onnx)
TileRunner = Callable[[dict[str, np.ndarray], list[str]], list[np.ndarray]]


class TiledCoalitions:
    """Coalition values through the coalition graph's terms and tile roles
    (:func:`fedmfs.core.runtime.graphs.fusion_coalition_onnx`): a :data:`CoalitionFn`, and for exact
    Shapley values :meth:`exact_phi`, which never holds all 2^P coalition values.

    How: the fusion model's first layer is affine, so the pre-activation of a coalition S on the row
    (explained sample n, background sample b) is ``const + sum_{j in S} x_term[j, n] + sum_{j not in S}
    bg_term[j, b]``. One call of the terms role gives these terms (float64). For all 2^P coalitions,
    the players split into a low half P1 and a high half P2 (S = S1 + S2), and so does that sum:
    ``U1[S1, n, b] + U2[S2, n, b]``, two tables of 2^|P1| and 2^|P2| entries summed in float64 and
    rounded to float32 once. A tile call then takes ``U2`` for a group of S2 and ``U1[S1]`` and does
    the rest in ONNX Runtime: one broadcast add (the only float32 rounding of the pre-activation,
    as in the fusion model's own first layer), ReLU, the H->C layer, exp and the reductions over the
    classes and the background rows. Only (coalition, explained sample) values come back.

    Memory: a call holds at most ``chunk_elements`` float32 pre-activations (``tile_pre``, and ONNX
    Runtime's few buffers of that size); the two tables of a tile hold at most twice that; the values
    of one block of explained samples, 2^P x K x C float64, are reduced to phi before the next block.
    """

    def __init__(self, run: TileRunner, x: np.ndarray, bg: np.ndarray, players: np.ndarray, mask: np.ndarray,
                 hidden: int, kind: ValueKind = "prob", y: np.ndarray | None = None,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        if kind == "loglik" and y is None:
            raise DataError("the 'loglik' value function needs the true labels y")
        self.run, self.kind, self.hidden = run, kind, hidden
        self.n, self.b, self.c = x.shape[0], bg.shape[0], x.shape[2]
        self.players = np.asarray(players)
        self.budget = max(1, int(chunk_elements))
        xt, bt, const = run({"x_probs": np.ascontiguousarray(x, dtype=np.float32),
                             "bg_probs": np.ascontiguousarray(bg, dtype=np.float32),
                             "mask": np.ascontiguousarray(mask, dtype=np.float32)},
                            ["x_terms", "bg_terms", "const_term"])
        # non-players are absent (mask 0): their terms are zero, so only the players' are kept
        self.xt, self.bt = xt[self.players], bt[self.players]     # (P,N,H), (P,B,H) float64
        self.const = const
        self.onehot = None
        if kind == "loglik":
            assert y is not None
            self.onehot = np.zeros((self.n, self.c, 1), np.float32)
            self.onehot[np.arange(self.n), np.asarray(y), 0] = 1.0
            self.y = np.asarray(y)

    # -- the tile: G coalitions x K explained x B' background rows
    def _tile(self, pre: np.ndarray, shared: np.ndarray, n0: int) -> np.ndarray:
        """Per-coalition sums over the tile's background rows: (G,K,C) probabilities or (G,K)
        clipped true-class log-probabilities."""
        k = pre.shape[1]
        feeds = {"tile_pre": pre, "tile_shared": shared}
        if self.kind == "prob":
            out, sums = self.run(feeds, ["tile_prob", "tile_sums"])
            value = out[:, :, 0]
        else:
            assert self.onehot is not None
            feeds["tile_onehot"] = self.onehot[n0:n0 + k]
            out, sums = self.run(feeds, ["tile_loglik", "tile_sums"])
            value = out[:, :, 0]
        if not (np.isfinite(sums).all() and sums.min() >= SUMS_MIN):
            value = self._stable(self.run(feeds, ["tile_logits"])[0], n0)
        return value

    def _stable(self, logits: np.ndarray, n0: int) -> np.ndarray:
        """The tile's values from its logits (G,K,B',C), shifted by each row's maximum."""
        z = logits - logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=-1))
        if self.kind == "prob":
            return np.exp(z - lse[..., None]).sum(axis=2)
        yk = self.y[n0:n0 + logits.shape[1]]
        zt = np.take_along_axis(z, np.broadcast_to(yk[None, :, None, None], z.shape[:3] + (1,)), axis=3)[..., 0]
        return np.maximum(zt - lse, np.log(np.float32(1e-12))).sum(axis=2)

    def _blocks(self, groups: int) -> tuple[int, int, int]:
        """(background rows B', explained rows K, coalitions G) per call within the budget."""
        h = self.hidden
        bb = min(self.b, max(1, self.budget // (h * groups)))
        k = min(self.n, max(1, self.budget // (h * groups * bb)))
        g = min(groups, max(1, self.budget // (h * k * bb)))
        return bb, k, g

    def _shape(self) -> tuple[int, ...]:
        return (self.c,) if self.kind == "prob" else ()

    def _dense(self, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Values of coalitions through the tile role (every hidden unit), summed over the background:
        ``a`` (S,N,H) their explained samples' first-layer terms, ``c`` (S,B,H) the background's."""
        s = a.shape[0]
        bb, k, g = self._blocks(s)
        out = np.zeros((s, self.n) + self._shape())
        shared = np.zeros((k, bb, self.hidden), np.float32)
        for n0 in range(0, self.n, k):
            n1 = min(self.n, n0 + k)
            for b0 in range(0, self.b, bb):
                b1 = min(self.b, b0 + bb)
                for s0 in range(0, s, g):
                    pre = np.add(a[s0:s0 + g, n0:n1, None, :], c[s0:s0 + g, None, b0:b1, :], dtype=np.float32)
                    out[s0:s0 + g, n0:n1] += self._tile(pre, shared[:n1 - n0, :b1 - b0], n0)
        return out

    # -- any coalitions (permutation sampling)
    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        coal = np.asarray(coalitions, dtype=np.float64)
        a = np.tensordot(coal, self.xt, 1)                          # (S,N,H)
        bc = np.tensordot(1.0 - coal, self.bt, 1) + self.const     # (S,B,H)
        return self._dense(a, bc) / self.b

    # -- all coalitions, reduced to Shapley values on the fly
    def exact_phi(self, weights: np.ndarray) -> np.ndarray:
        """Exact Shapley values (P, N[, C]) = ``weights`` (P, 2^P) applied to all coalition values,
        coalition s = bitmask over the players (bit j: player j)."""
        p = len(self.players)
        p1 = p // 2
        g1, g2 = 1 << p1, 1 << (p - p1)
        m1, m2 = coalition_masks(p1).astype(np.float64), coalition_masks(p - p1).astype(np.float64)
        x1, x2 = np.tensordot(m1, self.xt[:p1], 1), np.tensordot(m2, self.xt[p1:], 1)          # (g,N,H)
        b1_ = np.tensordot(1.0 - m1, self.bt[:p1], 1) + self.const
        b2_ = np.tensordot(1.0 - m2, self.bt[p1:], 1)                                           # (g,B,H)
        bb, k, g = self._blocks(g2)
        h = self.hidden
        phi = np.zeros((p, self.n) + self._shape())
        u1 = np.empty((g1, k, bb, h), np.float32)
        u2 = np.empty((g2, k, bb, h), np.float32)
        for n0 in range(0, self.n, k):
            n1 = min(self.n, n0 + k)
            kk = n1 - n0
            v = np.zeros((g2, g1, kk) + self._shape())   # coalition s1 + s2 * g1 = row s2, column s1
            for b0 in range(0, self.b, bb):
                b1 = min(self.b, b0 + bb)
                t1, t2 = u1[:, :kk, :b1 - b0], u2[:, :kk, :b1 - b0]
                # float64 sums rounded to float32 once
                np.add(x1[:, n0:n1, None, :], b1_[:, None, b0:b1, :], out=t1, casting="same_kind")
                np.add(x2[:, n0:n1, None, :], b2_[:, None, b0:b1, :], out=t2, casting="same_kind")
                if not (t1.flags.c_contiguous and t2.flags.c_contiguous):
                    t1, t2 = np.ascontiguousarray(t1), np.ascontiguousarray(t2)
                for s1 in range(g1):
                    for s0 in range(0, g2, g):
                        v[s0:s0 + g, s1] += self._tile(t2[s0:s0 + g], t1[s1], n0)
            phi[:, n0:n1] = np.tensordot(weights, v.reshape((g1 * g2,) + v.shape[2:]), axes=(1, 0)) / self.b
        return phi


# a group of coalitions takes the split role while its largest count of mixed hidden units (ReLU
# neither always on nor always off over the rows) is at most this share of the hidden width; above it
# the group goes through the dense tile role (at J = H the split role's (G,C,J)@(G,J,K*B) product and
# the (G,J,K,B) ReLU cost ~185 us per coalition of 50 x 50 rows, the tile role ~155 us)
SPLIT_MAX_MIXED = 0.5


class SplitCoalitions(TiledCoalitions):
    """Coalition values through the coalition graph's split role (and its tile role where the split
    does not pay): a :data:`CoalitionFn` with :meth:`exact_phi`, like :class:`TiledCoalitions`.

    How: for coalition S the first-layer pre-activation of hidden unit h on the row (explained n,
    background b) is ``a_S[n, h] + c_S[b, h]`` (the terms role's float64 terms summed over S and over
    its complement). Over all the rows, ``min_n a + min_b c > 0`` makes the unit's ReLU the identity
    ("on") and ``max_n a + max_b c <= 0`` makes it zero ("off"); both are decided exactly in float64.
    The on units' share of the logits is affine, ``W2_on a_S[n] + W2_on c_S[b]``: two small (C,)
    vectors per explained and per background sample, computed in numpy (float64, then shifted by
    their maxima over the classes, which leaves every softmax unchanged and keeps the float32 sums
    small), instead of H x C multiply-adds per row. Only the J "mixed" units go through the ReLU
    and a (C,J) product per row, in ONNX Runtime, with the broadcast add of the two vectors, exp,
    the class sums and the reduction over the background rows. How many units are mixed depends on
    the data: how far the modality outputs move the pre-activations against their offset (on the
    benchmark's random weights 3-8 % at M = 10-12; with sharp modality outputs most). A group whose
    J exceeds ``SPLIT_MAX_MIXED`` x H goes through the tile role instead, so the worst case is the
    tiled engine's. Values are accumulated into phi group by group (phi += W[:, group] @ v(group)),
    so no more than one group's values exist at a time.

    Memory: a call holds at most ``chunk_elements`` float32 elements per (G,C,K,B') or (G,J,K,B')
    tensor (ONNX Runtime's few buffers of that size), the numpy side a group's (G,N,H) and (G,B,H)
    float64 terms.
    """

    def __init__(self, run: TileRunner, x: np.ndarray, bg: np.ndarray, players: np.ndarray, mask: np.ndarray,
                 hidden: int, kind: ValueKind = "prob", y: np.ndarray | None = None,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        super().__init__(run, x, bg, players, mask, hidden, kind, y, chunk_elements)
        w2t, b2 = run({}, ["out_weight", "out_bias"])
        self.w2t = np.asarray(w2t, np.float64)                 # (H,C)
        self.b2 = np.asarray(b2, np.float64)
        self.jmax = max(1, int(SPLIT_MAX_MIXED * hidden))
        width = max(self.c, self.jmax)
        self.bb = min(self.b, max(1, self.budget // width))
        self.k = min(self.n, max(1, self.budget // (width * self.bb)))
        self.g = max(1, self.budget // (width * self.k * self.bb))
        # coalitions whose numpy side is done at once: their (S,N,H) and (S,B,H) float64 terms, sized
        # to stay in a 2 MB L2 cache (at 4x that every numpy pass over them took twice as long)
        self.batch = max(self.g, self.budget // (4 * max(self.n, self.b) * hidden))
        self.split_onehot = None
        if kind == "loglik":
            self.split_onehot = np.zeros((1, self.c, self.n, 1), np.float32)
            self.split_onehot[0, self.y, np.arange(self.n), 0] = 1.0
        self.mode = np.array([kind == "prob"])
        self.dense_groups = self.split_groups = 0      # how the groups went (the benchmark prints them)
        self.mixed_units = 0

    def _group(self, coal: np.ndarray) -> np.ndarray:
        """Values (S, N[, C]) of the coalitions ``coal`` (S,P) float64, summed over the background.
        The numpy work is done for all S at once (the caller bounds S); ONNX Runtime is called for
        groups of ``self.g`` coalitions, sorted by their count of mixed units so that a group's
        zero-padding is small."""
        s = coal.shape[0]
        a = np.tensordot(coal, self.xt, 1)                          # (S,N,H)
        c = np.tensordot(1.0 - coal, self.bt, 1) + self.const     # (S,B,H)
        on = a.min(axis=1) + c.min(axis=1) > 0
        mixed = ~on & (a.max(axis=1) + c.max(axis=1) > 0)
        counts = mixed.sum(axis=1)
        out = np.zeros((s, self.n) + self._shape())
        dense = np.nonzero(counts > self.jmax)[0]
        if dense.size:
            self.dense_groups += 1
            out[dense] = self._dense(a[dense], c[dense])
        sparse = np.nonzero(counts <= self.jmax)[0]
        if not sparse.size:
            return out
        self.split_groups += 1
        self.mixed_units += int(counts[sparse].sum())
        h, cc = self.hidden, self.c
        # the always-on units' affine share of the logits, per explained and per background sample
        won = on[:, None, :]
        la = ((a * won).reshape(-1, h) @ self.w2t).reshape(s, self.n, cc)
        lc = ((c * won).reshape(-1, h) @ self.w2t).reshape(s, self.b, cc) + self.b2
        # per-row constants cancel in every softmax: keep the float32 logits near 0
        la -= la.max(axis=2, keepdims=True)
        lc -= lc.max(axis=2, keepdims=True)
        jall = max(1, int(counts[sparse].max()))
        idx = np.argsort(~mixed, axis=1, kind="stable")[:, :jall]           # the mixed units first
        valid = np.take_along_axis(mixed, idx, axis=1)
        aj = np.take_along_axis(a, idx[:, None, :], axis=2)                  # (S,N,J)
        cj = np.take_along_axis(c, idx[:, None, :], axis=2)                  # (S,B,J)
        wj = np.where(valid[:, None, :], self.w2t.T[:, idx].transpose(1, 0, 2), 0.0)   # (S,C,J)
        # the ORT groups in order of their count of mixed units: little zero-padding
        sparse = sparse[np.argsort(counts[sparse], kind="stable")]
        counts = counts[sparse]
        la32 = np.ascontiguousarray(la[sparse].transpose(0, 2, 1), np.float32)    # (S',C,N)
        lc32 = np.ascontiguousarray(lc[sparse].transpose(0, 2, 1), np.float32)    # (S',C,B)
        aj = np.ascontiguousarray(aj[sparse].transpose(0, 2, 1), np.float32)      # (S',J,N)
        cj = np.ascontiguousarray(cj[sparse].transpose(0, 2, 1), np.float32)      # (S',J,B)
        wj = np.ascontiguousarray(wj[sparse], np.float32)                         # (S',C,J)
        vals = np.zeros((len(sparse), self.n) + self._shape())
        for s0 in range(0, len(sparse), self.g):
            s1 = min(len(sparse), s0 + self.g)
            j = max(1, int(counts[s1 - 1]))
            for n0 in range(0, self.n, self.k):
                n1 = min(self.n, n0 + self.k)
                for b0 in range(0, self.b, self.bb):
                    b1 = min(self.b, b0 + self.bb)
                    feeds = {"split_a": aj[s0:s1, :j, n0:n1, None], "split_c": cj[s0:s1, :j, None, b0:b1],
                             "split_w": wj[s0:s1, :, :j], "split_la": la32[s0:s1, :, n0:n1, None],
                             "split_lc": lc32[s0:s1, :, None, b0:b1], "split_prob_mode": self.mode}
                    if self.split_onehot is not None:
                        feeds["split_onehot"] = self.split_onehot[:, :, n0:n1]
                    feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
                    value, sums = self.run(feeds, ["split_value", "split_sums"])
                    if not (np.isfinite(sums).all() and sums.min() >= SUMS_MIN):
                        logits = self.run(feeds, ["split_logits"])[0]             # (G,C,K,B')
                        vals[s0:s1, n0:n1] += self._stable(logits.transpose(0, 2, 3, 1), n0)
                    elif self.kind == "prob":
                        vals[s0:s1, n0:n1] += value.transpose(0, 2, 1)             # (G,C,K) -> (G,K,C)
                    else:
                        vals[s0:s1, n0:n1] += value
        out[sparse] = vals
        return out

    def __call__(self, coalitions: np.ndarray) -> np.ndarray:
        coal = np.asarray(coalitions, dtype=np.float64)
        out = [self._group(coal[s0:s0 + self.batch]) for s0 in range(0, coal.shape[0], self.batch)]
        return np.concatenate(out) / self.b

    def exact_phi(self, weights: np.ndarray) -> np.ndarray:
        p = len(self.players)
        masks = coalition_masks(p).astype(np.float64)
        phi = np.zeros((p, self.n) + self._shape())
        for s0 in range(0, masks.shape[0], self.batch):
            v = self._group(masks[s0:s0 + self.batch])
            phi += np.tensordot(weights[:, s0:s0 + self.batch], v, axes=(1, 0))
        return phi / self.b


def tiled_coalition_fn(
    run: TileRunner,
    x: np.ndarray,
    bg: np.ndarray,
    players: np.ndarray,
    mask: np.ndarray,
    hidden: int,
    kind: ValueKind = "prob",
    y: np.ndarray | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> TiledCoalitions:
    """Coalition evaluation through the coalition graph's terms and tile roles (see
    :class:`TiledCoalitions`)."""
    return TiledCoalitions(run, x, bg, players, mask, hidden, kind, y, chunk_elements)


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
        exact_phi = getattr(evaluate, "exact_phi", None)
        phi_p = exact_phi(_weights(p)) if exact_phi is not None else exact_from_coalitions(evaluate, p)
        se_p, count = None, 2**p
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


def split_coalition_fn(
    run: TileRunner,
    x: np.ndarray,
    bg: np.ndarray,
    players: np.ndarray,
    mask: np.ndarray,
    hidden: int,
    kind: ValueKind = "prob",
    y: np.ndarray | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> SplitCoalitions:
    """Coalition evaluation through the coalition graph's split role (see :class:`SplitCoalitions`)."""
    return SplitCoalitions(run, x, bg, players, mask, hidden, kind, y, chunk_elements)
