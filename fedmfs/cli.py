"""The ``fedmfs`` command: ``simulate`` a fleet on one machine, ``data`` tools, ``methods``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedmfs.core.aggregation import RULES
from fedmfs.core.errors import ConfigError, FedMFSError
from fedmfs.core.selection import SelectionPolicy
from fedmfs.sim.config import SimConfig, all_methods

__all__ = ["main"]

log = logging.getLogger("fedmfs")


def _simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run FedMFS (or a baseline) on a fleet on this machine and write a report",
        description=(
            "Run federated rounds on one machine and write DIR/report.json, PNG plots (accuracy vs "
            "cumulative MB, Shapley per modality per round, uploads per modality) and summary.md. "
            "Data: a synthetic ActionSense-shaped fleet (--preset) or a fleet directory (--data). "
            "Precedence: command line > --config file > defaults."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML file with the same keys as these options (and a [train] table)")
    p.add_argument("--preset", default=None, help="synthetic data preset: small (fast) or actionsense (paper size) [small]")
    p.add_argument("--data", type=Path, default=None, help="a fleet directory (docs/data.md) instead of a preset")
    d, a = SelectionPolicy(), SimConfig()
    p.add_argument("--method", default=None,
                   help=f"{' | '.join(all_methods())} [{d.method}]; see `fedmfs methods`")
    p.add_argument("--rounds", type=int, default=None, help=f"federated rounds [{a.rounds}]")
    p.add_argument("--gamma", type=int, default=None, help=f"modality models each client uploads per round [{d.gamma}]")
    p.add_argument("--alpha-s", type=float, default=None, help=f"weight of normalised Shapley impact [{d.alphas.s:.3g}]")
    p.add_argument("--alpha-c", type=float, default=None,
                   help=f"weight of (1 - normalised model size) [{d.alphas.c:.3g}]")
    p.add_argument("--alpha-r", type=float, default=None,
                   help=f"weight of recency (rounds since the last upload) [{d.alphas.r:.3g}]")
    p.add_argument("--cap-bytes", type=int, default=None,
                   help="per-device upload cap in bytes per round; selection becomes an exact knapsack [no cap]")
    p.add_argument("--cap-rule", default=None,
                   help=f"what a binding cap maximises: impact (Shapley, recency bonus) | priority (0.1.0) [{d.cap_rule}]")
    p.add_argument("--codec", default=None, help=f"encoding of the uploaded weights: fp32 | fp16 | int8 [{d.codec}]")
    p.add_argument("--seed", type=int, default=None, help=f"seed of data, initial models and training [{a.seed}]")
    p.add_argument("--aggregation", default=None,
                   help=f"per-modality rule on the coordinator: {' | '.join(RULES)} [{a.aggregation}]")
    p.add_argument("--transport", default=None, choices=["inproc", "mqtt"],
                   help="mqtt: the real coordinator and one edge daemon process per client over a broker "
                   "(the bytes in the report are the ones that crossed it); inproc: every client in this "
                   "process, for fast sweeps; both give the same models for the same seed [mqtt; inproc for holistic]")
    p.add_argument("--broker", default=None, help="mqtt://HOST:PORT of an external broker (with --transport mqtt); "
                   "default: an in-process amqtt broker on 127.0.0.1")
    p.add_argument("--out", type=Path, default=None, help="output directory [runs/<method>]")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _resolve(args) -> dict:
    from fedmfs.core.config import check_keys, load_toml, train_config_from
    from fedmfs.sim.config import SIM_KEYS

    conf: dict = {}
    train_table: dict = {}
    if args.config:
        raw = load_toml(args.config)
        train_table = raw.pop("train", {}) if isinstance(raw.get("train", {}), dict) else {}
        check_keys(raw, SIM_KEYS, str(args.config))
        conf.update(raw)
    for k in SIM_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            conf[k] = v
    conf.setdefault("preset", "small")
    if "transport" not in conf:
        # a baseline has no modality uploads for the fleet services: it runs in process
        conf["transport"] = "inproc" if conf.get("method") == "holistic" else "mqtt"
    conf["train"] = train_config_from(train_table, f"{args.config} [train]") if train_table else None
    return conf


def cmd_simulate(args) -> int:
    from fedmfs.core.data import load_fleet, make_synthetic
    from fedmfs.core.selection import Alphas
    from fedmfs.sim.driver import run_simulation
    from fedmfs.sim.report import write_report

    conf = _resolve(args)
    kw = {k: conf[k] for k in ("gamma", "cap_bytes", "codec", "cap_rule", "rounds", "seed", "aggregation") if k in conf}
    if any(f"alpha_{x}" in conf for x in "scr"):
        d = Alphas()
        kw["alphas"] = Alphas(conf.get("alpha_s", d.s), conf.get("alpha_c", d.c), conf.get("alpha_r", d.r))
    if conf["train"] is not None:
        kw["train"] = conf["train"]
    cfg = SimConfig.build(conf.get("method"), **kw)
    out = Path(conf.get("out") or f"runs/{cfg.method}")
    if conf.get("data"):
        fleet = load_fleet(conf["data"])
    else:
        fleet = make_synthetic(conf["preset"], seed=cfg.seed)
    report = run_simulation(fleet, cfg, conf["transport"], conf.get("broker"), progress=not args.quiet)
    path = write_report(report, out, plots=not args.no_plots)
    acc = report["final_accuracy"]
    print(f"final accuracy {'-' if acc is None else f'{acc * 100:.2f}%'}  total upload "
          f"{report['total_upload_bytes'] / 1e6:.3f} MB over {cfg.rounds} rounds  -> {path}")
    return 0


def cmd_methods(args) -> int:
    for k, v in all_methods().items():
        print(f"{k:13s} {v}")
    return 0


def cmd_data(args) -> int:
    from fedmfs.core.data import make_synthetic, save_fleet

    fleet = make_synthetic(args.preset, seed=args.seed)
    d = save_fleet(fleet, args.out)
    print(f"wrote {len(fleet.clients)} clients to {d}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedmfs",
        description="Federated multimodal learning with selective modality communication (FedMFS).",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _simulate_parser(sub)
    m = sub.add_parser("methods", help="list the selection methods and baselines")
    m.set_defaults()
    d = sub.add_parser("data", help="write a synthetic fleet directory (docs/data.md format)")
    d.add_argument("--preset", default="small", help="small or actionsense")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", type=Path, required=True, help="directory to write")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"simulate": cmd_simulate, "methods": cmd_methods, "data": cmd_data}[args.cmd](args)
    except FedMFSError as e:
        print(f"fedmfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:  # bad values from configs / options surface as clear errors
        print(f"fedmfs: error: {e}", file=sys.stderr)
        return ConfigError.exit_code


if __name__ == "__main__":
    sys.exit(main())
