"""The edge daemon: one device of a fleet, over MQTT; a thin adapter around the round machine.

The round logic lives in :class:`fedmfs.edge.machine.EdgeMachine` (sans-I/O). This module supplies
what it lacks: paho (through :class:`fedmfs.adapters.mqtt.MqttLink`, whose callbacks only enqueue), the
state directory, the clock, and a :class:`fedmfs.edge.worker.Worker` thread for the heavy work
(training, Stage #2, ONNX export), whose completions come back through the same queue. One thread
(the loop in :meth:`EdgeDaemon.run`) owns the machine: it drains the queue, feeds each item to the
machine, ticks it, carries out the actions, and pings the systemd watchdog only while the loop, the
network thread and the worker (within ``job_timeout``) are all alive.

State directory (every file written atomically; a restart resumes where it stopped)::

    state.json                 progress: last round reported, last Stage #2, the pending upload
    client/                    fedmfs.learner.store.save_learner (local models, fusion, upload history)
    globals/<modality>.fmg     the verified signed global frames
    pending/<modality>.bin     the payloads of the round being uploaded
    history.json               per round: Shapley, sizes, priorities, choice, acks, accuracy
    model/                     the personalised ONNX model set (fedmfs.core.runtime.modelset), with the
                               one-graph personalised model that ``fedmfs-edge predict`` runs
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path

from fedmfs.adapters.clock import MonotonicClock
from fedmfs.adapters.mqtt import Inbound, MqttLink
from fedmfs.adapters.sdnotify import Notifier, Watchdog
from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.fsio import atomic_write
from fedmfs.core.wire import DeviceState, DeviceStatus, Topics, Verifier, encode_message

from .config import EdgeConfig
from .machine import (
    FRESH_PROGRESS,
    CancelChunks,
    CheckGlobal,
    Connected,
    DropPending,
    EdgeMachine,
    Fatal,
    Finished,
    GlobalFrame,
    JobFailed,
    Publish,
    RebuildPayloads,
    RefusalLog,
    RunStage2,
    SaveGlobal,
    SaveHistory,
    SaveProgress,
    StartTraining,
    Tick,
    check_progress,
    decode_inbound,
    verify_global,
)
from .worker import RESULT, InlineWorker, Trainer, Worker

__all__ = ["EdgeDaemon"]

log = logging.getLogger("fedmfs.edge")

MAX_BATCH = 1000          # queue items handled between two ticks (acks cannot starve the timers)
STOP_TIMEOUT = 10.0       # seconds to wait for a running job on shutdown (its files are atomic)
# chunk frames handed to the MQTT client and not yet acknowledged by the broker, at most (bytes; at
# least one frame). The rest wait in the daemon's outbox, where frames of an upload that is over are
# dropped: a slow or flapping link never carries a backlog of stale frames (docs/reliability.md).
SEND_WINDOW = 128 * 1024
ERROR_EVERY = 60.0        # seconds between two log lines of the same recurring error (a full disk)


def _write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class EdgeDaemon:
    """One device. ``link_factory`` makes its broker link (an :class:`~fedmfs.adapters.mqtt.MqttLink`;
    the in-process simulator passes a loopback one); ``trainer`` defaults to the one ``cfg`` describes;
    ``worker_factory(trainer, post)`` makes the worker that runs its jobs (the in-process simulator's
    pools them across devices); ``inline`` runs jobs on the caller's thread instead of a worker thread (the simulator's
    synchronous mode: :meth:`start`, then :meth:`pump` until :attr:`finished`)."""

    def __init__(self, cfg: EdgeConfig, exit_when_done: bool = False, notifier: Notifier | None = None,
                 link_factory=MqttLink, trainer: Trainer | None = None, inline: bool = False,
                 worker_factory=None):
        self.cfg = cfg
        self.exit_when_done = exit_when_done
        self.dir = cfg.state_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(cfg.fleet)
        self.verifier = Verifier(cfg.coordinator_key)
        self.notifier = notifier or Notifier()
        self.watchdog = Watchdog(self.notifier)
        self.events: queue.Queue = queue.Queue()    # Inbound messages and machine events
        self.clock = MonotonicClock()     # timeouts and retries: a wall-clock step changes none of them
        self.outbox: collections.deque[Publish] = collections.deque()   # chunk frames waiting to be sent
        self.errors = RefusalLog(ERROR_EVERY)    # recurring errors, logged once per ERROR_EVERY seconds each
        self.stop_event = threading.Event()
        self.finished = False
        self.exit_code = 0
        progress = check_progress(self._load_json("state.json", dict(FRESH_PROGRESS)), str(self.dir / "state.json"))
        history = self._load_json("history.json", {})
        if not isinstance(history, dict):
            raise ConfigError(f"{self.dir / 'history.json'} is not a JSON object; move it away")
        self.machine = EdgeMachine(cfg.device, cfg.fleet, cfg.ack_timeout, cfg.max_attempts, progress=progress,
                                   history=history, payloads=self._load_payloads(progress),
                                   idle_fetch_seconds=max(30.0, 3 * cfg.ack_timeout))
        self._load_globals()
        # fault injection for the restart tests: exit abruptly after publishing this many chunk frames
        self._exit_after_frames = int(os.environ.get("FEDMFS_FAULT_EXIT_AFTER_FRAMES", "0") or 0)
        self._frames_published = 0
        self._overdue_logged = False
        self.trainer = trainer or Trainer.from_config(cfg)
        self.inline = inline
        self.worker_factory = worker_factory
        self.worker: Worker | InlineWorker | None = None
        t = self.topics
        offline = encode_message(DeviceStatus(cfg.device, DeviceState.OFFLINE))
        self.link = link_factory(
            cfg.broker, f"fedmfs-edge-{cfg.fleet}-{cfg.device}",
            # the globals are fetched (device/<id>/global/+), not taken from the fleet's retained topics:
            # a reconnect then costs what is missing, not every global again
            [(t.round(), 1), (t.config(cfg.device), 1), (t.ack(cfg.device), 1), (t.state(cfg.device), 1),
             (t.device_globals(cfg.device), 0)],
            self.events, will=(t.status(cfg.device), offline, 1, True), persistent=True,
            on_connected=lambda: self.events.put(Connected(self.clock(), self.link.protocol_used == "5")))

    # -- loading the state directory ---------------------------------------------------------------
    def _load_json(self, name: str, default):
        p = self.dir / name
        if not p.exists():
            return default
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"state file {p} is unreadable ({e}); move it away to start this device afresh") from e

    def _load_payloads(self, progress: dict) -> dict[str, bytes]:
        """The pending payload files (the machine checks each against its recorded sha256 before sending,
        and rebuilds what is missing or damaged)."""
        pending = progress["pending"]
        out = {}
        for m in (pending or {}).get("chosen", []):
            p = self.dir / "pending" / f"{m}.bin"
            if m in pending["status"]:
                continue
            try:
                out[m] = p.read_bytes()
            except FileNotFoundError:
                log.warning("pending payload %s is missing; it will be rebuilt from the saved local model", p)
            except OSError as e:
                log.warning("pending payload %s is unreadable (%s); it will be rebuilt from the saved local "
                            "model", p, e.strerror or e)
        return out

    def _load_globals(self) -> None:
        for p in sorted((self.dir / "globals").glob("*.fmg")):
            try:
                self.machine.handle(verify_global(p.read_bytes(), self.verifier, self.cfg.fleet, stored=True,
                                                  now=self.clock()))
            except (PayloadError, OSError) as e:
                log.warning("ignoring stored global %s (%s); it is fetched from the coordinator again", p, e)

    # -- feeding the machine and carrying out its actions -------------------------------------------
    def _dispatch(self, item) -> None:
        if isinstance(item, Inbound):
            now = self.clock()
            try:
                ev = decode_inbound(item.topic, item.payload, self.cfg.device, now, self.verifier)
                if isinstance(ev, GlobalFrame):
                    ev = verify_global(ev.frame, self.verifier, self.cfg.fleet, now=now)
            except PayloadError as e:   # refused, logged (once a minute per topic), and life goes on
                self.machine.refusals.refuse(f"bad:{item.topic}", now, "refused a message on %s: %s", item.topic, e)
                return
            if ev is None:
                return
        elif isinstance(item, JobFailed):
            ev = dataclasses.replace(item, now=self.clock())   # the retry delay runs on the daemon's clock
        else:
            ev = item
        self._apply(self.machine.handle(ev))

    def _apply(self, actions) -> None:
        for a in actions:
            try:
                self._do(a)
            except OSError as e:   # disk trouble: keep serving; the next save or retained message repairs it
                self._error(f"{type(a).__name__}:{e.errno}", "could not carry out %s: %s%s", type(a).__name__,
                            e.strerror or e, f" ({e.filename})" if getattr(e, "filename", None) else "")
        self._send()

    def _error(self, key: str, msg: str, *args) -> None:
        """Log a recurring error (a full disk, a read-only state directory) at most once per ERROR_EVERY
        seconds, with how many were held back: no traceback, no flood of the journal."""
        self.errors.refuse(key, time.monotonic(), msg, *args, level=logging.ERROR)

    def _send(self) -> None:
        """Hand chunk frames to the MQTT client while its unacknowledged backlog is under SEND_WINDOW."""
        backlog = getattr(self.link, "backlog_bytes", None)
        while self.outbox and (backlog is None or backlog() < SEND_WINDOW):
            a = self.outbox.popleft()
            self.link.publish(a.topic, a.payload, a.qos, a.retain)
            self._frames_published += 1
            if self._exit_after_frames and self._frames_published >= self._exit_after_frames:
                log.error("fault injection: exiting after %d chunk frames", self._frames_published)
                time.sleep(0.2)
                os._exit(17)

    def _do(self, a) -> None:
        if isinstance(a, Publish):
            if a.chunk:
                self.outbox.append(a)
            else:
                self.link.publish(a.topic, a.payload, a.qos, a.retain)
        elif isinstance(a, CancelChunks):
            self._drop_frames(lambda t: t == a.topic)
        elif isinstance(a, CheckGlobal):
            now = self.clock()
            try:
                ev = verify_global(a.frame, self.verifier, self.cfg.fleet, now=now)
            except PayloadError as e:
                self.machine.refusals.refuse(f"fetched:{a.modality}", now, "refused the fetched global %s: %s",
                                             a.modality, e)
                return
            self._apply(self.machine.handle(ev))
        elif isinstance(a, SaveProgress):
            _write_json(self.dir / "state.json", a.progress)
        elif isinstance(a, SaveHistory):
            _write_json(self.dir / "history.json", a.history)
        elif isinstance(a, SaveGlobal):
            atomic_write(self.dir / "globals" / f"{a.modality}.fmg", a.frame)
        elif isinstance(a, DropPending):
            self._drop_frames(lambda t: True)
            for p in [*(self.dir / "pending").glob("*.bin"), self.dir / "pending" / RESULT]:
                p.unlink(missing_ok=True)
        elif isinstance(a, (StartTraining, RunStage2, RebuildPayloads)):
            what = {StartTraining: "training round", RunStage2: "Stage #2 after round",
                    RebuildPayloads: "rebuilding the payloads of round"}[type(a)]
            self.notifier.status(f"device {self.cfg.device}: {what} {a.round}")
            self.worker.submit(a)
        elif isinstance(a, Finished):
            self.finished = True
            self.notifier.status(f"device {self.cfg.device}: the run is over")
        elif isinstance(a, Fatal):
            log.error("stopping: %s", a.reason)
            self.exit_code = a.exit_code
            self.stop_event.set()
        else:
            raise TypeError(f"not an edge action: {a!r}")

    def _drop_frames(self, which) -> None:
        n = len(self.outbox)
        self.outbox = collections.deque(a for a in self.outbox if not which(a.topic))
        if n != len(self.outbox):
            log.info("dropped %d chunk frames not yet sent: their upload is over", n - len(self.outbox))

    # -- health --------------------------------------------------------------------------------------
    def _network_alive(self) -> bool:
        return self.link.alive()

    def _beat(self) -> None:
        """Heartbeats of the three loops; the watchdog pings only while all are fresh."""
        wd = self.watchdog
        wd.beat("main")
        if self._network_alive():
            wd.beat("network")
        running = self.worker.running_for() if self.worker is not None else 0.0
        if running <= self.cfg.job_timeout:
            wd.beat("worker")
            self._overdue_logged = False
        elif not self._overdue_logged:
            self._overdue_logged = True
            log.error("a job has run %.0f s, over job_timeout = %.0f s; the watchdog stops", running,
                      self.cfg.job_timeout)
        wd.maybe_ping()

    # -- the loop ----------------------------------------------------------------------------------
    def start(self, connect_timeout: float = 60.0) -> None:
        """Start the worker and connect (READY to systemd once connected)."""
        if self.worker_factory is not None:
            self.worker = self.worker_factory(self.trainer, self.events.put)
        elif self.inline:
            self.worker = InlineWorker(self.trainer.run, self.events.put)
        else:
            self.worker = Worker(self.trainer.run, self.events.put)
        self.link.start(timeout=connect_timeout)
        self.notifier.ready(f"device {self.cfg.device} connected")

    def pump(self, block: float = 0.0) -> int:
        """Feed the machine what arrived (waiting up to ``block`` seconds for the first item), then
        tick it; returns the number of items handled."""
        try:
            item = self.events.get(timeout=block) if block > 0 else self.events.get_nowait()
        except queue.Empty:
            item = None
        n = 0
        while item is not None:
            self._safely(self._dispatch, item)
            n += 1
            try:
                item = self.events.get_nowait() if n < MAX_BATCH else None
            except queue.Empty:
                item = None
        self._safely(lambda _: self._apply(self.machine.handle(Tick(self.clock()))), None)
        return n

    def stop(self) -> None:
        self.notifier.stopping()
        if self.worker is not None and not self.worker.stop(STOP_TIMEOUT):
            log.warning("a %s job is still running; leaving it (a restart redoes it)", "training or Stage #2")
        try:
            self.link.publish(self.topics.status(self.cfg.device),
                              encode_message(DeviceStatus(self.cfg.device, DeviceState.OFFLINE)), 1, True,
                              timeout=2.0)
        except Exception as e:  # best effort on the way out
            log.info("no offline status published: %s", e)
        self.link.stop()

    def run(self, connect_timeout: float = 60.0) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        try:
            self.start(connect_timeout)
            while not self.stop_event.is_set():
                self._beat()
                self.pump(block=0.1)
                if self.finished and self.exit_when_done:
                    break
        finally:
            self.stop()
        return self.exit_code

    def _safely(self, fn, arg) -> None:
        """The loop outlives any one event: an unexpected error is logged, not fatal; with its
        traceback the first time, then at most once a minute (a bug hit on every tick must not flood
        the journal)."""
        try:
            fn(arg)
        except Exception as e:
            tb = e.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
            key = f"bug:{type(e).__name__}:{where}"
            if key not in self.errors.last:
                log.exception("handling %r failed", type(arg).__name__)
                self.errors.last[key] = time.monotonic()
            else:
                self._error(key, "handling %r failed again: %s: %s (at %s)", type(arg).__name__, type(e).__name__, e,
                            where)
