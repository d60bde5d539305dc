"""Benchmark: a cost model of the in-process simulator (issue 16 point 5): time per simulated round
against the clients K, the modalities M and the windows per client W, so a user can predict a run.

Fleets of controlled size, all from one synthetic preset (``--preset``, default ``headroom``), seed 0;
one factor varies at a time around the preset's fleet (9 clients, every modality, its windows):

* **K clients**: subsets of the preset's nine (interleaved so that clients with and without the
  tactile gloves keep their 5:4 mix: S00, S06, S02, S07, ...); beyond nine, the clients of seed 1's
  fleet are added under distinct names (``S00-s1``, ...). The generator makes nine subjects, no more.
* **M modalities**: the first M of the spec's modalities (spec order: eye first, so an informative
  modality is always there), as a fleet with the reduced ``DatasetSpec``, every client restricted to
  them (a client keeps its own gaps: S06-S09 have no tactile gloves).
* **W windows per client**: the preset regenerated with ``windows_per_class`` scaled (0.5x, 1x, 2x,
  4x): new windows of the same generative model, the same classes, the same stratified 80/20 split.
  Not tiled copies: copies of training windows in the early-stopping fold would stop training later
  and change what is measured. W is reported as the measured mean windows per client over the
  preset's.

Each point is one ``fedmfs.sim.driver.run_inproc`` run (the services in this process, every device's
jobs of a round pooled) of ``--rounds`` rounds (default 3) of the default FedMFS policy, one torch
thread. Clocks: wall (``perf_counter``) and CPU time of this process (``process_time``; one thread,
so on an idle core the wall time equals it: the machine is shared, so the models are fitted on CPU
time). Marks: the call, the first pooled job (``JobPool.run`` wrapped here, not edited), each round's
close (``on_round``), the return. **start-up** = call -> first job (data and config files written,
services started); **round 0** = first job -> round 0 closed (round 0 costs more: no global models
yet); **later rounds** = mean of the rounds after it.

Then a linear fit per factor (seconds per later round against K, against M and the sum of the
modality widths, against W; coefficients and R^2); a combined formula over every measured point,
chosen among a few candidate forms by leave-one-out error; and the prediction against held-out points
that vary all three factors at once (never used for a fit).

    python bench/cost_model.py --json bench/results/cost_model_headroom.json --plot docs/img/cost_model.png
    python bench/cost_model.py --quick          # two sizes per factor, 2 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import contextlib
import dataclasses
import itertools
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from fedmfs.core.data import synthetic
from fedmfs.core.data.format import ClientData, Fleet
from fedmfs.core.modality import DatasetSpec
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_inproc

K_SIZES = (3, 6, 9, 12, 18)
W_SCALES = (0.5, 1.0, 2.0, 4.0)
# held out of every fit: all three factors away from the preset's at once
HELD_OUT = ((6, 7, 2.0), (15, 4, 0.5))


# ---------------------------------------------------------------------------------------- fleets

def preset_fleet(preset: str, seed: int, wscale: float) -> Fleet:
    """The preset's fleet of ``seed``, its ``windows_per_class`` scaled by ``wscale`` (1: the preset)."""
    if wscale == 1.0:
        return synthetic.make_synthetic(preset, seed)
    p = synthetic.PRESETS[preset]
    key = f"{preset}-cost-w{wscale:g}"
    scaled = dataclasses.replace(p, name=key, windows_per_class=max(3, round(p.windows_per_class * wscale)))
    synthetic.PRESETS[key] = scaled          # make_synthetic takes a name; the entry lives for this call
    try:
        return synthetic.make_synthetic(key, seed)
    finally:
        del synthetic.PRESETS[key]


def interleaved(names: list[str]) -> list[str]:
    """Clients with every modality and clients with gaps, alternating (S00, S06, S02, S07, ...)."""
    gaps = [n for n in names if n in synthetic.TACTILE_MISSING]
    full = [n for n in names if n not in synthetic.TACTILE_MISSING]
    out = []
    for a, b in itertools.zip_longest(full, gaps):
        out += [x for x in (a, b) if x is not None]
    return out


def renamed(c: ClientData, suffix: str) -> ClientData:
    return ClientData(f"{c.name}{suffix}", c.x, c.y, c.train)


