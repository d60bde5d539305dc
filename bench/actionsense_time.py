"""Time of the paper-size preset: FedMFS rounds on the synthetic `actionsense` preset, in process.

Runs ``make_synthetic("actionsense", seed)`` (9 clients, 6 modalities, T = 100, 32x32 tactile grids,
hidden 64) for ``--rounds`` rounds with the default settings over ``--transport inproc``, then the
``small`` preset for 1 round in the same process, and prints:

* the wall time per round (the coordinator's round, opened -> closed, from its ledger; the set-up of
  the services and the report are timed apart);
* per round per client (the in-process fleet trains its clients one after another, so this is one
  client's share of a round on one core);
* the estimate for the paper's 50-round setting: in process (set-up + 50 rounds), and on a fleet of
  real devices that train in parallel (50 x per round per client, one device's compute alone);
* the ratio to the `small` preset per round per client.

The process's CPU time is printed next to the wall time: the two agree when nothing else ran (training
and scoring use one thread), and a gap says the machine was shared during the run.

Rerun: python bench/actionsense_time.py --rounds 2     (several minutes a round on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import time


def _timed_run(preset: str, seed: int, rounds: int) -> dict:
    from fedmfs.core.data import make_synthetic
    from fedmfs.sim.config import SimConfig
    from fedmfs.sim.driver import run_simulation

    t0 = time.perf_counter()
    fleet = make_synthetic(preset, seed)
    gen = time.perf_counter() - t0
    cfg = SimConfig.build(rounds=rounds, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    rep = run_simulation(fleet, cfg, "inproc")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    per_round = [r["seconds"] for r in rep["rounds"]]
    mean_round = sum(per_round) / len(per_round)
    clients = len(fleet.clients)
    return {
        "preset": preset, "seed": seed, "rounds": rounds, "clients": clients,
        "modalities": len(fleet.spec.modalities), "steps": fleet.spec.steps,
        "method": cfg.method, "train": {"epochs": cfg.train.epochs, "shapley_samples": cfg.train.shapley_samples,
                                        "fusion_steps": cfg.train.fusion_steps},
        "generate_seconds": gen, "wall_seconds": wall, "cpu_seconds": cpu, "round_seconds": per_round,
        "setup_and_report_seconds": wall - sum(per_round),
        "seconds_per_round": mean_round, "seconds_per_round_per_client": mean_round / clients,
        "final_accuracy": rep["final_accuracy"], "upload_mb": rep["total_upload_bytes"] / 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the actionsense preset [2]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paper-rounds", type=int, default=50, help="rounds of the paper's setting [50]")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)

    big = _timed_run("actionsense", args.seed, args.rounds)
    small = _timed_run("small", args.seed, 1)
    n = args.paper_rounds
    est_inproc = big["setup_and_report_seconds"] + n * big["seconds_per_round"]
    est_devices = n * big["seconds_per_round_per_client"]
    ratio = big["seconds_per_round_per_client"] / small["seconds_per_round_per_client"]
    for r in (big, small):
        print(f"{r['preset']:12s} {r['clients']} clients, T = {r['steps']}, {r['rounds']} round(s): "
              f"data {r['generate_seconds']:.1f} s, set-up + report {r['setup_and_report_seconds']:.1f} s, "
              f"rounds {', '.join(f'{s:.1f}' for s in r['round_seconds'])} s; CPU time of the run "
              f"{r['cpu_seconds']:.1f} s of {r['wall_seconds']:.1f} s wall")
        print(f"{'':12s} per round {r['seconds_per_round']:.1f} s, per round per client "
              f"{r['seconds_per_round_per_client']:.2f} s")
    print(f"actionsense / small, per round per client: {ratio:.1f}x")
    print(f"paper's {n}-round setting, actionsense preset: in process {est_inproc / 3600:.2f} h "
          f"({est_inproc:.0f} s); on {big['clients']} devices training in parallel ~{est_devices / 60:.1f} min "
          f"of training per device")
    if args.json:
        print(json.dumps({"actionsense": big, "small": small, "ratio_per_round_per_client": ratio,
                          "paper_rounds": n, "estimate_inproc_seconds": est_inproc,
                          "estimate_parallel_devices_seconds": est_devices}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
