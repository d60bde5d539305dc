"""FedMFS (gamma = 1) against the all-modalities baseline on the same preset and seed.

Prints the final accuracy of each, the cumulative upload bytes of each and their ratios, measured in one
run. Target of the project: FedMFS within 1 point of the all-modalities accuracy with at most a quarter
of its bytes.

    python bench/compare.py --preset small --rounds 20 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fedmfs.core.data import make_synthetic
from fedmfs.core.selection import Alphas
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_simulation


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; figures are means")
    ap.add_argument("--gamma", type=int, default=1)
    d = Alphas()
    ap.add_argument("--alpha-s", type=float, default=d.s)
    ap.add_argument("--alpha-c", type=float, default=d.c)
    ap.add_argument("--alpha-r", type=float, default=d.r)
    ap.add_argument("--extra", nargs="*", default=[], help="more methods to run alongside (e.g. random holistic local)")
    ap.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        fleet = make_synthetic(args.preset, seed=seed)
        for method in ["fedmfs", "all", *args.extra]:
            cfg = SimConfig.build(method, rounds=args.rounds, gamma=args.gamma, seed=seed,
                                  alphas=Alphas(args.alpha_s, args.alpha_c, args.alpha_r))
            t0 = time.perf_counter()
            rep = run_simulation(fleet, cfg, "inproc", progress=sys.stderr.isatty())
            runs.setdefault(method, []).append({
                "seed": seed,
                "final_accuracy": rep["final_accuracy"],
                "total_upload_bytes": rep["total_upload_bytes"],
                "seconds": time.perf_counter() - t0,
            })
            print(f"  seed {seed} {method:13s} final accuracy {rep['final_accuracy'] * 100:6.2f}%  "
                  f"upload {rep['total_upload_bytes'] / 1e6:8.3f} MB", flush=True)
    results = {m: {k: sum(r[k] for r in rs) / len(rs) for k in ("final_accuracy", "total_upload_bytes", "seconds")}
               | {"runs": rs} for m, rs in runs.items()}
    base = results["all"]
    print(f"preset={args.preset} rounds={args.rounds} seeds={args.seeds} gamma={args.gamma} "
          f"alphas=({args.alpha_s:.3g}, {args.alpha_c:.3g}, {args.alpha_r:.3g}); means over seeds")
    print(f"{'method':13s} {'final acc':>9s} {'upload MB':>10s} {'bytes/all':>9s} {'acc - all':>9s} {'time s':>7s}")
    for m, r in results.items():
        print(f"{m:13s} {r['final_accuracy'] * 100:8.2f}% {r['total_upload_bytes'] / 1e6:10.3f} "
              f"{r['total_upload_bytes'] / base['total_upload_bytes']:9.3f} "
              f"{(r['final_accuracy'] - base['final_accuracy']) * 100:+8.2f}p {r['seconds']:7.1f}")
    f = results["fedmfs"]
    ok_acc = f["final_accuracy"] >= base["final_accuracy"] - 0.01
    ok_bytes = f["total_upload_bytes"] <= 0.25 * base["total_upload_bytes"]
    print(f"target: FedMFS within 1 point of all ({'met' if ok_acc else 'NOT met'}), "
          f"<= 1/4 of its bytes ({'met' if ok_bytes else 'NOT met'}): byte ratio "
          f"{f['total_upload_bytes'] / base['total_upload_bytes']:.3f}, accuracy difference "
          f"{(f['final_accuracy'] - base['final_accuracy']) * 100:+.2f} points")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
