"""Simulated round time: this code against the code of an earlier commit, measured in one run.

Runs the same in-process simulation (``fedmfs.sim.driver.run_inproc``: the real coordinator and edge
services over a loopback bus) on the same fleet and seed with:

* ``before``: the code of ``--baseline`` (a git commit, default the one before issue 16), imported from
  a ``git archive`` of it in a child process;
* ``reference``: this code's per-device path (each device trains alone when it asks, one ``nn.LSTM`` at
  a time: ``run_inproc(pooled=False)``, ``TrainConfig(engine="reference")``);
* ``fast``: this code's default (every device's jobs of a round pooled, batched training).

Each variant runs in its own child process with one torch thread, one after the other. Printed: the
start-up (imports, fleet, services), the time per round (from each round's close; round 0 apart), the
ratios before/fast and reference/fast, and the check that the fast path simulates what the devices do
alone: every device's local models after the last round equal the reference's to 1e-5 (max abs
difference printed) and every round's uploads (device, modality) are the same.

    python bench/sim_speed.py                          # headroom, 9 clients, 3 rounds (~5 minutes)
    python bench/sim_speed.py --preset small --rounds 2
    python bench/sim_speed.py --json bench/results/sim_speed_headroom.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _trees import TREE_IMPORTS, checkout

BASELINE = "bddb5ac"      # main before issue 16

# The child: imports fedmfs from TREE if given (another commit's source), runs one simulation, writes
# its timings, uploads and where the devices' state went.
CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
tree, out, variant, preset, rounds, seed, clients, work = sys.argv[1:9]
""" + TREE_IMPORTS + r"""
import logging
import torch
torch.set_num_threads(1)
from fedmfs.core.data import make_synthetic
from fedmfs.core.data.format import Fleet
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_inproc
from fedmfs.sim.report import build_report
logging.basicConfig(level=logging.WARNING)
fleet = make_synthetic(preset, seed=int(seed))
if int(clients):
    fleet = Fleet(fleet.spec, fleet.clients[:int(clients)], dict(fleet.metadata))
kw = {}
if variant == "reference":
    kw = {"train": TrainConfig(engine="reference")}
cfg = SimConfig.build("fedmfs", rounds=int(rounds), seed=int(seed), **kw)
closes = []
t0 = time.perf_counter()
c0 = time.process_time()
extra = {"pooled": False} if variant == "reference" else {}
state = run_inproc(fleet, cfg, work, on_round=lambda n: closes.append((n, time.perf_counter(), time.process_time())),
                   **extra)
t1 = time.perf_counter()
rep = build_report(fleet, cfg, state, "inproc")
json.dump({"startup_s": t0 - t_start, "run_s": t1 - t0, "cpu_s": time.process_time() - c0,
           "closes": [(n, t - t0, c - c0) for n, t, c in closes],
           "uploads": [sorted((u["device"], u["modality"]) for u in r["uploads"]) for r in rep["rounds"]],
           "accuracy": rep["final_accuracy"], "work": work,
           "fedmfs": sys.modules["fedmfs"].__file__}, open(out, "w"))
"""


def _run(tree: str, variant: str, args, tmp: Path) -> dict:
    out = tmp / f"{variant}.json"
    work = tmp / f"work-{variant}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", CHILD, tree, str(out), variant, args.preset, str(args.rounds), str(args.seed),
           str(args.clients or 0), str(work)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=str(tmp))
    res = json.loads(out.read_text())
    res["process_s"] = time.perf_counter() - t
    rounds = [c for _, c, _ in res["closes"]]
    cpus = [c for _, _, c in res["closes"]]
    res["round_s"] = [b - a for a, b in zip([0.0, *rounds[:-1]], rounds)]
    res["round_cpu_s"] = [b - a for a, b in zip([0.0, *cpus[:-1]], cpus)]
    return res


