"""Do the modality scores rank pure noise last? A fleet with pure-noise modalities of several widths
next to the informative ones (fedmfs.core.data.synthetic.add_noise_modalities), run through the real
round (the in-process driver), scored by each scoring rule.

Prints, per rule, after the last round: the share of clients whose every noise modality scores below
every informative one, the mean Spearman correlation of the informative modalities' scores with the
generator's ground truth, the share of uploads that were noise, and the final accuracy.

    python bench/noise_scores.py --seed 100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from fedmfs.core.data.synthetic import PRESETS, add_noise_modalities, make_synthetic
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.compare import client_ranking
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_simulation

RULES = {
    "paper (train, |phi| prob)": dict(score_on="train", value_kind="prob"),
    "holdout, gain": dict(score_on="holdout", value_kind="gain"),
    "crossfit, gain": dict(score_on="crossfit", value_kind="gain"),
    "crossfit, gain_lcb": dict(score_on="crossfit", value_kind="gain_lcb"),
    "crossfit, gain_lcb, 100 steps": dict(score_on="crossfit", value_kind="gain_lcb", min_steps=100),
    "crossfit, gain_lcb, 100 steps, es": dict(score_on="crossfit", value_kind="gain_lcb", min_steps=100, patience=3),
    "crossfit, gain, 100 steps, es": dict(score_on="crossfit", value_kind="gain", min_steps=100, patience=3),
    "crossfit, gain, 100 steps, es, ema": dict(score_on="crossfit", value_kind="gain", min_steps=100, patience=3,
                                               score_smoothing=0.6),
    "crossfit, gain_lcb, 100 steps, es, ema": dict(score_on="crossfit", value_kind="gain_lcb", min_steps=100,
                                                   patience=3, score_smoothing=0.6),
    "paper, 100 steps, es": dict(score_on="train", value_kind="prob", min_steps=100, patience=3),
}


def evaluate(rep: dict, noise: set[str], truth: dict[str, dict[str, float]] | list[str]) -> dict:
    """Separation, Spearman against the truth (per client: a dict of Shapley truths per client, or
    one informativeness order), noise uploads, final accuracy, and every client's worst pair."""
    last = rep["rounds"][-1]["clients"]
    separated, rhos, misses = [], [], []
    for name, c in last.items():
        s = c["shapley"]
        ref = truth[name] if isinstance(truth, dict) else {m: -truth.index(m) for m in s if m not in noise}
        ok, miss, rho = client_ranking(s, noise, ref)
        separated.append(bool(ok))
        if miss:
            misses.append(f"{name}: {miss}")
        if rho is not None:
            rhos.append(rho)
    ups = [u["modality"] for r in rep["rounds"] for u in r["uploads"]]
    return {"separated": float(np.mean(separated)), "spearman": float(np.mean(rhos)),
            "noise_uploads": sum(m in noise for m in ups) / max(1, len(ups)),
            "final_accuracy": rep["final_accuracy"], "misses": misses}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=100, help="data and run seed (100+: tuning seeds)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", default="small",
                    help="a preset with noise built in (headroom, noisy: Spearman against its Shapley truth) or one to "
                         "add noise to")
    ap.add_argument("--widths", type=int, nargs="+", default=[3, 16, 64, 256])
    ap.add_argument("--rules", nargs="*", default=list(RULES), help="which scoring rules (names above)")
    ap.add_argument("--split", choices=("validation", "test"), default="validation",
                    help="where the accuracy column is measured: a held-out quarter of the training windows "
                         "(validation, for choosing defaults) or the test windows")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    if PRESETS[args.preset].noise_widths:
        # noise modalities built in (headroom, the noisy family), a per-client truth
        fleet = make_synthetic(args.preset, args.seed)
        meta = fleet.metadata
        noise = set(meta["noise_modalities"])
        truth: dict | list = meta["shapley_truth"]
    else:
        fleet = add_noise_modalities(make_synthetic(args.preset, args.seed), tuple(args.widths), seed=args.seed)
        meta = fleet.metadata
        noise = set(meta["noise_modalities"]) | {m for m, c in meta["encoded_classes"].items() if not c}
        truth = [m for m in meta["informativeness_order"] if m not in noise]
    if args.split == "validation":
        fleet = fleet.validation_view(0.25, seed=args.seed)
    out = {}
    for name in args.rules:
        t0 = time.perf_counter()
        cfg = SimConfig.build("fedmfs", rounds=args.rounds, seed=args.seed, train=TrainConfig(**RULES[name]))
        rep = run_simulation(fleet, cfg, "inproc")
        out[name] = evaluate(rep, noise, truth) | {"seconds": time.perf_counter() - t0}
        r = out[name]
        print(f"{name:28s} separated {r['separated']:5.2f}  spearman {r['spearman']:+.3f}  noise uploads "
              f"{r['noise_uploads']:5.2f}  final acc {r['final_accuracy'] * 100:5.1f}%  ({r['seconds']:.0f} s)",
              flush=True)
        for miss in r["misses"]:
            print(f"    {miss}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