def build_fleet(pool: dict, preset: str, k: int, m: int, wscale: float) -> Fleet:
    """The fleet of K clients, the first M modalities, windows scaled by ``wscale``. ``pool`` caches
    generated fleets by (seed, wscale)."""
    def gen(seed: int) -> Fleet:
        if (seed, wscale) not in pool:
            pool[(seed, wscale)] = preset_fleet(preset, seed, wscale)
        return pool[(seed, wscale)]

    base = gen(0)
    n0 = len(base.clients)
    by_name = {c.name: c for c in base.clients}
    clients = [by_name[n] for n in interleaved([c.name for c in base.clients])]
    seed = 1
    while len(clients) < k:
        more = gen(seed)
        more_by = {c.name: c for c in more.clients}
        clients += [renamed(more_by[n], f"-s{seed}") for n in interleaved([c.name for c in more.clients])]
        seed += 1
    clients = clients[:k]
    spec = base.spec
    if m > len(spec.modalities):
        raise SystemExit(f"preset {preset!r} has {len(spec.modalities)} modalities; asked for {m}")
    keep = spec.modalities[:m]
    names = {ms.name for ms in keep}
    small = DatasetSpec(keep, spec.num_classes, spec.steps, spec.class_names)
    out = [ClientData(c.name, {n: a for n, a in c.x.items() if n in names}, c.y, c.train) for c in clients]
    meta = {"generator": base.metadata.get("generator"), "preset": preset,
            "cost_model": {"clients": k, "modalities": m, "window_scale": wscale, "base_clients": n0}}
    fleet = Fleet(small, out, meta)
    fleet.check_runnable()
    return fleet


def describe(fleet: Fleet, preset_windows: float) -> dict:
    """The sizes a cost can depend on."""
    widths = {ms.name: ms.features for ms in fleet.spec.modalities}
    per_client = [len(c.x) for c in fleet.clients]
    windows = [len(c) for c in fleet.clients]
    return {
        "K": len(fleet.clients), "M": len(fleet.spec.modalities),
        "W": float(np.mean(windows)) / preset_windows,
        "windows_per_client": float(np.mean(windows)),
        "train_windows_per_client": float(np.mean([c.n_train for c in fleet.clients])),
        "sum_widths": int(sum(widths.values())),
        "models": int(sum(per_client)),                                          # (client, modality) models
        "model_widths": int(sum(widths[n] for c in fleet.clients for n in c.x)),  # sum of their input widths
        "coalitions": int(sum(2 ** n for n in per_client)),                      # exact Shapley's 2^M_k, summed
        "steps": fleet.spec.steps, "hidden": fleet.spec.modalities[0].hidden,
    }


# ---------------------------------------------------------------------------------------- timing

def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@contextlib.contextmanager
def first_job_mark(marks: dict):
    """Note when the pool first runs jobs, and the time spent in pooled jobs (training and Stage #2),
    by wrapping ``JobPool.run`` for the duration (instrumentation only: the library is not changed)."""
    try:
        from fedmfs.sim.pool import JobPool
    except ImportError:            # a driver without a pool: no start-up split
        yield
        return
    orig = JobPool.run
    marks.setdefault("jobs", [0.0, 0.0])

    def run(self):
        if not self.pending:
            return orig(self)
        t = clock()
        marks.setdefault("first_job", t)
        try:
            return orig(self)
        finally:
            e = clock()
            marks["jobs"][0] += e[0] - t[0]
            marks["jobs"][1] += e[1] - t[1]

    JobPool.run = run
    try:
        yield
    finally:
        JobPool.run = orig


def run_point(fleet: Fleet, rounds: int) -> dict:
    """One inproc run of ``rounds`` rounds; start-up, per-round and teardown times, wall and CPU."""
    cfg = SimConfig.build(rounds=rounds, seed=0)
    closes: list[tuple[float, float]] = []
    jobs_at_close: list[tuple[float, float]] = []
    marks: dict = {}

    def on_round(n: int) -> None:
        closes.append(clock())
        jobs_at_close.append(tuple(marks.get("jobs", (0.0, 0.0))))

    with tempfile.TemporaryDirectory(prefix="fedmfs-cost-") as d, first_job_mark(marks):
        t0 = clock()
        run_inproc(fleet, cfg, d, on_round=on_round)
        t_end = clock()
    if len(closes) != rounds:
        raise RuntimeError(f"{len(closes)} round closes seen for {rounds} rounds")
    start = marks.get("first_job", t0)
    edges = [start, *closes]
    out = {"rounds": rounds}
    for i, name in enumerate(("wall", "cpu")):
        per = [edges[r + 1][i] - edges[r][i] for r in range(rounds)]
        jobs = [jobs_at_close[r][i] - (jobs_at_close[r - 1][i] if r else 0.0) for r in range(rounds)]
        out[name] = {"startup": start[i] - t0[i], "per_round": per, "round0": per[0],
                     "later": float(np.mean(per[1:])) if rounds > 1 else None,
                     "pooled_jobs_per_round": jobs,
                     "teardown": t_end[i] - closes[-1][i], "total": t_end[i] - t0[i]}
    return out


