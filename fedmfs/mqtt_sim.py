"""``fedmfs simulate --transport mqtt``: the real coordinator and one edge daemon process per client
over a broker (an in-process amqtt broker by default, or an external one), on one machine.

The result is the in-process engine's report (:func:`fedmfs.engine.run_simulation`) rebuilt from the
coordinator's ledger and the devices' state directories, plus the bytes that crossed the broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from fedmfs.data.format import Fleet, save_fleet
from fedmfs.errors import FedMFSError
from fedmfs.payload import decode_model, state_digest
from fedmfs.protocol import Topics, decode_global, generate_keypair
from fedmfs.report import report_envelope

__all__ = ["run_mqtt_simulation", "EmbeddedBroker", "write_fleet_configs"]

log = logging.getLogger("fedmfs.mqtt_sim")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """An amqtt broker on 127.0.0.1 in a background thread (so `fedmfs simulate` needs nothing installed)."""

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt", daemon=True)
        self._broker = None

    def start(self, timeout: float = 20.0) -> "EmbeddedBroker":
        try:
            from amqtt.broker import Broker
        except ImportError as e:
            raise FedMFSError("the embedded broker needs amqtt (pip install fedmfs[broker]); "
                              "or pass --broker mqtt://HOST:PORT") from e
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self._loop.set_exception_handler(lambda loop, ctx: log.debug("amqtt: %s", ctx.get("message")))
        # loopback only, anonymous (nothing leaves this machine); no $SYS, no packet logging
        cfg = {"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 0}},
               "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
        self._thread.start()

        async def _start():
            self._broker = Broker(cfg, loop=self._loop)
            await self._broker.start()

        asyncio.run_coroutine_threadsafe(_start(), self._loop).result(timeout)
        return self

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 20.0) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout)
            except Exception as e:  # shutting down anyway
                log.warning("amqtt shutdown: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


def write_fleet_configs(fleet: Fleet, cfg, work: Path, broker_url: str, fleet_name: str,
                        round_seconds: float = 3600.0, chunk_bytes: int = 64 * 1024,
                        protocol: str = "auto") -> dict:
    """Write data, keys, coordinator.toml, fleet.toml and one edge.toml per client under ``work``."""
    data = save_fleet(fleet, work / "data")
    priv, pub = generate_keypair()
    (work / "coordinator.key").write_text(priv + "\n")
    os.chmod(work / "coordinator.key", 0o600)
    tq = lambda s: json.dumps(str(s))   # a TOML basic string
    lines = ["[defaults]", f"gamma = {cfg.gamma}", f"alpha_s = {cfg.alphas.s}", f"alpha_c = {cfg.alphas.c}",
             f"alpha_r = {cfg.alphas.r}", f"codec = {tq(cfg.train.codec)}", f"method = {tq(cfg.method)}"]
    if cfg.cap_bytes is not None:
        lines.append(f"cap_bytes = {cfg.cap_bytes}")
    for c in fleet.clients:
        lines += ["", "[[device]]", f"id = {tq(c.name)}"]
    (work / "fleet.toml").write_text("\n".join(lines) + "\n")
    (work / "coordinator.toml").write_text(
        f"fleet = {tq(fleet_name)}\nstate_dir = \"coordinator\"\nspec = {tq(data / 'fleet.json')}\n"
        f"fleet_file = \"fleet.toml\"\nsigning_key = \"coordinator.key\"\nseed = {cfg.seed}\n"
        f"[rounds]\ntotal = {cfg.rounds}\nseconds = {round_seconds}\nquorum = {len(fleet.clients)}\n"
        f"chunk_bytes = {chunk_bytes}\n[broker]\nurl = {tq(broker_url)}\nprotocol = {tq(protocol)}\n")
    train = "\n".join(f"{k} = {json.dumps(v)}" for k, v in asdict(cfg.train).items())
    edges = {}
    for i, c in enumerate(fleet.clients):
        p = work / f"edge-{c.name}.toml"
        p.write_text(f"device = {tq(c.name)}\nfleet = {tq(fleet_name)}\ndata = {tq(data / (c.name + '.npz'))}\n"
                     f"spec = {tq(data / 'fleet.json')}\nstate_dir = {tq(work / 'edge' / c.name)}\n"
                     f"coordinator_key = {tq(pub)}\nseed = {cfg.seed}\nindex = {i}\nack_timeout = 10.0\n"
                     f"[broker]\nurl = {tq(broker_url)}\nprotocol = {tq(protocol)}\n[train]\n{train}\n")
        edges[c.name] = p
    return {"coordinator": work / "coordinator.toml", "edges": edges, "public_key": pub}


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    f = open(log_path, "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=f, env=env)


def _closed_rounds(work: Path) -> int:
    """Rounds the coordinator has closed so far (read-only look at its ledger; 0 if not there yet)."""
    from fedmfs.coordinator.ledger import Ledger

    path = work / "coordinator"
    if not (path / "ledger.sqlite").exists():
        return 0
    try:
        led = Ledger(path, readonly=True)
        try:
            return sum(1 for r in led.rounds() if r.closed_at is not None)
        finally:
            led.db.close()
    except Exception:  # the ledger is being created or migrated: ask again on the next tick
        return 0


def run_mqtt_simulation(fleet: Fleet, config, broker_url: str | None = None, workdir: str | Path | None = None,
                        timeout: float = 3600.0, chunk_bytes: int = 64 * 1024, progress: bool = False) -> dict:
    """Run ``config`` (a :class:`fedmfs.engine.SimConfig`) over MQTT; return the engine-shaped report.

    ``broker_url`` None starts an embedded amqtt broker. ``workdir`` (default: a temporary directory,
    kept when the run fails) receives the configs, the ledger, the device state and the logs.
    """
    if config.method == "holistic":
        raise FedMFSError("the holistic baseline has no modality uploads: run it with --transport inproc")
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedmfs-mqtt-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    broker = None
    if broker_url is None:
        broker = EmbeddedBroker().start()
        broker_url = broker.url
    fleet_name = f"sim-{uuid.uuid4().hex[:8]}"
    # amqtt speaks MQTT 3.1.1 only: skip the MQTT 5 attempt there
    files = write_fleet_configs(fleet, config, work, broker_url, fleet_name, chunk_bytes=chunk_bytes,
                                protocol="3.1.1" if broker is not None else "auto")
    procs: dict[str, subprocess.Popen] = {}
    t0 = time.monotonic()
    try:
        procs["coordinator"] = _spawn(["fedmfs.coordinator.cli", "run", "--config", str(files["coordinator"]),
                                       "--exit-when-done", "--connect-timeout", "60"], work / "logs" / "coordinator.log")
        for name, p in files["edges"].items():
            procs[name] = _spawn(["fedmfs.edge.cli", "run", "--config", str(p), "--exit-when-done",
                                  "--connect-timeout", "60"], work / "logs" / f"edge-{name}.log")
        end = time.monotonic() + timeout
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.rounds, desc=f"{config.method} over MQTT", unit="round", leave=False)
        last_poll = 0.0
        while time.monotonic() < end and any(p.poll() is None for p in procs.values()):
            bad = {n: p.returncode for n, p in procs.items() if p.poll() not in (None, 0)}
            if bad:
                raise FedMFSError(f"processes failed: {bad}; logs in {work / 'logs'}")
            if bar is not None and time.monotonic() - last_poll > 1.0:
                last_poll = time.monotonic()
                bar.update(max(0, min(config.rounds, _closed_rounds(work)) - bar.n))
            time.sleep(0.2)
        if bar is not None:
            bar.update(config.rounds - bar.n)
            bar.close()
        if any(p.poll() is None for p in procs.values()):
            raise FedMFSError(f"the MQTT simulation did not finish within {timeout:.0f} s; logs in {work / 'logs'}")
        bad = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
        if bad:
            raise FedMFSError(f"processes failed: {bad}; logs in {work / 'logs'}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        _clear_retained(broker_url, fleet_name, fleet)
        if broker is not None:
            broker.stop()
    report = build_report(fleet, config, work)
    report["wall_seconds"] = time.monotonic() - t0
    report["workdir"] = str(work)
    report["broker"] = "embedded amqtt" if broker is not None else broker_url
    return report


def _clear_retained(broker_url: str, fleet_name: str, fleet: Fleet) -> None:
    """Leave an external broker as we found it: empty retained messages clear ours."""
    try:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from fedmfs.mqtt import parse_broker_url

        b = parse_broker_url(broker_url)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{fleet_name}-cleanup", protocol=mqtt.MQTTv311)
        if b.username:
            c.username_pw_set(b.username, b.password)
        c.connect(b.host, b.port)
        c.loop_start()
        t = Topics(fleet_name)
        topics = [t.round()] + [t.global_model(m) for m in fleet.spec.names]
        for d in fleet.clients:
            topics += [t.config(d.name), t.status(d.name)]
        infos = [c.publish(x, b"", 1, True) for x in topics]
        for i in infos:
            i.wait_for_publish(5)
        c.disconnect()
        c.loop_stop()
    except Exception as e:  # cleanup is best effort
        log.warning("could not clear retained messages: %s", e)


def build_report(fleet: Fleet, config, work: Path) -> dict:
    """The engine's report shape from the coordinator ledger and the devices' history files."""
    from fedmfs.coordinator.ledger import Ledger

    led = Ledger(work / "coordinator", readonly=True)
    try:
        rounds_rows = led.rounds()
        uploads = led.uploads()
        histories = {c.name: json.loads((work / "edge" / c.name / "history.json").read_text()) for c in fleet.clients}
        digests = {}
        for g in led.latest_globals():
            _, payload = decode_global(led.global_frame(g), None)
            digests[g["modality"]] = state_digest(decode_model(payload)[1])
        refusals = led.refusals()
    finally:
        led.close()
    versions = {m: 0 for m in fleet.spec.names}
    order = {c.name: i for i, c in enumerate(fleet.clients)}
    cumulative = 0
    rounds = []
    wire_total = 0
    for rr in rounds_rows:
        r = rr.round
        ups = [u for u in uploads if u["round"] == r]
        for m in rr.aggregated:
            versions[m] += 1
        accs = {n: h[str(r)]["accuracy"] for n, h in histories.items() if "accuracy" in h.get(str(r), {})}
        nbytes = sum(u["nbytes"] for u in ups)
        cumulative += nbytes
        wire = sum(h.get(str(r), {}).get("wire_bytes", 0) for h in histories.values())
        wire_total += wire
        per_client = {}
        for n, h in histories.items():
            x = h.get(str(r), {})
            per_client[n] = {"shapley": x.get("shapley"), "sizes": x.get("sizes"), "priorities": x.get("priorities"),
                             "choice": x.get("choice"), "stage1_accuracy": x.get("stage1_accuracy"),
                             "acks": x.get("acks")}
        rounds.append({
            "round": r,
            "accuracy": float(sum(accs.values()) / len(accs)) if accs else None,
            "client_accuracy": accs,
            "uploads": [{"device": u["device"], "modality": u["modality"], "bytes": u["nbytes"]}
                        for u in sorted(ups, key=lambda u: (order[u["device"]], fleet.spec.index(u["modality"])))],
            "upload_bytes": nbytes,
            "cumulative_bytes": cumulative,
            "aggregated": dict(rr.aggregated),
            "clients": per_client,
            "global_versions": dict(versions),
            "seconds": (rr.closed_at - rr.opened_at) if rr.closed_at else None,
            "wire_bytes": wire,
            "refusals": [x for x in refusals if x["round"] == r],
        })
    total = int(sum(r["upload_bytes"] for r in rounds))
    return report_envelope(fleet, config, rounds, digests, "mqtt", wire_bytes=wire_total,
                           wire_over_payload=(wire_total / total) if total else None)
