"""Benchmark: ONNX Runtime Shapley engine and inference vs PyTorch and the shap library.

ActionSense shapes (six modalities, 100 steps, 20 classes, hidden 64), 50 explained + 50 background
samples, ONE thread everywhere (torch.set_num_threads(1), ORT intra_op 1). Random weights (timing
does not depend on training). Every ratio is measured in this one run; times are the minimum over
repeats (the machine is shared; the minimum is the least disturbed estimate).

    python bench/onnx_shapley.py            # full run, ~1-2 minutes on one core
    python bench/onnx_shapley.py --quick    # fewer repeats; naive and shap baselines extrapolated

Results go to stdout; docs/benchmarks.md ("ONNX runtime and Shapley") records one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

from fedmfs.core import shapley as ref
from fedmfs.core.modality import ACTIONSENSE_MODALITIES, DatasetSpec
from fedmfs.core.runtime.graphs import model_set_onnx, model_set_runtime, personalised_model_onnx
from fedmfs.core.runtime.modelset import write_model_set
from fedmfs.core.runtime.sessions import EdgeRuntime
from fedmfs.export.statedir import StateSet, save_state_set
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy

N, B, C, T = 50, 50, 20, 100
SPEC = DatasetSpec(ACTIONSENSE_MODALITIES, C, T)


def best(f, repeats: int) -> float:
    f()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts)


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    mods = {m.name: ModalityModel(m, C).eval() for m in SPEC.modalities}
    fus = FusionModel(len(SPEC.modalities), C, 64).eval()
    for p in fus.parameters():
        p.data.mul_(3.0)  # sharper than at init, so Shapley values are not all tiny
    return mods, fus


def make_data(seed: int = 1):
    rng = np.random.default_rng(seed)
    x = {m.name: rng.standard_normal((N, T, *m.feature_shape), dtype=np.float32) for m in SPEC.modalities}
    bg = {m.name: rng.standard_normal((B, T, *m.feature_shape), dtype=np.float32) for m in SPEC.modalities}
    return x, bg


def torch_probs(mods, x) -> np.ndarray:
    with torch.no_grad():
        return torch.stack([mods[m.name](torch.from_numpy(x[m.name])).exp() for m in SPEC.modalities], 1).numpy()


def naive_torch_shapley(mods, fus, x, bg, coalitions: np.ndarray) -> np.ndarray:
    """The naive way: for every coalition, re-run the full model in PyTorch (modality models on
    the explained and background windows, then the fusion model on the substituted rows)."""
    m = len(SPEC.modalities)
    mask = torch.ones(N * B, m)
    out = []
    with torch.no_grad():
        for row in coalitions:
            px = torch.from_numpy(torch_probs(mods, x))
            pb = torch.from_numpy(torch_probs(mods, bg))
            z = torch.where(torch.from_numpy(row)[None, None, :, None], px[:, None], pb[None, :])
            out.append(fus(z.reshape(N * B, m, C), mask).exp().reshape(N, B, C).mean(1).numpy())
    return np.stack(out)


def shap_library(rt, px, pb, explain: int) -> tuple[np.ndarray, float]:
    """shap.explainers.Exact over the 6 modality "features" with an Independent masker on the
    background: a sample is encoded as one row index per modality into the cached modality
    probabilities (shap gets the same "run the modality models once" advantage as the engine;
    the fusion model runs in ONNX Runtime)."""
    import shap

    table = np.concatenate([px, pb])  # rows 0..N-1 explained, N..N+B-1 background
    m = table.shape[1]
    cols = np.arange(m)
    mask = np.ones((1, m), np.float32)

    def f(idx: np.ndarray) -> np.ndarray:
        idx = idx.astype(np.int64)
        probs = table[idx, cols[None, :]]  # (k, M, C)
        return rt.fuse(probs, np.broadcast_to(mask, (len(idx), m)))

    explainer = shap.explainers.Exact(f, shap.maskers.Independent(np.tile(np.arange(N, N + B)[:, None], (1, m)),
                                                                  max_samples=B))
    feats = np.tile(np.arange(N)[:, None], (1, m))[:explain]
    t = time.perf_counter()
    res = explainer(feats)
    dt = time.perf_counter() - t
    return np.asarray(res.values), dt  # (explain, M, C)


RSS_CHILD_ORT = textwrap.dedent("""
    import sys
    import numpy as np
    from collections.abc import Mapping
    from fedmfs.core.runtime.modelset import load_model_set

    class SpoolDir(Mapping):
        # windows spooled on disk, one .npy per modality, mapped (not read) when the runtime asks for
        # them: the runtime reads them a row chunk at a time and unmaps what it has used
        def __init__(self, d, prefix): self.d, self.prefix = d, prefix
        def __getitem__(self, k):
            return np.load(f"{self.d}/{self.prefix}_{k}.npy", mmap_mode="r", allow_pickle=False)
        def __iter__(self): return iter(sys.argv[3].split(","))
        def __len__(self): return len(sys.argv[3].split(","))

    rt = load_model_set(sys.argv[1], threads=1)
    x, bg = SpoolDir(sys.argv[2], "x"), SpoolDir(sys.argv[2], "bg")
    pred = rt.predict(x)
    res = rt.shapley(x, bg)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print("torch" in sys.modules, hwm, float(res.scores.sum()))
