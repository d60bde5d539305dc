"""Modality-level Shapley values on the device: an :class:`~fedmfs.core.runtime.sessions.EdgeRuntime`'s
sessions turned into a coalition evaluator for :mod:`fedmfs.core.runtime.coalitions`.

:func:`runtime_shapley` runs each modality model once over the explained and once over the background
samples; :func:`shapley_from_probs` checks the probabilities, picks the coalition graph (fast path)
or the plain fusion graph (generic path) as the evaluator, and keeps the heap trimmed around the
batched coalition calls. ``EdgeRuntime.shapley`` and ``EdgeRuntime.shapley_from_probs`` delegate
here. This module is the runtime's own Shapley half: it takes the runtime as an argument and uses
its sessions directly (it never imports :mod:`fedmfs.core.runtime.sessions` at run time, so there
is no import cycle). numpy and onnxruntime only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fedmfs.core.errors import ConfigError, DataError, ManifestError
from fedmfs.core.runtime.coalitions import (
    ShapleyMethod,
    ShapleyResult,
    engine_shapley,
    fusion_coalition_fn,
    graph_coalition_fn,
    split_coalition_fn,
    tiled_coalition_fn,
)
from fedmfs.core.runtime.memory import FUSION_RSS_SLACK, release_free_heap, resident_bytes
from fedmfs.core.shapley import CoalitionFn, ValueKind

if TYPE_CHECKING:
    from fedmfs.core.runtime.sessions import EdgeRuntime

__all__ = ["runtime_shapley", "shapley_from_probs"]


def runtime_shapley(
    rt: EdgeRuntime,
    x: Mapping[str, np.ndarray],
    background_x: Mapping[str, np.ndarray],
    kind: str = "prob",
    y: np.ndarray | None = None,
    method: ShapleyMethod | str = "auto",
    permutations: int = 64,
    seed: int = 0,
) -> ShapleyResult:
    """Modality-level Shapley values of the explained samples ``x`` against ``background_x``.

    Each modality model runs once over the explained rows and once over the background rows
    (two calls rather than one on a concatenation: measured as fast, and it saves copying the
    inputs, 82 MB on ActionSense shapes; ``x`` may be a lazy mapping, see
    ``EdgeRuntime._run_modalities``); then the fusion model is evaluated for the coalitions in batched
    calls (see :mod:`fedmfs.core.runtime.coalitions`). ``x`` and ``background_x`` must hold the same
    modalities: the client's present ones are the players.
    """
    if isinstance(x, Mapping) and isinstance(background_x, Mapping) and set(x) != set(background_x):
        raise DataError(f"explained samples have modalities {sorted(x)}, the background "
                        f"{sorted(background_x)}; they must match")
    x_probs, mask = rt._run_modalities(x, "explained samples")
    bg_probs, _ = rt._run_modalities(background_x, "background samples")
    return shapley_from_probs(rt, x_probs, bg_probs, mask, kind, y, method, permutations, seed)


def shapley_from_probs(
    rt: EdgeRuntime,
    x_probs: np.ndarray,
    bg_probs: np.ndarray,
    mask: np.ndarray,
    kind: str = "prob",
    y: np.ndarray | None = None,
    method: ShapleyMethod | str = "auto",
    permutations: int = 64,
    seed: int = 0,
) -> ShapleyResult:
    """Shapley values from modality probabilities already computed: x (N,M,C), background
    (B,M,C), the client's mask (M,) bool. Same semantics as :func:`runtime_shapley`."""
    if not rt.has_fusion:
        raise ManifestError("Shapley values need a fusion model; this model set has none")
    m, c = len(rt.spec.modalities), rt.spec.num_classes
    x_probs = np.ascontiguousarray(x_probs, dtype=np.float32)
    bg_probs = np.ascontiguousarray(bg_probs, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    if x_probs.ndim != 3 or x_probs.shape[1:] != (m, c) or bg_probs.ndim != 3 or bg_probs.shape[1:] != (m, c):
        raise DataError(f"probabilities must have shape (N, {m}, {c}); got {x_probs.shape} and {bg_probs.shape}")
    if mask.shape != (m,):
        raise DataError(f"mask must have shape ({m},), got {mask.shape}")
    if x_probs.shape[0] == 0 or bg_probs.shape[0] == 0:
        raise DataError("need at least one explained and one background sample")
    if kind not in ("prob", "loglik"):
        raise ConfigError(f"unknown value function {kind!r}; use 'prob' or 'loglik'")
    value_kind: ValueKind = "prob" if kind == "prob" else "loglik"
    if kind == "loglik":
        if y is None:
            raise DataError("the 'loglik' value function needs the true labels y")
        y = np.asarray(y)
        if y.shape != (x_probs.shape[0],) or y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() >= c)):
            raise DataError(f"y must be ({x_probs.shape[0]},) integer labels in [0, {c}), got {y.dtype} {y.shape}")
        y = y.astype(np.int64)
    players = np.nonzero(mask)[0]
    release_free_heap()  # the modality windows are gone; start the fusion buffers from a trimmed heap
    if rt._coalitions is not None:
        sess = rt._coalitions

        base = resident_bytes()

        def trimmed(out: list[np.ndarray]) -> list[np.ndarray]:
            # the heap fragments over the chunk calls as in EdgeRuntime._modality_logp (from +3 to
            # +18 MB of peak RSS over the 22 calls on ActionSense shapes, varying from process to
            # process); a trim after every call cost +25 ms, so trim only once RSS has grown
            if base is not None and (resident_bytes() or 0) > base + FUSION_RSS_SLACK:
                release_free_heap()
            return out

        if rt._coalition_tiles:
            steady: list[int] = []

            def run_tiles(feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
                # the same rule, from the RSS after the first tile call: a tile call's buffers (a few
                # chunk_elements each) are the step's working set; trimming them away before every
                # call made each call fault them back in (measured 4x slower at M = 10)
                out = sess.run(names, feeds)
                rss = resident_bytes()
                if rss is not None and ("tile_pre" in feeds or "split_a" in feeds):
                    if not steady:
                        steady.append(rss)
                    elif rss > steady[0] + FUSION_RSS_SLACK:
                        release_free_heap()
                return out

            split = rt._coalition_split and rt.shapley_engine == "split"
            engine = split_coalition_fn if split else tiled_coalition_fn
            evaluate: CoalitionFn = engine(run_tiles, x_probs, bg_probs, players, mask, rt._coalition_hidden,
                                           value_kind, y, rt.chunk_elements)
        else:
            def run_graph(feeds: dict[str, np.ndarray]) -> np.ndarray:
                return trimmed(sess.run(["coalition_probs"], feeds))[0]

            evaluate = graph_coalition_fn(run_graph, x_probs, bg_probs, players, mask, rt._coalition_hidden,
                                          value_kind, y, rt.chunk_elements)
    else:
        evaluate = fusion_coalition_fn(rt.fuse, x_probs, bg_probs, players, mask, value_kind, y, rt.chunk_elements)
    try:
        result = engine_shapley(evaluate, players, m, method, permutations, seed)
    finally:
        rt.shrink_coalition_arena()
    release_free_heap()
    return result
