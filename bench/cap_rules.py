"""The cap rule under binding byte caps: `impact` (the default: Shapley impact as the knapsack's value,
size as its weight, recency a bonus on impact, gamma the count bound) against `priority` (0.1.0's: the
sum of priorities, which already reward small size), on the same fleets, seeds and caps.

Caps are fractions of the bytes of one upload of every modality model of the fleet (fp32), so that
each binds. Prints per cap and rule: the final accuracy and the bytes uploaded (means over seeds),
their ratios impact / priority, and how often each modality was sent.

    python bench/cap_rules.py --preset headroom --seeds 0 1 2 --rounds 8 --fractions 0.1 0.2 0.35
    python bench/cap_rules.py --preset small --noise --seeds 0 1 2 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from fedmfs.core.data.synthetic import add_noise_modalities, make_synthetic
from fedmfs.sim.compare import modality_payload_sizes
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_simulation

RULES = ("impact", "priority")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="headroom")
    ap.add_argument("--noise", action="store_true", help="add pure-noise modalities (widths 3, 16, 64, 256)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--gamma", type=int, default=None, help="count bound (default: every modality: the cap alone binds)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.35],
                    help="caps as fractions of one upload of every modality model")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    out: dict = {}
    for seed in args.seeds:
        fleet = make_synthetic(args.preset, seed)
        if args.noise:
            fleet = add_noise_modalities(fleet, seed=seed)
        total = sum(modality_payload_sizes(fleet.spec, "fp32").values())
        gamma = args.gamma or len(fleet.spec.names)
        for frac in args.fractions:
            cap = int(frac * total)
            for rule in RULES:
                cfg = SimConfig.build("fedmfs", rounds=args.rounds, gamma=gamma, cap_bytes=cap, cap_rule=rule, seed=seed)
                rep = run_simulation(fleet, cfg, "inproc")
                sent = Counter(u["modality"] for r in rep["rounds"] for u in r["uploads"])
                row = out.setdefault(f"{frac}/{rule}", {"cap_bytes": cap, "runs": []})
                row["runs"].append({"seed": seed, "final_accuracy": rep["final_accuracy"],
                                    "bytes": rep["total_upload_bytes"], "uploads": dict(sent)})
                print(f"seed {seed} cap {cap:>7d} ({frac:g}) {rule:8s} final acc {rep['final_accuracy'] * 100:5.1f}%  "
                      f"bytes {rep['total_upload_bytes'] / 1e6:6.3f} MB  uploads {dict(sorted(sent.items()))}",
                      flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    print(f"\npreset={args.preset}{' + noise' if args.noise else ''} seeds={args.seeds} rounds={args.rounds}; "
          "means over seeds")
    print(f"{'cap':>6s} {'impact acc':>10s} {'priority acc':>12s} {'acc diff':>9s} {'bytes ratio':>11s}")
    for frac in args.fractions:
        a, b = out[f"{frac}/impact"]["runs"], out[f"{frac}/priority"]["runs"]
        acc_a, acc_b = (np.mean([r["final_accuracy"] for r in x]) for x in (a, b))
        by_a, by_b = (np.mean([r["bytes"] for r in x]) for x in (a, b))
        print(f"{frac:6g} {acc_a * 100:9.2f}% {acc_b * 100:11.2f}% {(acc_a - acc_b) * 100:+8.2f}p {by_a / by_b:11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
