"""Compute saving (issue 17 point 4): CPU per round of devices that skip idle modalities, against
devices that train every modality every round, at the accuracy each reaches.

Each device trains alone (``run_simulation(..., pooled=False)``: one model at a time, as a real device
does; the pooled simulator's batched steps would hide the saving, since a step costs about the same
with fewer models in it). The fleet: a family's validation view (tuning seeds only), ``--rounds``
rounds, FedMFS with its defaults and ``[train] idle_every`` = 0 (off) and ``--idle-every``. Printed
per seed and mode: the process's CPU seconds per round, the (device, modality) trainings skipped per
round, the final accuracy; then the mean ratios.

Rerun:  python bench/idle_cpu.py --json bench/results/idle_cpu.json      (about 10 minutes)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def run(preset: str, seed: int, rounds: int, idle_every: int) -> dict:
    import torch

    from fedmfs.core.data import make_synthetic
    from fedmfs.core.settings import TrainConfig
    from fedmfs.sim.config import SimConfig
    from fedmfs.sim.driver import run_simulation

    torch.set_num_threads(1)
    fleet = make_synthetic(preset, seed).validation_view(0.25, seed=seed)
    cfg = SimConfig.build("fedmfs", rounds=rounds, seed=seed, train=TrainConfig(idle_every=idle_every))
    c0 = time.process_time()
    rep = run_simulation(fleet, cfg, "inproc", pooled=False)
    cpu = time.process_time() - c0
    skipped = sum(len(c.get("skipped", [])) for r in rep["rounds"] for c in r["clients"].values())
    return {"seed": seed, "idle_every": idle_every, "cpu_per_round": cpu / rounds, "skipped_per_round": skipped / rounds,
            "final_accuracy": rep["final_accuracy"], "upload_bytes": rep["total_upload_bytes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="noisy")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100, 101])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--idle-every", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for k in (0, args.idle_every):
            r = run(args.preset, seed, args.rounds, k)
            rows.append(r)
            print(f"seed {seed} idle_every {k}: {r['cpu_per_round']:.2f} s CPU/round, {r['skipped_per_round']:.1f} "
                  f"trainings skipped/round, final accuracy {r['final_accuracy'] * 100:.2f}%", flush=True)
    off = [r for r in rows if r["idle_every"] == 0]
    on = [r for r in rows if r["idle_every"] != 0]
    ratio = sum(b["cpu_per_round"] / a["cpu_per_round"] for a, b in zip(off, on)) / len(on)
    diff = sum(b["final_accuracy"] - a["final_accuracy"] for a, b in zip(off, on)) / len(on) * 100
    print(f"\nidle_every {args.idle_every} / off: CPU per round {ratio:.2f}x; final accuracy {diff:+.2f} points "
          f"(mean over seeds {args.seeds})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": rows,
                                         "cpu_ratio": ratio, "accuracy_points": diff}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
