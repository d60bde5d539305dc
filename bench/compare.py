"""FedMFS against every baseline and its own sweeps, reported as a paper would (fedmfs.sim.compare).

Every (variant, seed) is one in-process run. Prints, over the seeds, each variant's final accuracy
(mean ± 95% CI, Student t), cumulative upload and byte ratio to `all`, its paired difference to
`all`; each variant's accuracy at equal cumulative upload (the paper's Table II protocol: the last
round that fits the budget; budgets = FedMFS's largest total and half of it) with FedMFS's paired margins
over all, holistic and random; and the project's targets: FedMFS within 1 point of `all` at <= 1/10 of
its bytes (<= 1/20 with int8).

Tuning and reporting never share seeds or windows: choose defaults with `--split validation`
(default seeds 100-104: each client's test windows are dropped and a stratified quarter of its
training windows is held out), then report once with `--split test` (default seeds 0-4).

    python bench/compare.py --split validation --rounds 20 --workers 2        # tuning
    python bench/compare.py --rounds 20 --workers 2 --json cmp.json --plot pareto.png   # reporting
    python bench/compare.py --preset small --rounds 1 --seeds 0 1 --variants fedmfs all --clients 3   # smoke
    python bench/compare.py --load cmp.json --plot pareto.png     # summary and plot of saved runs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedmfs.core.data.synthetic import PRESETS
from fedmfs.sim.compare import (
    REPORTING_SEEDS,
    SPLITS,
    TUNING_SEEDS,
    SyntheticFleet,
    default_variants,
    format_summary,
    load_runs,
    pareto_plot,
    ranking_checks,
    run_grid,
    summarize,
)


def _default_preset() -> str:
    return "headroom" if "headroom" in PRESETS else "small"


def main(argv=None) -> int:
    variants = default_variants()
    names = [v.name for v in variants]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help=f"synthetic preset (default: headroom if defined, else small; "
                                                   f"known now: {', '.join(PRESETS)})")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--split", choices=SPLITS, default="test",
                    help="test: reporting, on the real test windows; validation: tuning, on held-out training windows")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help=f"default: {' '.join(map(str, REPORTING_SEEDS))} with --split test (reporting), "
                         f"{' '.join(map(str, TUNING_SEEDS))} with --split validation (tuning)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="variants to run (default: all of them): " + ", ".join(names))
    ap.add_argument("--clients", type=int, default=None, help="keep only the first N clients (smoke runs)")
    ap.add_argument("--workers", type=int, default=1, help="processes running the grid (one torch thread each)")
    ap.add_argument("--budgets-mb", type=float, nargs="+", default=None,
                    help="equal-bytes budgets in MB (default: FedMFS's largest total upload over the seeds, and half of it)")
    ap.add_argument("--json", type=Path, help="write the runs and the summary here (rewritten after every run)")
    ap.add_argument("--plot", type=Path, help="write the Pareto plot (accuracy vs cumulative MB) here")
    ap.add_argument("--load", type=Path, nargs="+", metavar="JSON",
                    help="summarise the runs of earlier --json files instead of running (several files: their runs "
                         "together; they must share preset, rounds and split, and a (variant, seed) may appear once)")
    args = ap.parse_args(argv)

    meta: dict = {}
    if args.load:
        try:
            runs, meta = load_runs(args.load)
        except ValueError as e:
            ap.error(str(e))
    else:
        chosen = variants
        if args.variants:
            unknown = [n for n in args.variants if n not in names]
            if unknown:
                ap.error(f"unknown variants {unknown}; known: {', '.join(names)}")
            chosen = [v for v in variants if v.name in args.variants]
        preset = args.preset or _default_preset()
        seeds = args.seeds or list(REPORTING_SEEDS if args.split == "test" else TUNING_SEEDS)
        if args.split == "test" and set(seeds) & set(TUNING_SEEDS):
            print(f"warning: reporting on tuning seeds {sorted(set(seeds) & set(TUNING_SEEDS))}", file=sys.stderr)
        if args.split == "validation" and set(seeds) & set(REPORTING_SEEDS):
            print(f"warning: tuning on reporting seeds {sorted(set(seeds) & set(REPORTING_SEEDS))}", file=sys.stderr)
        meta = {"preset": preset, "rounds": args.rounds, "split": args.split, "seeds": seeds,
                "variants": [v.name for v in chosen], "clients": args.clients, "workers": args.workers}
        print(f"preset {preset}, rounds {args.rounds}, split {args.split}, seeds {seeds}, "
              f"{len(chosen)} variants x {len(seeds)} seeds, {args.workers} worker(s)", flush=True)
        done: list[dict] = []

        def on_run(row: dict) -> None:
            done.append(row)
            acc = row["final_accuracy"]
            print(f"  {row['variant']:20s} seed {row['seed']:4d}  final accuracy "
                  f"{'-' if acc is None else f'{acc * 100:6.2f}%'}  upload {row['total_upload_bytes'] / 1e6:8.3f} MB"
                  f"  {row['seconds']:6.1f} s", flush=True)
            if args.json:
                args.json.write_text(json.dumps({"args": meta, "runs": done}, indent=1))

        runs = run_grid(SyntheticFleet(preset, args.clients), chosen, seeds, args.rounds, args.split,
                        workers=args.workers, on_run=on_run)
    budgets = None if args.budgets_mb is None else [b * 1e6 for b in args.budgets_mb]
    summary = summarize(runs, budgets=budgets)
    if meta:
        print(f"\npreset {meta.get('preset')}, clients {meta.get('clients') or 'all'}")
    print(format_summary(summary))
    if args.json:
        args.json.write_text(json.dumps({"args": meta, "runs": runs, "summary": summary}, indent=1))
    preset = meta.get("preset")
    if preset in PRESETS and PRESETS[preset].noise_widths:
        # the default runs' scores against the preset's Shapley truth (noise modalities last?)
        from fedmfs.core.data.synthetic import make_synthetic

        cache: dict[int, dict] = {}

        def metadata_of(seed: int) -> dict:
            if seed not in cache:
                cache[seed] = make_synthetic(preset, seed).metadata
            return cache[seed]

        ranks = ranking_checks(runs, metadata_of)
        summary["ranking"] = ranks
        print("\nModality scores after the last round against the preset's Shapley truth:")
        for name, rk in ranks.items():
            sp = rk["spearman"]
            print(f"  {name:22s} noise below every informative modality at {rk['separated'] * 100:.0f}% of "
                  f"{rk['clients']} client runs; Spearman {sp['mean']:+.3f} ± {sp['ci']:.3f}")
            for miss in rk["misses"]:
                print(f"    miss: {miss}")
        if args.json:
            args.json.write_text(json.dumps({"args": meta, "runs": runs, "summary": summary}, indent=1))
    if args.plot:
        print(f"plot: {pareto_plot(summary, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
