"""Fault-injection harness: a Mosquitto broker that can be stopped and restarted on its port (with or
without persistence), the coordinator and edge daemons as real processes (configs from
:func:`fedmfs.sim.processes.write_fleet_configs`, a device's broker URL pointing at its
:class:`~faults.proxy.FaultProxy`), kill -9 / SIGTERM / SIGSTOP and restart, a bounded wait that fails
fast (a process that exits non-zero, no progress in the ledger for too long, a watcher's verdict), and
the checks against a fault-free in-process run of the same seed (globals, uploads, the ledger)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults.proxy import FaultProxy
from netutil import free_port, wait_port

from fedmfs.coordinator.ledger import Ledger
from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.config import SimConfig
from fedmfs.sim.processes import build_report, write_fleet_configs

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

# fast local training (as tests/edge/test_edge_mqtt.py): a round trains in a few seconds
TRAIN = TrainConfig(min_steps=0, epochs=1, fusion_steps=20, shapley_samples=10)
CFG = SimConfig.build(rounds=2, gamma=2, seed=2, train=TRAIN)
CHUNK = 8192     # uploads of 21-152 KB and globals span 3-19 chunks


def small_fleet(indices=(0, 1, 6)) -> Fleet:
    """Clients of the synthetic "small" preset: S00, S02 and S07 by default (S07 lacks both tactile
    modalities, yet needs every global to train: the round lists them all)."""
    f = make_synthetic("small", 0)
    return Fleet(f.spec, [f.clients[i] for i in indices], f.metadata)


# -- the broker --------------------------------------------------------------------------------------

class Mosquitto:
    """A Mosquitto on a fixed 127.0.0.1 port that can be stopped (SIGTERM: it saves its persistence
    DB), killed (SIGKILL: it does not) and started again on the same port."""

    def __init__(self, directory: Path, persistence: bool = False, autosave_interval: int = 1800):
        if not Path(MOSQUITTO).exists():
            pytest.skip("mosquitto is not installed (Debian package mosquitto)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 100000",
                 f"log_dest file {self.log}", "log_type error", "log_type warning", "log_type notice",
                 "log_type information", "connection_messages true"]
        if self.persistence:
            (self.dir / "db").mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.dir / 'db'}/",
                      f"autosave_interval {self.autosave_interval}"]
        else:
            lines += ["persistence false"]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 15.0) -> Mosquitto:
        self._write_conf()
        end = time.monotonic() + timeout
        while True:   # the port may still be held for a moment after a stop
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            if wait_port(self.port, 5):
                self.starts += 1
                return self
            self.proc.kill()
            self.proc.wait(5)
            if time.monotonic() > end:
                pytest.fail(f"mosquitto did not start again on port {self.port}; see {self.log}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def restart(self, sig: int = signal.SIGTERM, down: float = 1.0) -> None:
        """Stop (SIGTERM saves the persistence DB; SIGKILL does not), stay down ``down`` s, start again."""
        self.stop(sig)
        time.sleep(down)
        self.start()

    def close(self) -> None:
        self.stop(signal.SIGTERM)


# -- the fleet's processes -------------------------------------------------------------------------

@dataclass
class Progress:
    closed: int          # rounds closed
    round: int           # the last round row (-1: none)
    state: str
    uploads: int
    reports: int
    evaluations: int

    @property
    def key(self) -> tuple:
        return (self.closed, self.round, self.state, self.uploads, self.reports, self.evaluations)


class FleetRun:
    """One run: write the configs, start the coordinator (straight to the broker) and the edge daemons
    (each through its own :class:`FaultProxy`), inject faults, wait, report. Logs under ``work/logs``."""

    def __init__(self, work: Path, fleet: Fleet, cfg: SimConfig, broker: Mosquitto, *, round_seconds: float = 600,
                 chunk_bytes: int = CHUNK, quorum: int | None = None, seed: int = 0):
        self.work, self.fleet, self.cfg, self.broker = work, fleet, cfg, broker
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.files = write_fleet_configs(fleet, cfg, work, broker.url, "faults", round_seconds=round_seconds,
                                         chunk_bytes=chunk_bytes)
        if quorum is not None:
            p = self.files["coordinator"]
            p.write_text(re.sub(r"^quorum = \d+$", f"quorum = {quorum}", p.read_text(), flags=re.M))
        self.devices = [c.name for c in fleet.clients]
        self.proxies: dict[str, FaultProxy] = {}
        for i, d in enumerate(self.devices):
            px = FaultProxy(("127.0.0.1", broker.port), name=d, seed=seed * 100 + i)
            self.proxies[d] = px
            p = self.files["edges"][d]
            p.write_text(p.read_text().replace(f'url = "{broker.url}"', f'url = "{px.url}"'))
            assert px.url in p.read_text()
        self.procs: dict[str, subprocess.Popen] = {}
        self._signalled: set[int] = set()   # pids the harness stopped: their exit is no failure
        self.t0 = time.monotonic()

    @property
    def state_dir(self) -> Path:
        return self.work / "coordinator"

    def _args(self, name: str) -> list[str]:
        if name == "coordinator":
            return ["fedmfs.coordinator.cli", "run", "--config", str(self.files["coordinator"]), "--exit-when-done",
                    "--connect-timeout", "60"]
        return ["fedmfs.edge.cli", "run", "--config", str(self.files["edges"][name]), "--exit-when-done",
                "--connect-timeout", "60"]

    def start(self, name: str) -> subprocess.Popen:
        """Start a process as :func:`fedmfs.sim.processes` does, its output into ``logs/`` with each line
        prefixed by the run's clock (seconds since this FleetRun was made)."""
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is running"
        log = self.work / "logs" / (name + ".log" if name == "coordinator" else f"edge-{name}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("NOTIFY_SOCKET", None)
        env.pop("FEDMFS_BROKER", None)    # the configs name the run's broker
        p = subprocess.Popen([sys.executable, "-m", *self._args(name)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env=env)
        self._note(log, f"===== {name} started (pid {p.pid}) =====")
        threading.Thread(target=self._copy_log, args=(p, log), name=f"log-{name}", daemon=True).start()
        self.procs[name] = p
        return p

    def _note(self, log: Path, text: str) -> None:
        with open(log, "ab") as f:
            f.write(f"[{self.elapsed():7.2f}] {text}\n".encode())

    def mark(self, text: str) -> None:
        """Write a line into every process's log (where a fault happened, on the run's clock)."""
        for log in (self.work / "logs").glob("*.log"):
            self._note(log, f"===== test harness: {text} =====")

    def _copy_log(self, p: subprocess.Popen, log: Path) -> None:
        with open(log, "ab") as f:
            for line in iter(p.stdout.readline, b""):
                f.write(f"[{self.elapsed():7.2f}] ".encode() + line)
                f.flush()
        p.stdout.close()

    def start_all(self, devices=None) -> None:
        self.start("coordinator")
        for d in self.devices if devices is None else devices:
            self.start(d)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def send(self, name: str, sig: int, wait: float | None = 30.0) -> int | None:
        """Send ``sig``; with ``wait``, wait for the exit (SIGTERM: a clean stop) and return its code."""
        p = self.procs[name]
        log = self.work / "logs" / (name + ".log" if name == "coordinator" else f"edge-{name}.log")
        self._note(log, f"===== test harness: signal {signal.Signals(sig).name} to {name} =====")
        if sig in (signal.SIGTERM, signal.SIGKILL):
            self._signalled.add(p.pid)
        p.send_signal(sig)
        if wait is None:
            return None
        try:
            rc = p.wait(wait)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait(10)
            raise AssertionError(f"{name} did not stop within {wait} s of signal {sig}") from None
        return rc

    def kill9(self, name: str) -> None:
        self.send(name, signal.SIGKILL)

    def restart(self, name: str, sig: int = signal.SIGTERM) -> None:
        rc = self.send(name, sig)
        if sig == signal.SIGTERM:
            assert rc == 0, f"{name} exited {rc} on SIGTERM"
        self.start(name)

    def edge_progress(self, name: str) -> dict:
        """The device's ``state.json`` (its progress: reported, stage2, pending, ...); {} if unreadable."""
        try:
            return json.loads((self.work / "edge" / name / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def between_jobs(self, name: str) -> bool:
        """The device runs no training job now: it is uploading (its pending round is recorded) or has
        reported the round that is open. A restart then resumes; one in the middle of a training job
        is another fault (test_device_restarted_mid_training)."""
        st, pr = self.edge_progress(name), self.progress()
        if not st or pr is None:
            return False
        return st.get("pending") is not None or (pr.state == "open" and st.get("reported", -1) >= pr.round)

    def restart_between_jobs(self, name: str, timeout: float = 45.0) -> None:
        """SIGTERM ``name`` once it is between jobs (or after ``timeout`` s anyway), and start it again."""
        end = time.monotonic() + timeout
        while not self.between_jobs(name) and time.monotonic() < end and self.procs[name].poll() is None:
            time.sleep(0.05)
        self.restart(name, signal.SIGTERM)

    # -- watching ------------------------------------------------------------------------------------
    def progress(self) -> Progress | None:
        if not (self.state_dir / "ledger.sqlite").exists():
            return None
        try:
            led = Ledger(self.state_dir, readonly=True)
            try:
                rows = led.rounds()
                last = rows[-1] if rows else None
                return Progress(sum(1 for r in rows if r.closed_at is not None), last.round if last else -1,
                                last.state.value if last else "", len(led.uploads()), len(led.reports()),
                                len(led.evaluations()))
            finally:
                led.close()
        except Exception:   # being created: ask again
            return None

    def refusals(self, device: str | None = None, reason: str | None = None, chunks_only: bool = True) -> int:
        try:
            led = Ledger(self.state_dir, readonly=True)
            try:
                return sum(x["count"] for x in led.refusals()
                           if (device is None or x["device"] == device) and (reason is None or x["reason"] == reason)
                           and (not chunks_only or x["modality"] is not None))
            finally:
                led.close()
        except Exception:
            return 0

    def _failed(self) -> dict[str, int]:
        return {n: p.returncode for n, p in self.procs.items()
                if p.poll() not in (None, 0) and p.pid not in self._signalled}

    def retained(self, wait: float = 1.5) -> list[str]:
        """The fleet's topics that hold a retained message on the broker now (short names: ``round``,
        ``config/S00``, ``global/eye``, ...); [] if the broker is not reachable."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        root = "fedmfs/v1/faults/"
        got: set[str] = set()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"faults-probe-{time.monotonic_ns()}",
                        protocol=mqtt.MQTTv311)

        def on_message(client, userdata, msg) -> None:
            if msg.retain and msg.payload:
                got.add(msg.topic[len(root):].replace("device/", ""))

        c.on_message = on_message
        try:
            c.connect("127.0.0.1", self.broker.port, 10)
        except OSError:
            return []
        c.subscribe(root + "#", 1)
        end = time.monotonic() + wait
        while time.monotonic() < end:
            c.loop(0.1)
        c.disconnect()
        return sorted(got)

    def describe(self) -> str:
        pr = self.progress()
        lines = [f"t={self.elapsed():.0f} s; ledger: {pr}",
                 f"retained on the broker: {', '.join(self.retained()) or 'nothing'}",
                 "processes: " + ", ".join(f"{n}={'running' if p.poll() is None else p.returncode}"
                                           for n, p in self.procs.items())]
        lines += [px.summary() for px in self.proxies.values()]
        lines.append(f"logs: {self.work / 'logs'}")
        return "\n".join(lines)

    def wait_until(self, pred, timeout: float, what: str, poll: float = 0.1):
        """Wait for ``pred()`` (truthy result returned); fail at once if a process exits non-zero."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            bad = self._failed()
            if bad:
                raise AssertionError(f"while waiting for {what}: processes failed {bad}\n{self.describe()}")
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.describe()}")

    def wait_round_closed(self, r: int, timeout: float = 180.0) -> None:
        self.wait_until(lambda: (p := self.progress()) is not None and p.closed > r, timeout,
                        f"round {r} to close")

    def wait_done(self, timeout: float, stall: float = 90.0, watch=None, what: str = "the run",
                  names=None) -> float:
        """Wait until every process (of ``names``, default all) has exited, all with 0. Fails early when
        one exits non-zero, when the ledger shows no progress for ``stall`` s while they still run, or when
        ``watch()`` returns a message (a bound already broken). Returns the seconds waited."""
        t_start = time.monotonic()
        end = t_start + timeout
        last_key, last_change = None, time.monotonic()
        names = list(self.procs) if names is None else list(names)
        while time.monotonic() < end:
            bad = self._failed()
            if bad:
                raise AssertionError(f"{what}: processes failed {bad}\n{self.describe()}")
            if all(self.procs[n].poll() is not None for n in names):
                return time.monotonic() - t_start
            if watch is not None:
                msg = watch()
                if msg:
                    raise AssertionError(f"{what}: {msg}\n{self.describe()}")
            pr = self.progress()
            key = pr.key if pr is not None else None
            if key != last_key:
                last_key, last_change = key, time.monotonic()
            elif time.monotonic() - last_change > stall:
                raise AssertionError(f"{what} stalled: no progress in the coordinator's ledger for {stall:.0f} s "
                                     f"(rounds, uploads, reports, evaluations unchanged)\n{self.describe()}")
            time.sleep(0.25)
        raise AssertionError(f"{what} did not finish within {timeout:.0f} s\n{self.describe()}")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                except OSError:
                    pass
                p.kill()
                p.wait(10)
        for px in self.proxies.values():
            px.close()

    # -- results -------------------------------------------------------------------------------------
    def report(self) -> dict:
        return build_report(self.fleet, self.cfg, self.state_dir, "mqtt")


# -- checks against the fault-free run ---------------------------------------------------------------

def upload_keys(report: dict) -> list[tuple[int, str, str]]:
    return sorted((r["round"], u["device"], u["modality"]) for r in report["rounds"] for u in r["uploads"])


def check_same_as_reference(ref: dict, rep: dict, accuracy: bool = True) -> None:
    """The run's report equals the fault-free run's: final globals, per-round uploads and aggregation."""
    assert len(rep["rounds"]) == len(ref["rounds"]), \
        f"{len(rep['rounds'])} rounds in the ledger, the fault-free run had {len(ref['rounds'])}"
    for a, b in zip(ref["rounds"], rep["rounds"], strict=True):
        r = a["round"]
        short = lambda ups: [(u["device"], u["modality"], u["bytes"]) for u in ups]
        assert b["uploads"] == a["uploads"], (f"round {r}: uploads differ from the fault-free run's: "
                                              f"{short(b['uploads'])} != {short(a['uploads'])}")
        assert b["aggregated"] == a["aggregated"], f"round {r}: aggregation differs from the fault-free run's"
        assert b["upload_bytes"] == a["upload_bytes"], f"round {r}: upload bytes differ"
        if accuracy:
            assert b["client_accuracy"] == pytest.approx(a["client_accuracy"]), f"round {r}: evaluations differ"
    assert rep["global_digests"] == ref["global_digests"], "the final globals differ from the fault-free run's"


def check_ledger(state_dir: Path, ref: dict) -> None:
    """No upload lost or counted twice: one row per (round, device, modality), the set the reference's."""
    led = Ledger(state_dir, readonly=True)
    try:
        keys = [(u["round"], u["device"], u["modality"]) for u in led.uploads()]
    finally:
        led.close()
    dup = sorted({k for k in keys if keys.count(k) > 1})
    assert not dup, f"uploads counted twice in the ledger: {dup}"
    want = set(upload_keys(ref))
    assert set(keys) == want, (f"ledger uploads differ from the fault-free run's: lost {sorted(want - set(keys))}, "
                               f"extra {sorted(set(keys) - want)}")


def lacked_bytes(state_dir: Path) -> tuple[int, int]:
    """The bytes of every signed global frame the run produced (all versions: a device starts with
    none and needs each to train or to run Stage #2), and their count."""
    led = Ledger(state_dir, readonly=True)
    try:
        paths = [r[0] for r in led.db.execute("SELECT path FROM globals")]
    finally:
        led.close()
    return sum((state_dir / p).stat().st_size for p in paths), len(paths)


def global_frame_sizes(state_dir: Path) -> dict[str, int]:
    """modality -> bytes of its first global frame in the ledger (every version of a modality's
    global has the same size, give or take the digits of its round and sample count)."""
    try:
        led = Ledger(state_dir, readonly=True)
        try:
            rows = led.db.execute("SELECT modality, path FROM globals WHERE version = 0").fetchall()
        finally:
            led.close()
        return {m: (state_dir / p).stat().st_size for m, p in rows}
    except Exception:   # not created yet
        return {}


def expected_lacked(ref: dict, v0: dict[str, int], slack_per_frame: int = 64) -> int:
    """The bytes of all global frames a run of the reference's rounds produces: the initial ones and
    one per modality aggregated in each round (sizes from ``v0``)."""
    n = sum(v0.values())
    for r in ref["rounds"]:
        n += sum(v0[m] for m in r["aggregated"])
    frames = len(v0) + sum(len(r["aggregated"]) for r in ref["rounds"])
    return n + slack_per_frame * frames


def emit(capsys, text: str) -> None:
    """Show ``text`` in the test output even when the test passes (figures a reader wants to see)."""
    with capsys.disabled():
        print("\n" + text, flush=True)
