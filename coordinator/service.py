"""The coordinator service: the round machine wrapped with MQTT, the SQLite ledger, a clock,
Prometheus metrics and systemd notify. Three threads, each with one job: paho's network thread only
enqueues inbound messages; the service's thread owns the round machine (decode, verify, aggregate);
the ledger writer (coordinator.writer) owns the ledger while the service runs, commits each turn's
actions (group commit) and only then publishes them, so fsyncs overlap with handling the next uploads.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from pathlib import Path

from fedmfs.adapters.clock import MonotonicClock
from fedmfs.adapters.mqtt import Inbound, MqttLink
from fedmfs.adapters.sdnotify import Notifier, Watchdog
from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.wire import RoundState, Signer
from fedmfs.core.wire.signing import load_private_key

from .config import CoordinatorConfig, load_fleet_file
from .ledger import Ledger
from .machine import (
    CoordinatorMachine,
    FleetChanged,
    Reconnected,
    Start,
    Tick,
    event_for,
)
from .metrics import Metrics
from .writer import Batch, LedgerWriter, PutDevices, PutTimeLeft

__all__ = ["CoordinatorService", "load_signer"]

log = logging.getLogger("fedmfs.coordinator")

# Messages waiting for the machine's thread. A full inbox blocks paho's network thread, so the broker
# holds (and, for QoS 1, keeps) what does not fit instead of this process growing without bound.
INBOX_MAX = 10_000
_RECONNECTED = object()     # in the inbox: the broker link came back
TIME_LEFT_EVERY = 30.0      # seconds between two records of the open round's time left


def load_signer(path: Path) -> Signer:
    """The signing key of ``coordinator.toml``; any problem with the file is a ConfigError (exit 2)."""
    return load_private_key(path)


class CoordinatorService:
    """The coordinator. ``link_factory`` makes its broker link (the in-process simulator passes a
    loopback one). :meth:`run` is the service's loop; the simulator calls :meth:`start` and
    :meth:`pump` itself, with the ledger writer inline (no thread)."""

    def __init__(self, cfg: CoordinatorConfig, exit_when_done: bool = False, notifier: Notifier | None = None,
                 link_factory=MqttLink):
        self.cfg = cfg
        self.exit_when_done = exit_when_done
        self.signer = load_signer(cfg.signing_key)
        self.ledger = Ledger(cfg.state_dir)
        try:
            self._setup(cfg, notifier, link_factory)
        except BaseException:     # the ledger holds the state dir's lock: let it go with the error
            self.ledger.close()
            raise

    def _setup(self, cfg: CoordinatorConfig, notifier: Notifier | None, link_factory) -> None:
        self.metrics = Metrics()
        self.notifier = notifier or Notifier()
        self.watchdog = Watchdog(self.notifier)
        # deadlines run on the monotonic clock: a wall-clock step mid-round changes nothing
        self.clock = MonotonicClock()
        self.inbox: queue.Queue = queue.Queue(maxsize=INBOX_MAX)
        self._connected_once = False
        self._time_left_at = -float("inf")
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.failed = False
        self._done_since: float | None = None
        self.handle_seconds: dict[int, float] = {}   # the machine's thread, per round (bench/round.py)
        self.writer = LedgerWriter(self.ledger, self.metrics, None, self._writer_failed)
        self.machine = self._build_machine()
        t = self.machine.topics
        self.link = link_factory(cfg.broker, f"fedmfs-coordinator-{cfg.fleet}",
                             [(t.all_uploads(), 1), (t.all_reports(), 1), (t.all_status(), 1),
                              (t.all_fetch(), 1)],
                             self.inbox, persistent=True, on_connected=self._on_connected)
        self.writer.publish = self.link.publish

    # -- state -------------------------------------------------------------------------------------
    def _build_machine(self) -> CoordinatorMachine:
        cfg, led = self.cfg, self.ledger
        fleet = led.get_meta("fleet")
        if fleet is not None and fleet != cfg.fleet:
            raise ConfigError(f"state_dir {cfg.state_dir} belongs to fleet {fleet!r}, not {cfg.fleet!r}; "
                              "use another state_dir")
        last = led.last_round()
        m = CoordinatorMachine(cfg.fleet, cfg.spec, cfg.devices, cfg.policy, self.signer, self._epoch(last is None))
        led.put_devices(cfg.devices)
        if last is None:
            led.put_meta("fleet", cfg.fleet)
            self.execute(m.seed_globals(self._initial_globals()), 0)
            return m
        for ev in led.evaluations():
            m.restore_evaluation(ev)
        for g in led.latest_globals():
            m.restore_global(g["modality"], g["version"], g["round"], led.global_frame(g))
        m.restore_round(last.round, last.state, last.deadline, last.opened_at, last.expected, last.caps,
                        now=self.clock(), left=self._time_left(last.round))
        if last.state is RoundState.OPEN:
            n = 0
            for row in led.uploads(last.round):
                m.restore_upload(row["device"], row["modality"], led.upload_payload(row))
                n += 1
            for rep in led.reports(last.round):
                m.restore_report(rep)
            log.info("resumed open round %d with %d accepted uploads and %d reports", last.round, n,
                     len(m.reported))
        else:
            log.info("resumed after round %d (%s)", last.round, last.state.value)
        return m

    def _epoch(self, fresh: bool) -> int:
        """The fleet epoch from the ledger's meta; made once, when the ledger has none: the time in
        milliseconds, so a fleet re-created later (a new state_dir) has a larger one and devices take
        it as a new fleet (docs/protocol.md "Signed fleet state")."""
        led = self.ledger
        raw = led.get_meta("epoch")
        if raw is not None:
            if not raw.isdigit() or len(raw) > 15:
                raise ConfigError(f"the ledger in {self.cfg.state_dir} has a malformed fleet epoch {raw[:20]!r}; "
                                  "restore the ledger from a backup or start a new fleet in a new state_dir")
            return int(raw)
        epoch = int(time.time() * 1000)
        led.put_meta("epoch", str(epoch))
        if fresh:
            log.info("new fleet %s: epoch %d", self.cfg.fleet, epoch)
        else:
            log.warning("the ledger had no fleet epoch (fedmfs before protocol 2): epoch %d from now on", epoch)
        return epoch

    def _time_left(self, round_index: int) -> float | None:
        """The open round's time left as last recorded (None: not recorded for this round)."""
        raw = self.ledger.get_meta("round_left") or ""
        r, _, left = raw.partition(":")
        try:
            return float(left) if r.isdigit() and int(r) == round_index else None
        except ValueError:
            return None

    def _initial_globals(self) -> dict:
        try:
            from fedmfs.learner.models import initial_globals
        except ImportError:
            log.warning("torch is not installed: no initial global models; devices start from their own")
            return {}
        return initial_globals(self.cfg.spec, self.cfg.seed)

    # -- actions -----------------------------------------------------------------------------------
    def execute(self, actions, round_index: int | None = None) -> None:
        """Persist (one transaction), then publish in order: an ack never promises what the ledger
        does not hold yet. Synchronous before :meth:`run` starts the writer, queued while it runs."""
        self.writer.submit(Batch(list(actions), self.machine.round if round_index is None else round_index))

    def _on_connected(self) -> None:
        """paho's thread: a connection after the first one means the broker came back, perhaps without
        its retained messages (no persistence): the machine publishes the fleet state again."""
        if self._connected_once:
            self.inbox.put(_RECONNECTED)
        self._connected_once = True

    def _writer_failed(self) -> None:
        self.failed = True
        self.stop_event.set()

    def _event_for(self, msg: Inbound, now: float):
        try:
            return event_for(self.cfg.fleet, msg.topic, msg.payload, now)
        except PayloadError as e:
            log.info("ignoring message on %r: %s", msg.topic, e)
            self.metrics.refused.labels("bad_topic").inc()
            return None

    def handle(self, event) -> list:
        """The machine's actions for one event ([] if handling failed: logged and counted)."""
        try:
            return self.machine.handle(event)
        except Exception:   # a bug must not take the fleet down: log, count, go on
            log.exception("error while handling %s", type(event).__name__)
            self.metrics.errors.labels(type(event).__name__).inc()
            return []

    def handle_batch(self, events) -> None:
        """Group commit: the actions of many events handed to the writer as one batch."""
        t0 = time.perf_counter()
        r = self.machine.round
        actions = []
        for ev in events:
            actions += self.handle(ev)
        if actions:
            self.execute(actions, r)
        self.handle_seconds[r] = self.handle_seconds.get(r, 0.0) + time.perf_counter() - t0

    # -- the loop ----------------------------------------------------------------------------------
    def _signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_event.set())

    def start(self, connect_timeout: float = 60.0, writer_thread: bool = True) -> None:
        """Connect, start the ledger writer (or keep it inline), (re)publish the fleet state."""
        self.link.start(timeout=connect_timeout)
        if writer_thread:
            self.writer.start()
        self.handle_batch([Start(self.clock())])
        self.notifier.ready(self._status_line())

    def pump(self, block: float = 0.0) -> int:
        """Handle what arrived (waiting up to ``block`` seconds for the first message) and a tick, as
        one group commit; returns the number of messages handled."""
        try:
            msg = self.inbox.get(timeout=block) if block > 0 else self.inbox.get_nowait()
        except queue.Empty:
            msg = None
        events, n = [], 0
        while msg is not None and n < 1000:
            n += 1
            if msg is _RECONNECTED:
                log.info("reconnected to the broker: publishing the fleet state again")
                self.metrics.reconnects.inc()
                events.append(Reconnected(self.clock()))
            else:
                ev = self._event_for(msg, self.clock())
                if ev is not None:
                    events.append(ev)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                msg = None
        now = self.clock()
        events.append(Tick(now))
        self.handle_batch(events)
        m = self.machine
        if m.state is RoundState.OPEN and now - self._time_left_at >= TIME_LEFT_EVERY:
            self._time_left_at = now
            self.execute([PutTimeLeft(m.round, m.deadline - now)])
        return n

    @property
    def over(self) -> bool:
        """With --exit-when-done: the run is over and everything it published is out."""
        return self._run_over() and self.inbox.empty()

    def run(self, connect_timeout: float = 60.0) -> int:
        self._signals()
        self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
        self.start(connect_timeout)
        last_status = 0.0
        try:
            while not self.stop_event.is_set():
                self.watchdog.beat("main")
                self.watchdog.maybe_ping()
                self.pump(block=0.2)
                if self.reload_event.is_set():
                    self.reload_event.clear()
                    self._reload()
                if time.monotonic() - last_status > 5:
                    last_status = time.monotonic()
                    self.notifier.status(self._status_line())
                if self.exit_when_done and self.over:
                    self.writer.flush()
                    self._drain_publishes()
                    break
        finally:
            self.close()
        return 1 if self.failed else 0

    def close(self) -> None:
        self.notifier.stopping()
        self.writer.stop()
        self.link.stop()
        self.ledger.close()

    def _run_over(self) -> bool:
        """For --exit-when-done: the last round closed and every device reported its final evaluation
        (or a round's length passed since the run ended, so a silent device cannot hold us forever)."""
        m = self.machine
        if m.state is not RoundState.DONE:
            self._done_since = None
            return False
        if self._done_since is None:
            self._done_since = time.monotonic()
        return m.all_evaluated or time.monotonic() - self._done_since > self.cfg.policy.round_seconds

    def _drain_publishes(self, timeout: float = 10.0) -> None:
        """Before exiting: make sure the final round message and globals reached the broker."""
        m = self.machine
        self.link.publish(m.topics.round(), m.round_message(), 1, True, timeout=timeout)

    def _reload(self) -> None:
        try:
            devices = load_fleet_file(self.cfg.fleet_file)
        except ConfigError as e:
            log.error("fleet file not reloaded: %s", e)
            return
        self.execute([PutDevices(devices)])
        self.handle_batch([FleetChanged(devices, self.clock())])
        log.info("fleet file reloaded: %d devices (caps apply from the next round)", len(devices))

    def _status_line(self) -> str:
        m = self.machine
        return (f"round {m.round} {m.state.value}: {len(m.reported)}/{len(m.expected)} reported, "
                f"{sum(m.used.values())} bytes accepted")
