"""Benchmark: exact Shapley at M = 6, 8, 10, 12 modalities against one forward pass (issue 16 point 4).

ActionSense shapes (100 steps, 20 classes, modality hidden 64, fusion hidden 64, random weights),
the six ActionSense modalities and, beyond six, the small ones (eye, emg_left, emg_right, xsens)
repeated to reach M; 50 explained + 50 background samples; ONE thread (ORT intra-op 1, OpenBLAS 1).

* one forward pass: every modality model once on the 100 rows (one call each) + the fusion model on
  the 100 rows;
* exact Shapley, total: ``EdgeRuntime.shapley`` (modality models on the 50 + 50 rows, then the
  fusion over all 2^M coalitions), with the tiled engine (the coalition graph's terms and tile
  roles, the default) and with the old path (the plain coalition graph, ``tiles=False``), in the
  same run; each vs the numpy reference ``fedmfs.core.shapley.exact_shapley`` (fusion in ORT).

Times are minima over repeats (a shared 2-core machine). Then, at M = 12, the permutation
estimator against the exact values: its error and its reported standard error, and its cost.

    python bench/shapley_scaling.py             # ~2 minutes
    python bench/shapley_scaling.py --quick     # M = 6 and 10 only, fewer repeats
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import time

import numpy as np
import torch

torch.set_num_threads(1)

from fedmfs.core import shapley as ref
from fedmfs.core.modality import ACTIONSENSE_MODALITIES, DatasetSpec, ModalitySpec
from fedmfs.core.runtime.graphs import fusion_coalition_onnx, model_set_onnx
from fedmfs.core.runtime.sessions import EdgeRuntime
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy

N, B, C, T, H = 50, 50, 20, 100, 64
SMALL = tuple(m for m in ACTIONSENSE_MODALITIES if m.name in ("eye", "emg_left", "emg_right", "xsens"))


def spec_for(m: int) -> DatasetSpec:
    mods = list(ACTIONSENSE_MODALITIES)
    while len(mods) < m:
        k = len(mods) - len(ACTIONSENSE_MODALITIES)
        s = SMALL[k % len(SMALL)]
        mods.append(ModalitySpec(f"{s.name}_{k // len(SMALL) + 2}", s.feature_shape, s.hidden))
    return DatasetSpec(tuple(mods[:m]), C, T)


def best(f, repeats: int, warm: bool = True) -> float:
    if warm:
        f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def setup(m: int):
    spec = spec_for(m)
    torch.manual_seed(0)
    mods = {ms.name: state_to_numpy(ModalityModel(ms, C).eval()) for ms in spec.modalities}
    fus = FusionModel(m, C, H).eval()
    for p in fus.parameters():
        p.data.mul_(3.0)  # sharper than at init, as bench/onnx_shapley.py
    fstate = state_to_numpy(fus)
    models, fusion, tiles = model_set_onnx(spec, mods, fstate, H)
    new = EdgeRuntime(spec, models, fusion, threads=1, coalition_model=tiles)
    old = EdgeRuntime(spec, models, fusion, threads=1,
                      coalition_model=fusion_coalition_onnx(m, C, H, fstate, tiles=False))
    rng = np.random.default_rng(1)
    x = {ms.name: rng.standard_normal((N, T, *ms.feature_shape), dtype=np.float32) for ms in spec.modalities}
    bg = {ms.name: rng.standard_normal((B, T, *ms.feature_shape), dtype=np.float32) for ms in spec.modalities}
    return spec, new, old, x, bg


def measure(m: int, reps: int):
    """One row of the table: forward, new and old exact Shapley, their diffs to the reference."""
    spec, new, old, x, bg = setup(m)
    both = {k: np.concatenate([x[k], bg[k]]) for k in x}
    ones = np.ones(m, np.float32)

    def forward():
        probs = np.zeros((N + B, m, C), np.float32)
        for j, ms in enumerate(spec.modalities):
            probs[:, j] = np.exp(new._sessions[ms.name].run([ms.onnx_output], {ms.onnx_input: both[ms.name]})[0])
        new.fuse(probs, ones)

    px, mask = new.modality_probs(x)
    pb, _ = new.modality_probs(bg)
    t_fwd, t_new, t_old, t_fus = (float("inf"),) * 4
    old_reps = 1 if m >= 12 else reps
    for _ in range(2):  # interleaved rounds: a burst of load from other jobs hits both alike
        t_fwd = min(t_fwd, best(forward, reps))
        t_new = min(t_new, best(lambda: new.shapley(x, bg), reps))
        t_fus = min(t_fus, best(lambda: new.shapley_from_probs(px, pb, mask), reps))
        t_old = min(t_old, best(lambda: old.shapley(x, bg), old_reps, warm=m < 12))
    want = ref.exact_shapley(new.fuse, px, pb, mask)
    d_new = np.abs(new.shapley(x, bg).phi - want).max()
    d_old = np.abs(old.shapley(x, bg).phi - want).max()
    print(f"{m:>3} {t_fwd * 1e3:7.1f}ms {t_new * 1e3:8.1f}ms {t_new / t_fwd:5.2f}x {t_fus * 1e3:7.1f}ms "
          f"{t_old * 1e3:8.1f}ms {t_old / t_fwd:5.2f}x {t_new / t_old:7.3f}x {d_new:9.1e} {d_old:9.1e}", flush=True)
    return m, new, px, pb, mask, want


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sizes = (6, 10) if args.quick else (6, 8, 10, 12)
    reps = 2 if args.quick else 3
    print(f"N = {N} explained + B = {B} background, C = {C}, fusion hidden {H}, one thread; times: min over repeats")
    print(f"{'M':>3} {'forward':>9} {'new total':>10} {'ratio':>6} {'(fusion)':>9} {'old total':>10} {'ratio':>6}"
          f" {'new/old':>8} {'diff new':>9} {'diff old':>9}")
    keep = None
    for m in sizes:
        keep = measure(m, reps)

    # the permutation estimator against the exact values at the largest M
    m, rt, px, pb, mask, exact = keep
    print(f"\npermutation sampling at M = {m} (antithetic pairs), 'prob' value, 10 seeds each:")
    print(f"{'perms':>6} {'coalitions':>10} {'time':>8} {'rms err':>9} {'max err':>9} {'mean se':>9}"
          f" {'rms/se':>7} {'|err|<=2se':>10} {'score rel err':>13}")
    scale = np.abs(exact).mean()
    s_exact = ref.modality_scores(exact)
    for perms in (8, 32, 128, 512):
        errs, ses, tt, counts, serr = [], [], [], [], []
        for seed in range(10):
            t = time.perf_counter()
            res = rt.shapley_from_probs(px, pb, mask, method="permutation", permutations=perms, seed=seed)
            tt.append(time.perf_counter() - t)
            errs.append(res.phi - exact)
            ses.append(res.stderr)
            counts.append(res.coalitions)
            serr.append(np.abs(res.scores - s_exact).max() / s_exact.max())
        e, s = np.stack(errs), np.stack(ses)
        rms = float(np.sqrt((e ** 2).mean()))
        print(f"{perms:>6} {int(np.mean(counts)):>10} {np.median(tt) * 1e3:6.0f}ms {rms:9.2e} {np.abs(e).max():9.2e}"
              f" {s.mean():9.2e} {rms / np.sqrt((s ** 2).mean()):7.2f} {np.mean(np.abs(e) <= 2 * s + 1e-12):10.3f}"
              f" {np.mean(serr):13.3f}")
    print(f"(mean |phi| exact: {scale:.2e}; score rel err = max over modalities of |score - exact score| / max score)")


if __name__ == "__main__":
    main()
