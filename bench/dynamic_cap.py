"""Dynamic bandwidth against a fixed cap, on a fleet with mixed link speeds (issue 17 point 4).

The real services over a real Mosquitto (the fault tests' harness, `tests/faults/harness.py`): one
coordinator process and one `fedmfs-edge run` process per device, each device through its own loopback
TCP proxy (`tests/faults/proxy.py`; no tc netem here). ``--slow`` devices' links are paced at ``--rate``
bytes/s both ways, the others are plain loopback. The same fleet, seed and policy run twice:

* **fixed**: every device's cap is ``--cap`` bytes a round (the coordinator's fleet file);
* **dynamic**: the same cap and ``upload_seconds = --upload-seconds``: a device that has measured its
  link (the rate its fetched global chunks arrived at) caps its round at rate x upload_seconds.

Printed per round and mode: how long the round stayed open (opened -> closed in the coordinator's
ledger: the fleet waits for its slowest device), the bytes uploaded, the mean accuracy; then the time
to finish the run and the final accuracy, as ratios dynamic / fixed.

Rerun:  python bench/dynamic_cap.py --json bench/results/dynamic_cap.json      (about 10 minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))     # the fault tests' harness and proxy


def run_mode(mode: str, args, work: Path) -> dict:
    from faults.harness import FleetRun, Mosquitto, small_fleet

    from fedmfs.core.settings import TrainConfig
    from fedmfs.sim.config import SimConfig

    fleet = small_fleet(tuple(args.clients))
    kw = {"upload_seconds": args.upload_seconds} if mode == "dynamic" else {}
    cfg = SimConfig.build("fedmfs", rounds=args.rounds, seed=args.seed, gamma=args.gamma, cap_bytes=args.cap,
                          train=TrainConfig(), **kw)
    broker = Mosquitto(work / "broker").start()
    run = FleetRun(work / "run", fleet, cfg, broker, round_seconds=args.deadline)
    slow = [fleet.clients[i].name for i in range(len(fleet.clients)) if i in args.slow]
    try:
        for d in slow:
            run.proxies[d].set("both", rate=args.rate)
        t0 = time.monotonic()
        run.start_all()
        run.wait_done(timeout=args.rounds * args.deadline + 600, stall=args.deadline + 120, what=f"the {mode} run")
        wall = time.monotonic() - t0
        rep = run.report()
    finally:
        run.close()
        broker.close()
    rounds = [{"round": r["round"], "seconds": r.get("seconds"), "upload_bytes": r["upload_bytes"],
               "accuracy": r["accuracy"],
               "slow_uploads": sorted(f"{u['device']}:{u['modality']}" for u in r["uploads"] if u["device"] in slow)}
              for r in rep["rounds"]]
    return {"mode": mode, "slow_devices": slow, "wall_seconds": wall, "rounds": rounds,
            "open_seconds": sum(r["seconds"] or 0.0 for r in rounds), "final_accuracy": rep["final_accuracy"],
            "upload_bytes": rep["total_upload_bytes"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[0, 1, 2, 6],
                    help="indices of the small preset's clients [0 1 2 6: S00 S02 S03 S07]")
    ap.add_argument("--slow", type=int, nargs="+", default=[0, 2], help="which of them sit behind a slow link [0 2]")
    ap.add_argument("--rate", type=int, default=8 * 1024, help="the slow links' bytes/s, both ways [8192]")
    ap.add_argument("--cap", type=int, default=200_000, help="every device's fixed cap, bytes a round [200000]")
    ap.add_argument("--upload-seconds", type=float, default=4.0, help="the dynamic mode's time budget [4]")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=300.0, help="a round's deadline, seconds [300]")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    out = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="fedmfs-dyncap-") as tmp:
        for mode in ("fixed", "dynamic"):
            res = run_mode(mode, args, Path(tmp) / mode)
            out["runs"][mode] = res
            print(f"{mode}: {res['wall_seconds']:.1f} s for {args.rounds} rounds, rounds open {res['open_seconds']:.1f} s, "
                  f"{res['upload_bytes'] / 1e6:.3f} MB, final accuracy {res['final_accuracy'] * 100:.2f}%", flush=True)
    f, d = out["runs"]["fixed"], out["runs"]["dynamic"]
    print(f"\nslow devices {f['slow_devices']} at {args.rate} B/s; cap {args.cap} B; upload_seconds {args.upload_seconds}")
    print(f"{'round':>5s} | {'fixed: open s':>13s} {'MB':>7s} {'acc %':>6s} | "
          f"{'dynamic: open s':>15s} {'MB':>7s} {'acc %':>6s} | slow devices' uploads (fixed / dynamic)")
    for a, b in zip(f["rounds"], d["rounds"]):
        print(f"{a['round']:5d} | {a['seconds'] or 0:13.1f} {a['upload_bytes'] / 1e6:7.3f} {a['accuracy'] * 100:6.2f} | "
              f"{b['seconds'] or 0:15.1f} {b['upload_bytes'] / 1e6:7.3f} {b['accuracy'] * 100:6.2f} | "
              f"{','.join(a['slow_uploads'])} / {','.join(b['slow_uploads'])}")
    out["ratios"] = {"open_seconds": d["open_seconds"] / f["open_seconds"],
                     "wall_seconds": d["wall_seconds"] / f["wall_seconds"],
                     "upload_bytes": d["upload_bytes"] / f["upload_bytes"],
                     "final_accuracy_points": (d["final_accuracy"] - f["final_accuracy"]) * 100}
    r = out["ratios"]
    print(f"\ndynamic / fixed: rounds open {r['open_seconds']:.2f}x, the whole run {r['wall_seconds']:.2f}x, "
          f"bytes {r['upload_bytes']:.2f}x; final accuracy {r['final_accuracy_points']:+.2f} points")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