""")

RSS_CHILD_TORCH = textwrap.dedent("""
    import sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from fedmfs.core import shapley as ref
    from fedmfs.export.statedir import load_state_set
    from fedmfs.learner.models import FusionModel, ModalityModel, numpy_to_state

    st = load_state_set(sys.argv[1])
    names = sys.argv[3].split(",")
    mods = {}
    for m in st.spec.modalities:
        mods[m.name] = ModalityModel(m, st.spec.num_classes).eval()
        numpy_to_state(mods[m.name], st.modality_states[m.name])
    fus = FusionModel(len(names), st.spec.num_classes, st.fusion_hidden).eval()
    numpy_to_state(fus, st.fusion_state)

    def probs(prefix):
        with torch.no_grad():
            return torch.stack([mods[k](torch.from_numpy(np.load(f"{sys.argv[2]}/{prefix}_{k}.npy")))
                                .exp() for k in names], 1).numpy()

    def fuse(p, mk):
        with torch.no_grad():
            return fus(torch.from_numpy(p), torch.from_numpy(np.ascontiguousarray(mk))).exp().numpy()

    px, pb = probs("x"), probs("bg")
    pred = fuse(px, np.ones((len(px), len(names)), np.float32))
    phi = ref.exact_shapley(fuse, px, pb, np.ones(len(names), bool))
    hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    print("torch" in sys.modules, hwm, float(ref.modality_scores(phi).sum()))
