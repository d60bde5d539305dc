"""``fedmfs-coordinator``: ``run`` the service, show ``status`` from the ledger, ``keygen`` a signing key,
``enrol`` / ``revoke`` a device (broker credentials, ACL, fleet file: :mod:`.provision`), ``recover`` a
ledger that lost writes (a new fleet epoch: :meth:`.ledger.Ledger.recover`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fedmfs.core.errors import ConfigError, FedMFSError

__all__ = ["main"]


def _status(args) -> int:
    from .config import load_coordinator_config
    from .ledger import Ledger

    state_dir = Path(args.state_dir) if args.state_dir else load_coordinator_config(args.config).state_dir
    led = Ledger(state_dir, readonly=True)
    try:
        if led.problem is not None:      # what it holds is still worth showing; the coordinator will refuse it
            print(f"fedmfs-coordinator: warning: {led.problem}", file=sys.stderr)
        last = led.last_round()
        rounds = led.rounds()
        out = {
            "round": None if last is None else last.round,
            "state": None if last is None else last.state.value,
            "deadline": None if last is None else last.deadline,
            "expected": [] if last is None else list(last.expected),
            "reported": [] if last is None else [r.device for r in led.reports(last.round)],
            "bytes_this_round": {} if last is None else led.bytes_by_device(last.round),
            "bytes_total": led.bytes_by_device(),
            "uploads_total": len(led.uploads()),
            "refusals_total": led.refusal_count(),
            "rounds_closed": sum(1 for r in rounds if r.closed_at is not None),
            "globals": {g["modality"]: {"version": g["version"], "sha256": g["sha256"]} for g in led.latest_globals()},
            "devices": {d["device"]: "online" if d["online"] else "offline" for d in led.devices()},
            # each device's latest round record, as its report carried it, and its latest evaluation
            "records": {rep.device: rep.record.to_dict() for rep in led.reports()},
            "accuracy": {ev.device: {"round": ev.round, "accuracy": ev.accuracy} for ev in led.evaluations()},
        }
    finally:
        led.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if out["round"] is None:
        print("no round yet")
        return 0
    left = max(0.0, out["deadline"] - time.time())
    print(f"round {out['round']} {out['state']}" + (f", {left:.0f} s to the deadline" if out["state"] == "open" else ""))
    print(f"reported {len(out['reported'])}/{len(out['expected'])}: {', '.join(out['reported']) or '-'}")
    waiting = sorted(set(out["expected"]) - set(out["reported"]))
    print(f"waiting for: {', '.join(waiting) or '-'}")
    for d, st in out["devices"].items():
        rec, acc = out["records"].get(d), out["accuracy"].get(d)
        last = (f"  round {rec['round']} chose {','.join(rec['chosen']) or '-'}" if rec else "")
        print(f"  {d:20s} {st:8s} {out['bytes_this_round'].get(d, 0):>10d} B this round "
              f"{out['bytes_total'].get(d, 0):>12d} B total" + last
              + (f", accuracy {acc['accuracy']:.3f} after round {acc['round']}" if acc else ""))
    print("globals: " + ", ".join(f"{m} v{g['version']}" for m, g in out["globals"].items()))
    print(f"{out['uploads_total']} uploads accepted, {out['refusals_total']} refusals, "
          f"{out['rounds_closed']} rounds closed")
    return 0


def _keygen(args) -> int:
    from fedmfs.core.wire import generate_keypair
    from fedmfs.core.wire.signing import write_private_key

    priv, pub = generate_keypair()
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --force to replace it (devices then need the new public key)")
    try:
        write_private_key(out, priv)
        Path(str(out) + ".pub").write_text(pub + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write the key to {out}: {e.strerror or e}; choose a writable --out") from e
    print(f"private key: {out} (mode 600); public key for the devices' edge.toml: {pub}")
    return 0


def _enrol(args) -> int:
    from .config import load_provision_config
    from .provision import RELOAD, enrol

    cfg = load_provision_config(args.config)
    out = args.out if args.out is not None else Path(f"enrol-{args.device}")
    res = enrol(cfg, args.device, out, cert=args.cert)
    for line in res.changed:
        print(f"  {line}")
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"device files in {out}/: {', '.join(p.name for p in res.files)} (secrets mode 600)")
    print(f"copy them to /etc/fedmfs/ on {args.device}, keeping the modes, readable by the service user, e.g.\n"
          f"  scp -p {' '.join(str(p) for p in res.files)} root@{args.device}:/etc/fedmfs/\n"
          "and set data, spec and state_dir in its edge.toml")
    print(RELOAD)
    return 0


def _revoke(args) -> int:
    from .config import load_provision_config
    from .provision import RELOAD, revoke

    res = revoke(load_provision_config(args.config), args.device)
    for line in res.changed:
        print(f"  {line}")
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not res.changed:
        print(f"{args.device}: nothing to revoke (already revoked or never enrolled)")
        return 0
    print(RELOAD)
    return 0


def _recover(args) -> int:
    from .config import load_coordinator_config
    from .ledger import Ledger

    cfg = load_coordinator_config(args.config)
    try:
        os.stat(cfg.state_dir / "ledger.sqlite")
    except FileNotFoundError:
        raise ConfigError(f"no ledger in {cfg.state_dir}: nothing to recover (check state_dir in {args.config})") from None
    except OSError:
        pass                             # Ledger says what is wrong
    led = Ledger(cfg.state_dir, check_mark=False)
    try:
        fleet = led.get_meta("fleet")
        if fleet is not None and fleet != cfg.fleet:
            raise ConfigError(f"state_dir {cfg.state_dir} belongs to fleet {fleet!r}, not {cfg.fleet!r}; "
                              f"recover it with that fleet's coordinator.toml")
        if led.problem is not None:
            print(f"found: {led.problem}")
        else:
            print(f"found no lost writes: the ledger {led.path} holds {led.seq} commits, as {led.mark_path} "
                  "recorded; a new fleet epoch still makes every device drop its round bookkeeping")
        if not args.yes:
            if not sys.stdin.isatty():
                raise ConfigError("recover starts a new fleet epoch and changes the ledger; run it again with --yes "
                                  "to confirm (stop the coordinator first)")
            if input("start a new fleet epoch? [y/N] ").strip().lower() not in ("y", "yes"):
                print("nothing changed")
                return 1
        rec = led.recover()
    finally:
        led.close()
    lost = "" if rec.marked is None or rec.marked <= rec.seq else f" ({rec.marked - rec.seq} lost commits accepted)"
    print(f"new fleet epoch {rec.epoch} (was {rec.old_epoch or 'none'}); high-water mark reset to the ledger's "
          f"{rec.seq + 1} commits{lost}")
    r = 0 if rec.last is None else rec.last.round
    at = "round 0, which it opens" if rec.last is None else f"round {r} ({rec.last.state.value})"
    print(f"when the coordinator starts it resumes at {at} and signs its round, configs and globals with the new "
          "epoch. Each device that sees the later epoch takes it as a re-created fleet: it drops its round "
          "bookkeeping (reported round, pending upload, evaluations) and follows the coordinator from "
          f"round {r}; its local models stay. Uploads and reports of the lost commits are made again.")
    print("start it: systemctl start fedmfs-coordinator")
    return 0


def _run(args) -> int:
    from .config import load_coordinator_config
    from .service import CoordinatorService

    cfg = load_coordinator_config(args.config)
    logging.getLogger().setLevel(args.log_level or cfg.log_level)
    return CoordinatorService(cfg, exit_when_done=args.exit_when_done).run(connect_timeout=args.connect_timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmfs-coordinator", description="The fedmfs coordinator (rounds over MQTT).")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the coordinator service")
    r.add_argument("--config", required=True, type=Path, help="coordinator.toml (see examples/coordinator.toml)")
    r.add_argument("--exit-when-done", action="store_true", help="exit once the last round closed (simulations)")
    r.add_argument("--connect-timeout", type=float, default=300.0, help="seconds to reach the broker at start")
    r.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (overrides the file)")
    s = sub.add_parser("status", help="current round, who reported, bytes (reads the ledger)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", type=Path)
    g.add_argument("--state-dir", type=Path)
    s.add_argument("--json", action="store_true")
    k = sub.add_parser("keygen", help="create the Ed25519 key that signs global models")
    k.add_argument("--out", required=True, type=Path)
    k.add_argument("--force", action="store_true")
    e = sub.add_parser("enrol", help="give a device broker credentials, its ACL block and a ready edge.toml")
    e.add_argument("device", help="the device id (its broker user name and edge.toml `device`)")
    e.add_argument("--config", required=True, type=Path, help="coordinator.toml, with a [provision] table")
    e.add_argument("--out", type=Path, default=None, help="directory for the device's files (./enrol-DEVICE)")
    e.add_argument("--cert", action="store_true", help="also a client certificate from the fleet CA "
                   "([provision] ca_key, ca_cert, crl_file)")
    v = sub.add_parser("revoke", help="remove a device's broker credentials, ACL block and fleet-file table")
    v.add_argument("device")
    v.add_argument("--config", required=True, type=Path)
    c = sub.add_parser("recover", help="accept a ledger that lost writes (its high-water mark is ahead): start a new "
                       "fleet epoch that devices follow from the ledger's round")
    c.add_argument("--config", required=True, type=Path)
    c.add_argument("--yes", action="store_true", help="do it without asking")
    args = p.parse_args(argv)
    # journald adds its own timestamps; keep lines short
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"run": _run, "status": _status, "keygen": _keygen, "enrol": _enrol,
                "revoke": _revoke, "recover": _recover}[args.cmd](args)
    except FedMFSError as e:
        print(f"fedmfs-coordinator: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
