"""The cap rule under binding byte caps: `impact` (the default: Shapley impact as the knapsack's value,
size as its weight, recency a bonus, gamma the count bound) against `priority` (0.1.0's: the sum of
priorities, which already reward small size), on the same fleet, seed and caps.

Prints per cap and rule: the final accuracy, the bytes uploaded and how often each modality was sent.

    python bench/cap_rules.py --seed 100 --rounds 5 --caps 30000 60000 90000 [--noise]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from fedmfs.core.data.synthetic import add_noise_modalities, make_synthetic
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_simulation


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gamma", type=int, default=6)
    ap.add_argument("--caps", type=int, nargs="+", default=[30_000, 60_000, 90_000])
    ap.add_argument("--noise", action="store_true", help="add pure-noise modalities (widths 3, 16, 64, 256)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    fleet = make_synthetic("small", args.seed)
    if args.noise:
        fleet = add_noise_modalities(fleet, seed=args.seed)
    out: dict = {}
    for cap in args.caps:
        for rule in ("impact", "priority"):
            cfg = SimConfig.build("fedmfs", rounds=args.rounds, gamma=args.gamma, cap_bytes=cap, cap_rule=rule,
                                  seed=args.seed)
            rep = run_simulation(fleet, cfg, "inproc")
            sent = Counter(u["modality"] for r in rep["rounds"] for u in r["uploads"])
            out[f"{cap}/{rule}"] = {"final_accuracy": rep["final_accuracy"], "bytes": rep["total_upload_bytes"],
                                    "uploads": dict(sent)}
            print(f"cap {cap:>7d} {rule:8s} final acc {rep['final_accuracy'] * 100:5.1f}%  "
                  f"bytes {rep['total_upload_bytes'] / 1e6:6.3f} MB  uploads {dict(sorted(sent.items()))}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
