"""Provisioning end to end: `fedmfs-coordinator enrol` on a real Mosquitto run by the example config.

The broker runs systemd/mosquitto-fedmfs.conf (ports and paths rewritten, tests/test_broker_config.py)
over TLS with a CA made here, without anonymous access; its password file holds only the coordinator
at start and its ACL file is the example's without the hand-written device blocks. Two devices are
enrolled with the CLI (password lines, ACL blocks, fleet-file tables, edge.toml), the broker reloads
(SIGHUP), and the real coordinator and edge daemons, as processes, run a whole round from those files.
Then: an anonymous client is refused; a device cannot write under another device's topics; a device
that presents the coordinator's client id does not disconnect the coordinator; a revoked device,
after a broker reload, cannot connect while the other one still can.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FLEET = "kitchen"                      # the fleet the example ACL names
BASE = f"fedmfs/v1/{FLEET}"
COORDINATOR_PASSWORD = "coordinator-secret"


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FEDMFS_BROKER", None)
    p = subprocess.run([sys.executable, "-m", "fedmfs.coordinator.cli", *args], capture_output=True, text=True,
                       timeout=120, env=env)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def _reload(broker, before: int) -> None:
    """SIGHUP, then wait for the broker's log to show one more reload than ``before``."""
    from test_broker_config import _wait

    broker.proc.send_signal(signal.SIGHUP)
    _wait(lambda: broker.log.read_text().count("Reloading config") > before, "the broker to reload")


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("FEDMFS_BROKER", None)
    return subprocess.Popen([sys.executable, "-m", *args, "--exit-when-done", "--connect-timeout", "60"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def test_enrolled_devices_run_a_round_and_nothing_else(tmp_path):
    from test_broker_config import ACL, COORDINATOR_ID, _wait, connect, start_broker

    from fedmfs.coordinator.ledger import Ledger
    from fedmfs.coordinator.provision import password_line
    from fedmfs.core.data.format import Fleet, save_fleet
    from fedmfs.core.data.synthetic import make_synthetic
    from fedmfs.core.settings import TrainConfig
    from fedmfs.edge.config import load_edge_config

    t_start = time.monotonic()
    gw = tmp_path / "gateway"          # what lives on the gateway
    gw.mkdir()
    passwd, acl = gw / "fedmfs.passwd", gw / "fedmfs.acl"
    passwd.write_text(password_line("coordinator", COORDINATOR_PASSWORD) + "\n")
    passwd.chmod(0o640)
    # the example ACL without its hand-written device blocks: the device rules come from enrol
    example = ACL.read_text()
    stripped = re.sub(r"(?m)^user s\d\d\n(topic read [^\n]+\n)+\n?", "", example)
    assert stripped.count("\nuser ") == 1 and "user coordinator\n" in stripped
    acl.write_text(stripped)

    def edit(text: str) -> str:
        text = re.sub(r"(?m)^password_file .*$", f"password_file {passwd}", text)
        return re.sub(r"(?m)^acl_file .*$", f"acl_file {acl}", text)

    (tmp_path / "broker").mkdir()
    broker = start_broker(tmp_path / "broker", edit)
    procs: dict[str, subprocess.Popen] = {}
    clients: list = []
    try:
        ca = broker.pki["ca.crt"]
        # the fleet: two synthetic clients, small settings, one round
        f = make_synthetic("small", 0)
        fleet = Fleet(f.spec, list(f.clients[:2]), f.metadata)
        data = save_fleet(fleet, tmp_path / "data")
        a, b = (c.name for c in fleet.clients)
        _cli("keygen", "--out", str(gw / "coordinator.key"))
        (gw / "coordinator.password").write_text(COORDINATOR_PASSWORD + "\n")
        (gw / "fleet.toml").write_text("[defaults]\ngamma = 2\ncodec = \"fp16\"\n")   # no device yet
        conf = gw / "coordinator.toml"
        conf.write_text(
            f'fleet = "{FLEET}"\nstate_dir = "state"\nspec = {json.dumps(str(data / "fleet.json"))}\n'
            'fleet_file = "fleet.toml"\nsigning_key = "coordinator.key"\nseed = 3\n'
            "[rounds]\ntotal = 1\nseconds = 240\nquorum = 2\n"
            f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\nusername = "coordinator"\n'
            f'password_file = "coordinator.password"\ntls_ca = {json.dumps(str(ca))}\nprotocol = "5"\n'
            f'[provision]\nhost = "127.0.0.1"\npassword_file = "fedmfs.passwd"\nacl_file = "fedmfs.acl"\n')

        # enrol both devices with the CLI; the broker reloads
        for dev in (a, b):
            out = _cli("enrol", dev, "--config", str(conf), "--out", str(tmp_path / "dev" / dev)).stdout
            assert "systemctl reload mosquitto" in out and f"[[device]] id = '{dev}' added" in out, out
        assert (tmp_path / "dev" / a / "edge.password").stat().st_mode & 0o777 == 0o600
        assert passwd.stat().st_mode & 0o777 == 0o640                       # the broker's file keeps its mode
        _reload(broker, 0)

        # the devices' edge.toml as enrol wrote it, with this machine's data, state and small training
        train = TrainConfig(min_steps=0, epochs=1, fusion_steps=10, shapley_samples=5)
        for i, dev in enumerate((a, b)):
            p = tmp_path / "dev" / dev / "edge.toml"
            text = p.read_text()
            for key, value in (("data", data / f"{dev}.npz"), ("spec", data / "fleet.json"),
                               ("state_dir", tmp_path / "edge" / dev)):
                text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {json.dumps(str(value))}", text)
                assert n == 1, key
            text = text.replace("[broker]\n", f"index = {i}\n\n[broker]\n")
            p.write_text(text + "\n[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in asdict(train).items()))
            cfg = load_edge_config(p)
            assert (cfg.device, cfg.fleet, cfg.broker.username, cfg.broker.tls_ca) == \
                   (dev, FLEET, dev, str(tmp_path / "dev" / dev / "ca.crt"))

        # a full round: the coordinator and two edge daemons, as processes, from those files
        (tmp_path / "logs").mkdir()
        procs["coordinator"] = _spawn(["fedmfs.coordinator.cli", "run", "--config", str(conf)],
                                      tmp_path / "logs" / "coordinator.log")
        for dev in (a, b):
            procs[dev] = _spawn(["fedmfs.edge.cli", "run", "--config", str(tmp_path / "dev" / dev / "edge.toml")],
                                tmp_path / "logs" / f"{dev}.log")
        end = time.monotonic() + 480
        while time.monotonic() < end and any(p.poll() is None for p in procs.values()):
            if any(p.poll() not in (None, 0) for p in procs.values()):
                break
            time.sleep(0.5)
        for name, p in procs.items():
            log = (tmp_path / "logs" / f"{name}.log").read_text(errors="replace")
            assert p.poll() == 0, f"{name} exited {p.poll()}:\n{log[-4000:]}"
        round_seconds = time.monotonic() - t_start
        led = Ledger(gw / "state", readonly=True)
        try:
            rounds = led.rounds()
            assert [r.round for r in rounds if r.closed_at is not None] == [0]
            assert {r["device"] for r in led.uploads(0)} == {a, b}
            assert {r.device for r in led.reports(0)} == {a, b}
            assert led.latest_globals(), "no global model after the round"
        finally:
            led.close()
        assert "Denied PUBLISH" not in broker.log.read_text()        # the ACLs from enrol let the round through

        # an anonymous client is refused
        assert connect(broker, None, expect=False).connack[0] == "Not authorized"

        # device a cannot write under device b's topics (the coordinator sees only a's own message)
        pw = {d: (tmp_path / "dev" / d / "edge.password").read_text().strip() for d in (a, b)}
        coord = connect(broker, "coordinator", COORDINATOR_PASSWORD, client_id=COORDINATOR_ID)
        clients.append(coord)
        assert coord.subscribe(f"{BASE}/device/+/#") == "Granted QoS 1"
        time.sleep(0.5)                  # the retained configs and statuses of the round arrive first
        seen = len(coord.messages)
        dev_a = connect(broker, a, pw[a])
        clients.append(dev_a)
        for t in (f"{BASE}/device/{b}/report", f"{BASE}/device/{b}/upload/0/eye", f"{BASE}/device/{b}/status",
                  f"{BASE}/device/{b}/ack", f"{BASE}/round", f"{BASE}/global/eye"):
            assert dev_a.publish(t) == "Not authorized", t
        assert dev_a.publish(f"{BASE}/device/{a}/report") == "Success"
        _wait(lambda: len(coord.messages) > seen, "a's own report")
        time.sleep(0.5)
        assert [m[0] for m in coord.messages[seen:]] == [f"{BASE}/device/{a}/report"]

        # device a presenting the coordinator's client id does not disconnect the coordinator
        rogue = connect(broker, a, pw[a], client_id=COORDINATOR_ID)
        clients.append(rogue)
        assert rogue.publish(f"{BASE}/device/{b}/report") == "Not authorized"
        time.sleep(1.0)
        assert coord.connected.is_set() and not coord.disconnects, coord.disconnects
        assert coord.publish(f"{BASE}/device/{a}/config") == "Success"       # still the coordinator

        # revoke b; after the broker reloads, b is disconnected and cannot connect, and a still can
        live_b = connect(broker, b, pw[b])
        clients.append(live_b)
        out = _cli("revoke", b, "--config", str(conf)).stdout
        assert f"password of {b} removed" in out and f"ACL block of {b} removed" in out, out
        assert f"user {b}\n" not in acl.read_text() and f"id = \"{b}\"" not in (gw / "fleet.toml").read_text()
        reloads = broker.log.read_text().count("Reloading config")
        _reload(broker, reloads)
        _wait(lambda: live_b.disconnects, "the broker to drop b's open connection")
        refused = connect(broker, b, pw[b], expect=False)
        assert refused.connack and refused.connack[0] in ("Bad user name or password", "Not authorized"), \
            refused.connack
        again = connect(broker, a, pw[a])
        clients.append(again)
        assert again.publish(f"{BASE}/device/{a}/report") == "Success"
        print(f"enrol, reload, a round of 2 devices and the refusals: {time.monotonic() - t_start:.0f} s "
              f"(the round part {round_seconds:.0f} s)")
    finally:
        for c in clients:
            try:
                c.stop()
            except Exception:   # already gone
                pass
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        broker.stop()