def _local_models(work: Path) -> dict[tuple[str, str], dict]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(work.glob("edge/*/client/local_*.safetensors")):
        out[(f.parent.parent.name, f.stem[len("local_"):])] = load_file(str(f))
    return out


def _max_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise SystemExit(f"the runs have different devices/modalities: {sorted(set(a) ^ set(b))}")
    return max(float(abs(a[k][t] - b[k][t]).max()) for k in a for t in a[k])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="headroom")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=None, help="the first N clients only (default: all)")
    ap.add_argument("--baseline", default=BASELINE, help=f"the earlier commit [{BASELINE}]; '' to skip it")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="fedmfs-simspeed-"))
    runs: dict[str, dict] = {}
    sha = None
    if args.baseline:
        sha = checkout(args.baseline, tmp / "baseline")
        runs["before"] = _run(str(tmp / "baseline"), "before", args, tmp)
    runs["reference"] = _run("", "reference", args, tmp)
    runs["fast"] = _run("", "fast", args, tmp)

    def per_round(r: dict, key: str = "round_s") -> float:
        later = r[key][1:] or r[key]
        return sum(later) / len(later)

    print(f"{args.preset}, {args.clients or 'all'} clients, {args.rounds} rounds, seed {args.seed}, one torch thread"
          + (f"; before = {sha[:10]}" if sha else ""))
    print(f"{'':10s} {'start-up':>9s} {'round 0':>9s} {'later rounds (mean)':>20s} {'CPU/round':>10s} {'whole run':>10s}")
    for name, r in runs.items():
        print(f"{name:10s} {r['startup_s']:8.1f}s {r['round_s'][0]:8.1f}s {per_round(r):19.2f}s "
              f"{per_round(r, 'round_cpu_s'):9.2f}s {r['process_s']:9.1f}s")
    fast = runs["fast"]
    summary: dict = {"preset": args.preset, "clients": args.clients, "rounds": args.rounds, "seed": args.seed,
                     "baseline": sha}
    for other in ("before", "reference"):
        if other not in runs:
            continue
        o = runs[other]
        ratio = per_round(o) / per_round(fast)
        whole = sum(o["round_s"]) / sum(fast["round_s"])
        summary[f"{other}_over_fast"] = {"round": ratio, "all_rounds": whole,
                                         "round_cpu": per_round(o, "round_cpu_s") / per_round(fast, "round_cpu_s"),
                                         "process": o["process_s"] / fast["process_s"]}
        print(f"{other} / fast: {ratio:.2f}x per later round, {whole:.2f}x over all rounds, "
              f"{summary[f'{other}_over_fast']['round_cpu']:.2f}x CPU per round, "
              f"{summary[f'{other}_over_fast']['process']:.2f}x the whole process")
    diff = _max_diff(_local_models(Path(fast["work"])), _local_models(Path(runs["reference"]["work"])))
    same_uploads = fast["uploads"] == runs["reference"]["uploads"]
    summary.update(max_abs_diff_fast_vs_reference=diff, same_uploads_fast_vs_reference=same_uploads,
                   accuracy={k: r["accuracy"] for k, r in runs.items()})
    print(f"fast vs reference: local models max abs difference {diff:.2e} (bound 1e-5: "
          f"{'ok' if diff <= 1e-5 else 'EXCEEDED'}); uploads {'the same' if same_uploads else 'DIFFER'} "
          f"in every round")
    if "before" in runs:
        same_before = runs["before"]["uploads"] == fast["uploads"]
        summary["same_uploads_fast_vs_before"] = same_before
        print(f"uploads of fast vs before: {'the same' if same_before else 'different'} in every round")
    print("final accuracy: " + ", ".join(f"{k} {v * 100:.2f}%" for k, v in summary["accuracy"].items()))
    summary["runs"] = {k: {x: v for x, v in r.items() if x not in ("work",)} for k, r in runs.items()}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return 0 if diff <= 1e-5 and same_uploads else 1


if __name__ == "__main__":
    sys.exit(main())