# ---------------------------------------------------------------------------------------- fits

def linfit(x, y) -> dict:
    """Least squares y = a + b x; coefficients and R^2."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss = float(((y - y.mean()) ** 2).sum())
    return {"a": float(a), "b": float(b), "r2": 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0}


# candidate combined forms: seconds per round = c0 + sum_i c_i * feature_i (features from describe())
FORMS = {
    "a + b*K": lambda d: [d["K"]],
    "a + b*models": lambda d: [d["models"]],
    "a + b*models + c*model_widths": lambda d: [d["models"], d["model_widths"]],
    "a + b*models*W": lambda d: [d["models"] * d["W"]],
    "a + b*models + c*model_widths*W": lambda d: [d["models"], d["model_widths"] * d["W"]],
    "a + b*models + c*models*W": lambda d: [d["models"], d["models"] * d["W"]],
    "a + b*models + c*K*W": lambda d: [d["models"], d["K"] * d["W"]],
    "a + b*models + c*coalitions": lambda d: [d["models"], d["coalitions"]],
    "a + b*models + c*coalitions + d*K*W": lambda d: [d["models"], d["coalitions"], d["K"] * d["W"]],
    "a + b*models + c*model_widths*W + d*K*W": lambda d: [d["models"], d["model_widths"] * d["W"], d["K"] * d["W"]],
}


def fit_form(form: str, sizes: list[dict], y: list[float]) -> np.ndarray:
    X = np.array([[1.0, *FORMS[form](d)] for d in sizes])
    coef, *_ = np.linalg.lstsq(X, np.asarray(y, float), rcond=None)
    return coef


def predict(form: str, coef: np.ndarray, d: dict) -> float:
    return float(coef @ np.array([1.0, *FORMS[form](d)]))


def loo_error(form: str, sizes: list[dict], y: list[float]) -> float:
    """Root mean square of the relative leave-one-out errors (each point predicted by a fit without it)."""
    errs = []
    for i in range(len(y)):
        rest = [j for j in range(len(y)) if j != i]
        if len(rest) < len(FORMS[form](sizes[0])) + 2:
            return float("inf")
        coef = fit_form(form, [sizes[j] for j in rest], [y[j] for j in rest])
        errs.append(predict(form, coef, sizes[i]) / y[i] - 1.0)
    return float(np.sqrt(np.mean(np.square(errs))))


def formula(form: str, coef: np.ndarray) -> str:
    names = form.split(" + ")
    terms = [f"{coef[0]:.3g}"] + [f"{c:.3g}*{n.split('*', 1)[1]}" for c, n in zip(coef[1:], names[1:])]
    return " + ".join(terms).replace("+ -", "- ")


# ---------------------------------------------------------------------------------------- main

def git_head() -> str:
    try:
        return subprocess.run(["git", "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()[:100]
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="headroom", choices=sorted(synthetic.PRESETS))
    ap.add_argument("--rounds", type=int, default=3, help="rounds per point (>= 2: round 0 and later rounds)")
    ap.add_argument("--quick", action="store_true", help="two sizes per factor, 2 rounds, one held-out point")
    ap.add_argument("--json", type=Path, help="write the measurements and fits here")
    ap.add_argument("--plot", type=Path, help="draw the three curves with their fits to this PNG")
    ap.add_argument("--load", type=Path, help="fit, print and plot the measurements of a --json file, without running")
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 0 and at least one later round)")
    logging.disable(logging.WARNING)
    doc = json.loads(args.load.read_text()) if args.load else measure(args.preset, 2 if args.quick else args.rounds,
                                                                      args.quick)
    analyse(doc, args.plot)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(args.json)
        print(f"wrote {args.json}")
    return 0


def measure(preset: str, rounds: int, quick: bool) -> dict:
    """Run every point; the measurements as a JSON-ready document."""
    pool: dict = {}
    base = preset_fleet(preset, 0, 1.0)
    pool[(0, 1.0)] = base
    k0, m0 = len(base.clients), len(base.spec.modalities)
    preset_windows = float(np.mean([len(c) for c in base.clients]))
    ms = sorted({max(2, round(m0 * 0.4)), max(2, round(m0 * 0.7)), m0})
    ks, ws, held = K_SIZES, W_SCALES, HELD_OUT
    if quick:
        ks, ms, ws, held = (3, k0), [ms[0], m0], (0.5, 1.0), HELD_OUT[:1]
    held = [(k, min(m, m0), w) for k, m, w in held]
    plan = ([("K", (k, m0, 1.0)) for k in ks] + [("M", (k0, m, 1.0)) for m in ms]
            + [("W", (k0, m0, w)) for w in ws])
    points: dict[tuple, list[str]] = {}
    for f, key in plan:
        points.setdefault(key, []).append(f)
    # measure in an interleaved order (K, M, W, K, ...), so a drift of the shared machine's load is not
    # read as a factor's effect; the preset's point first and again last (their difference: the drift)
    rest = [key for key in points if key != (k0, m0, 1.0)]
    by_factor = {f: [key for key in rest if f in points[key]] for f in "KMW"}
    order = [key for group in itertools.zip_longest(*by_factor.values()) for key in group if key is not None]
    order = [(k0, m0, 1.0), *order, *held, (k0, m0, 1.0)]

    head = git_head()
    print(f"preset {preset}: {k0} clients, {m0} modalities "
          f"({', '.join(f'{m.name}:{m.features}' for m in base.spec.modalities)}), "
          f"{preset_windows:.0f} windows a client; T={base.spec.steps}, hidden {base.spec.modalities[0].hidden}; "
          f"{rounds} rounds a point; {len(order)} runs; {head}; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    # warm-up (imports, first calls): not measured
    run_point(build_fleet(pool, preset, min(3, k0), ms[0], 1.0), 2)

    runs = []
    t_all = time.perf_counter()
    for i, key in enumerate(order):
        k, m, w = key
        fleet = build_fleet(pool, preset, k, m, w)
        size = describe(fleet, preset_windows)
        load = os.getloadavg()[0]
        r = run_point(fleet, rounds)
        kind = "held-out" if key in held and key not in points else "curve"
        runs.append({"key": list(key), "kind": kind, "curves": points.get(key, []), **size, **r, "load_before": load})
        c, wl = r["cpu"], r["wall"]
        print(f"[{i + 1:2d}/{len(order)}] K={k:2d} M={m:2d} W={size['W']:.2f}x ({size['windows_per_client']:.0f} win)"
              f"  start-up {c['startup']:5.2f}s  round 0 {c['round0']:6.2f}s  later {c['later']:6.2f}s CPU"
              f"  (wall {wl['startup']:5.2f} / {wl['round0']:6.2f} / {wl['later']:6.2f})  load {load:.1f}",
              flush=True)
    if git_head() != head:       # the code changed under the run: lazily imported modules may be newer
        print(f"warning: the checkout moved during the run, to {git_head()}", flush=True)
    return {"benchmark": "cost_model", "preset": preset, "rounds": rounds, "quick": quick, "commit": head,
            "commit_at_end": git_head(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            "base": {"K": k0, "M": m0, "windows_per_client": preset_windows,
                     "widths": {ms.name: ms.features for ms in base.spec.modalities}},
            "elapsed_seconds": time.perf_counter() - t_all, "runs": runs}


def analyse(doc: dict, plot_path: Path | None) -> None:
    """Per-factor fits, the combined formula, the held-out predictions; printed, added to ``doc``, plotted."""
    runs, rounds = doc["runs"], doc["rounds"]
    k0, m0, preset_windows = doc["base"]["K"], doc["base"]["M"], doc["base"]["windows_per_client"]

    # one row per point: the preset's point measured twice -> the mean of its two runs
    def merged(key) -> dict:
        rows = [r for r in runs if tuple(r["key"]) == key and r["kind"] == "curve"]
        out = dict(rows[0])
        for clk in ("cpu", "wall"):
            out[clk] = {q: float(np.mean([r[clk][q] for r in rows])) for q in ("startup", "round0", "later")}
            # the share of the later rounds spent in the pooled jobs (training, Shapley, Stage #2)
            out[clk]["jobs_share"] = float(np.mean([sum(r[clk]["pooled_jobs_per_round"][1:])
                                                    / sum(r[clk]["per_round"][1:]) for r in rows]))
        out["repeats"] = len(rows)
        return out

    curve_keys = list(dict.fromkeys(tuple(r["key"]) for r in runs if r["kind"] == "curve"))
    table = {key: merged(key) for key in curve_keys}
    fits: dict = {}
    for f, xname in (("K", "K"), ("M", "M"), ("M", "sum_widths"), ("W", "W")):
        rows = [table[key] for key in curve_keys if f in table[key]["curves"]]
        fits[f"{f}:{xname}"] = {q: linfit([r[xname] for r in rows], [r["cpu"][q] for r in rows])
                                for q in ("later", "round0", "startup")}
        fits[f"{f}:{xname}"]["wall_later"] = linfit([r[xname] for r in rows], [r["wall"]["later"] for r in rows])

    sizes = [table[key] for key in curve_keys]
    # per quantity (later round, round 0, start-up): every candidate form, the best by leave-one-out error
    forms: dict = {}
    best: dict = {}
    for q in ("later", "round0", "startup"):
        y = [r["cpu"][q] for r in sizes]
        forms[q] = {form: {"loo_rel_rms": loo_error(form, sizes, y),
                           "coef": [float(c) for c in fit_form(form, sizes, y)]} for form in FORMS}
        best[q] = min(forms[q], key=lambda f, q=q: forms[q][f]["loo_rel_rms"])
    coef = {q: np.array(forms[q][best[q]]["coef"]) for q in best}

    print(f"\n{len(runs)} runs in {doc['elapsed_seconds'] / 60:.1f} min; {doc['commit']}")
    print("\nCPU seconds (wall in brackets); 'later' = mean of rounds 1..; the preset's point = mean of "
          f"{table[(k0, m0, 1.0)]['repeats']} runs")
    print(f"{'factor':6s} {'K':>3s} {'M':>3s} {'W':>5s} {'win':>4s} {'sumF':>5s} {'models':>6s}  "
          f"{'start-up':>13s}  {'round 0':>15s}  {'later rounds':>15s}  {'jobs':>4s}")
    for f in "KMW":
        for key in curve_keys:
            r = table[key]
            if f not in r["curves"]:
                continue
            c, wl = r["cpu"], r["wall"]
            print(f"{f:6s} {r['K']:3d} {r['M']:3d} {r['W']:5.2f} {r['windows_per_client']:4.0f} {r['sum_widths']:5d} "
                  f"{r['models']:6d}  {c['startup']:5.2f} [{wl['startup']:5.2f}]  {c['round0']:6.2f} [{wl['round0']:6.2f}]"
                  f"  {c['later']:6.2f} [{wl['later']:6.2f}]  {c['jobs_share'] * 100:3.0f}%")
    print("\nper factor, CPU seconds per later round = a + b*x (and round 0, start-up):")
    for name, fit in fits.items():
        f, x = name.split(":")
        lt, r0, st = fit["later"], fit["round0"], fit["startup"]
        print(f"  vs {x:10s}: later {lt['a']:7.3f} + {lt['b']:8.4f}*{x}  (R^2 {lt['r2']:.3f});  "
              f"round 0 {r0['a']:7.3f} + {r0['b']:8.4f}*{x}  (R^2 {r0['r2']:.3f});  "
              f"start-up {st['a']:6.3f} + {st['b']:7.4f}*{x}  (R^2 {st['r2']:.3f})")
    print("\ncombined forms over every curve point (leave-one-out relative RMS error):")
    for form, v in sorted(forms["later"].items(), key=lambda kv: kv[1]["loo_rel_rms"]):
        print(f"  {v['loo_rel_rms'] * 100:6.1f}%  {formula(form, np.array(v['coef']))}")
    print(f"\nprediction (CPU seconds; K clients, M modalities, W = windows per client / {preset_windows:.0f}; "
          "models = sum over clients of their modalities, model_widths = sum over them of the input widths):")
    for q, name in (("later", "a later round"), ("round0", "round 0"), ("startup", "start-up")):
        loo = forms[q][best[q]]["loo_rel_rms"]
        print(f"  {name + ':':14s} {formula(best[q], coef[q])}   (leave-one-out {loo * 100:.1f}%)")
    print("  a run of R rounds = start-up + round 0 + (R - 1) * later round")

    heldout = []
    for r in runs:
        if r["kind"] != "held-out":
            continue
        p_later, p0, pst = (predict(best[q], coef[q], r) for q in ("later", "round0", "startup"))
        p_run10 = pst + p0 + 9 * p_later
        m_run10 = r["cpu"]["startup"] + r["cpu"]["round0"] + 9 * r["cpu"]["later"]
        heldout.append({"key": r["key"], "predicted": {"later": p_later, "round0": p0, "startup": pst},
                        "measured": {q: r["cpu"][q] for q in ("later", "round0", "startup")},
                        "wall": {q: r["wall"][q] for q in ("later", "round0", "startup")}})
        print(f"\nheld out K={r['K']} M={r['M']} W={r['W']:.2f}x (models {r['models']}, model_widths {r['model_widths']}):")
        for q, p in (("later", p_later), ("round0", p0), ("startup", pst)):
            mv = r["cpu"][q]
            print(f"  {q:8s} predicted {p:6.2f} s  measured {mv:6.2f} s CPU ({r['wall'][q]:6.2f} wall)  "
                  f"error {(p / mv - 1) * 100:+5.1f}%")
        print(f"  a 10-round run: predicted {p_run10:6.1f} s, measured-based {m_run10:6.1f} s "
              f"({(p_run10 / m_run10 - 1) * 100:+.1f}%)")
    d0 = [r for r in runs if tuple(r["key"]) == (k0, m0, 1.0)]
    if len(d0) == 2:
        print(f"\ndrift: the preset's point, first and last run: later round {d0[0]['cpu']['later']:.2f} vs "
              f"{d0[1]['cpu']['later']:.2f} s CPU ({d0[0]['wall']['later']:.2f} vs {d0[1]['wall']['later']:.2f} wall)")

    doc.update({"fits": fits, "forms": forms, "held_out": heldout,
                "best": {q: {"form": best[q], "coef": [float(c) for c in coef[q]], "formula": formula(best[q], coef[q])}
                         for q in best}})
    if plot_path:
        plot(plot_path, table, curve_keys, fits, doc["preset"], k0, m0, rounds,
             lambda r: predict(best["later"], coef["later"], r), formula(best["later"], coef["later"]))
        print(f"wrote {plot_path}")


def plot(path: Path, table: dict, keys: list, fits: dict, preset: str, k0: int, m0: int, rounds: int,
         combined, combined_text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, (f, x, label) in zip(axes, (("K", "K", "clients K"), ("M", "M", "modalities M (sum of widths labelled)"),
                                        ("W", "W", "windows per client (x the preset's)"))):
        rows = sorted((table[k] for k in keys if f in table[k]["curves"]), key=lambda r: r[x])
        xs = np.array([r[x] for r in rows], float)
        for q, colour, name in (("later", "C0", "later round"), ("round0", "C1", "round 0"), ("startup", "C2", "start-up")):
            ax.plot(xs, [r["cpu"][q] for r in rows], "o", color=colour, label=f"{name}, CPU")
            ax.plot(xs, [r["wall"][q] for r in rows], "x", color=colour, alpha=0.6, label=f"{name}, wall")
            fit = fits[f"{f}:{x}"][q]
            grid = np.linspace(0, xs.max() * 1.05, 50)
            ax.plot(grid, fit["a"] + fit["b"] * grid, "-", color=colour, lw=1,
                    label=f"fit {fit['a']:.2f} + {fit['b']:.3g}x (R² {fit['r2']:.2f})")
        ax.plot(xs, [combined(r) for r in rows], "k--", lw=1, label="combined formula, later round")
        if f == "M":
            for r in rows:
                ax.annotate(f"sum {r['sum_widths']}", (r[x], r["cpu"]["later"]), textcoords="offset points",
                            xytext=(4, -12), fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper left")
    axes[0].set_ylabel("seconds (CPU: dots, wall: crosses)")
    fig.suptitle(f"fedmfs inproc simulation, preset {preset}: time per round around K={k0}, M={m0}, W=1x "
                 f"({rounds} rounds a point, one torch thread)\ncombined: CPU s per later round = {combined_text}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
