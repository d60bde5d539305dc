"""``fedmfs simulate --transport mqtt``: the real coordinator and one edge daemon process per client
over a broker (an in-process amqtt broker by default, or an external one), on one machine.

The configs it writes (:func:`write_fleet_configs`) are the ones ``--transport inproc`` runs too; the
report is built from the coordinator's ledger by :func:`fedmfs.sim.report.build_report`, as for inproc.
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

from fedmfs.adapters.mqtt import parse_broker_url, redact_url, strip_password
from fedmfs.core.data.format import Fleet, save_fleet
from fedmfs.core.errors import FedMFSError
from fedmfs.core.wire import Topics, generate_keypair
from fedmfs.core.wire.signing import write_private_key
from fedmfs.sim.config import SimConfig
from fedmfs.sim.report import build_report

__all__ = ["run_mqtt_simulation", "EmbeddedBroker", "write_fleet_configs"]

log = logging.getLogger("fedmfs.sim.processes")


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

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
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


def write_fleet_configs(fleet: Fleet, cfg: SimConfig, work: Path, broker_url: str, fleet_name: str,
                        round_seconds: float = 3600.0, chunk_bytes: int = 64 * 1024,
                        protocol: str = "auto") -> dict:
    """Write data, keys, coordinator.toml, fleet.toml and one edge.toml per client under ``work``: the
    fleet both transports run (the selection policy in the fleet file, as an operator would write it)."""
    data = save_fleet(fleet, work / "data")
    priv, pub = generate_keypair()
    write_private_key(work / "coordinator.key", priv)
    tq = lambda s: json.dumps(str(s))   # a TOML basic string
    # a password in the URL goes to a file only the owner reads, never into a config or a command line
    password = parse_broker_url(broker_url).password
    broker = f"[broker]\nurl = {tq(strip_password(broker_url))}\nprotocol = {tq(protocol)}\n"
    if password is not None:
        _write_private_text(work / "broker.password", password + "\n")
        broker += f"password_file = {tq('broker.password')}\n"
    lines = ["[defaults]"] + [f"{k} = {json.dumps(v)}" for k, v in cfg.policy.to_dict().items() if v is not None]
    for c in fleet.clients:
        lines += ["", "[[device]]", f"id = {tq(c.name)}"]
    (work / "fleet.toml").write_text("\n".join(lines) + "\n")
    (work / "coordinator.toml").write_text(
        f"fleet = {tq(fleet_name)}\nstate_dir = \"coordinator\"\nspec = {tq(data / 'fleet.json')}\n"
        f"fleet_file = \"fleet.toml\"\nsigning_key = \"coordinator.key\"\nseed = {cfg.seed}\n"
        f"[rounds]\ntotal = {cfg.rounds}\nseconds = {round_seconds}\nquorum = {len(fleet.clients)}\n"
        f"chunk_bytes = {chunk_bytes}\naggregation = {tq(cfg.aggregation)}\n" + broker)
    train = "\n".join(f"{k} = {json.dumps(v)}" for k, v in asdict(cfg.train).items())
    edges = {}
    for i, c in enumerate(fleet.clients):
        p = work / f"edge-{c.name}.toml"
        p.write_text(f"device = {tq(c.name)}\nfleet = {tq(fleet_name)}\ndata = {tq(data / (c.name + '.npz'))}\n"
                     f"spec = {tq(data / 'fleet.json')}\nstate_dir = {tq(work / 'edge' / c.name)}\n"
                     f"coordinator_key = {tq(pub)}\nseed = {cfg.seed}\nindex = {i}\nack_timeout = 10.0\n"
                     + broker + f"[train]\n{train}\n")
        edges[c.name] = p
    return {"coordinator": work / "coordinator.toml", "edges": edges, "public_key": pub}


def _write_private_text(path: Path, text: str) -> None:
    """``text`` into ``path`` with mode 600 from the start (also over an existing, looser file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def _spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    f = open(log_path, "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("FEDMFS_BROKER", None)    # the configs name the run's broker; the environment must not override it
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


def run_mqtt_simulation(fleet: Fleet, config: SimConfig, broker_url: str | None = None, workdir: str | Path | None = None,
                        timeout: float = 3600.0, chunk_bytes: int = 64 * 1024, progress: bool = False) -> dict:
    """Run ``config`` over MQTT: the coordinator and one edge daemon process per client; return the report.

    ``broker_url`` None starts an embedded amqtt broker. ``workdir`` (default: a temporary directory,
    kept when the run fails) receives the configs, the ledger, the device state and the logs.
    """
    if config.baseline is not None:
        raise FedMFSError(f"the {config.baseline} baseline has no modality uploads: run it with --transport inproc")
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
    report = build_report(fleet, config, work / "coordinator", "mqtt")
    report["wall_seconds"] = time.monotonic() - t0
    report["workdir"] = str(work)
    report["broker"] = "embedded amqtt" if broker is not None else redact_url(broker_url)
    return report


def _clear_retained(broker_url: str, fleet_name: str, fleet: Fleet) -> None:
    """Leave an external broker as we found it: empty retained messages clear ours."""
    try:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

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