""")


def peak_rss(tmp: Path, mods, fus, x, bg) -> tuple[list[float], float, list[float], float]:
    states = StateSet(SPEC, {k: state_to_numpy(v) for k, v in mods.items()}, state_to_numpy(fus), 64)
    save_state_set(tmp / "states", states)
    write_model_set(tmp / "onnx", SPEC, *model_set_onnx(SPEC, states.modality_states, states.fusion_state),
                    personalised_model=personalised_model_onnx(SPEC, states.modality_states, states.fusion_state))
    for k in x:
        np.save(tmp / f"x_{k}.npy", x[k])
        np.save(tmp / f"bg_{k}.npy", bg[k])
    names = ",".join(SPEC.names)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = []
    # the ORT peak varies by several MB from one identical process to the next (where glibc and ORT
    # place their buffers), so the ORT child runs RSS_RUNS times and all figures are reported
    for script, arg, runs in ((RSS_CHILD_ORT, tmp / "onnx", RSS_RUNS), (RSS_CHILD_TORCH, tmp / "states", 1)):
        peaks = []
        for _ in range(runs):
            p = subprocess.run([sys.executable, "-c", script, str(arg), str(tmp), names], capture_output=True,
                               text=True, timeout=600, env=env)
            if p.returncode:
                raise RuntimeError(p.stderr)
            has_torch, kb, score = p.stdout.split()
            peaks.append(int(kb) / 1024)
        out += [sorted(peaks), float(score)]
    return tuple(out)


RSS_RUNS = 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats; extrapolate the slow baselines")
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    mods, fus = make_models()
    x, bg = make_data()
    states = {k: state_to_numpy(v) for k, v in mods.items()}

    t = time.perf_counter()
    rt = model_set_runtime(SPEC, states, state_to_numpy(fus), 64, threads=1)
    build_ms = (time.perf_counter() - t) * 1e3
    both = {k: np.concatenate([x[k], bg[k]]) for k in x}
    sess = {m.name: (rt._sessions[m.name], m) for m in SPEC.modalities}

    def forward():
        for s, m in sess.values():
            s.run([m.onnx_output], {m.onnx_input: both[m.name]})

    t_fwd = best(forward, reps)
    t_shap = best(lambda: rt.shapley(x, bg), reps)
    res = rt.shapley(x, bg)
    px, mask = rt.modality_probs(x)
    pb, _ = rt.modality_probs(bg)
    t_fusion = best(lambda: rt.shapley_from_probs(px, pb, mask), reps)
    print(f"model set build + 8 sessions: {build_ms:.1f} ms")
    print(f"ORT modality forward, 100 samples:       {t_fwd * 1e3:8.1f} ms")
    print(f"ORT exact Shapley (64 coalitions), total: {t_shap * 1e3:8.1f} ms   ratio {t_shap / t_fwd:.3f}  (target <= 1.25)")
    print(f"  of which fusion over coalitions:        {t_fusion * 1e3:8.1f} ms")

    # correctness: engine vs numpy reference with the ORT fusion
    want = ref.exact_shapley(rt.fuse, px, pb, mask)
    print(f"engine vs numpy reference max |diff|: {np.abs(res.phi - want).max():.2e}")

    # naive PyTorch: the full model re-run for every coalition
    coal = ref.coalition_masks(6)
    k = 8 if args.quick else 64
    t = time.perf_counter()
    v = naive_torch_shapley(mods, fus, x, bg, coal[:k])
    t_naive = (time.perf_counter() - t) * 64 / k
    if k == 64:
        naive_phi = np.moveaxis(ref.shapley_from_coalition_values(v), 0, 1)
        print(f"naive PyTorch vs engine max |diff|: {np.abs(naive_phi - res.phi).max():.2e}")
    print(f"naive PyTorch, full model per coalition: {t_naive:8.2f} s{' (extrapolated from 8)' if k < 64 else ''}"
          f"   engine is {t_naive / t_shap:.0f}x faster (target >= 30)")

    # shap library on the same pipeline
    explain = 5 if args.quick else N
    shap_vals, t_lib = shap_library(rt, px, pb, explain)
    t_lib *= N / explain
    d = np.abs(shap_vals - res.phi[:explain]).max()
    print(f"shap.explainers.Exact: {t_lib:8.2f} s{' (extrapolated)' if explain < N else ''}"
          f"   engine is {t_lib / t_shap:.0f}x faster (target >= 30); max |diff| {d:.2e} (target <= 1e-5)")

    # batch-1 latency of the full personalised model
    x1 = {k: v[:1].copy() for k, v in x.items()}
    t1 = {k: torch.from_numpy(v) for k, v in x1.items()}
    mask1 = torch.ones(1, 6)

    def torch_predict():
        with torch.no_grad():
            p = torch.stack([mods[m.name](t1[m.name]).exp() for m in SPEC.modalities], 1)
            return fus(p, mask1).exp()

    models, fusion_onnx, _ = model_set_onnx(SPEC, states, state_to_numpy(fus))
    rt_sep = EdgeRuntime(SPEC, models, fusion_onnx, threads=1)  # no personalised graph: 7 calls
    assert rt.personalised_modalities == SPEC.names
    d1 = np.abs(rt.predict(x1) - rt_sep.predict(x1)).max()
    t_ort1 = t_sep1 = t_tor1 = float("inf")
    for _ in range(3):  # interleaved rounds: a burst of load from other jobs hits all three alike
        t_ort1 = min(t_ort1, best(lambda: rt.predict(x1), 30))
        t_sep1 = min(t_sep1, best(lambda: rt_sep.predict(x1), 30))
        t_tor1 = min(t_tor1, best(torch_predict, 30))
    print(f"batch-1 latency: ORT one graph {t_ort1 * 1e3:.3f} ms, PyTorch eager {t_tor1 * 1e3:.3f} ms, "
          f"ratio {t_ort1 / t_tor1:.3f} (target <= 0.6); ORT 7 graphs {t_sep1 * 1e3:.3f} ms "
          f"(ratio {t_sep1 / t_tor1:.3f}); one graph vs 7 graphs max |diff| {d1:.1e}")

    with tempfile.TemporaryDirectory(prefix="fedmfs-bench-") as tmp:
        rss_ort, s_ort, rss_torch, s_torch = peak_rss(Path(tmp), mods, fus, x, bg)
    print(f"peak RSS, load + predict + exact Shapley: ORT process median {np.median(rss_ort):.0f} MB "
          f"(runs: {', '.join(f'{r:.0f}' for r in rss_ort)}; target <= 100), "
          f"torch process {rss_torch[0]:.0f} MB; score sums {s_ort:.6f} vs {s_torch:.6f}")


if __name__ == "__main__":
    main()
