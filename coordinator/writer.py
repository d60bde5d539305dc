"""The coordinator's persist-then-publish stage: one thread that owns the ledger while the service runs.

Why a thread: a durable SQLite commit (WAL, ``synchronous=FULL``) costs one fsync, about 5 ms on the
reference machine, as much as handling twenty 21 kB uploads. Done on the round machine's thread it
stalled decoding and aggregation for every commit. Here the machine's thread hands each turn's
actions over and goes on handling the next messages while this thread commits; whatever queued up
during one fsync is committed by the next one (group commit that grows with the load).

Invariants kept:

* persist before publish: the acks of a batch go out only after the transaction holding what they
  promise has committed, so an ``accepted`` ack never promises what the ledger does not hold;
* order: batches are committed and published in the order they were submitted (one FIFO, one thread);
* a failed commit publishes nothing of its batch nor of any later one and stops the service: the
  machine counted uploads the ledger does not hold, so the restart rebuilds the machine from the ledger.

Refusals are the exception to persist-before-publish, on purpose: a refusal ack promises nothing, and
every hostile frame would otherwise cost a commit (an fsync) and a row. They are counted in memory per
(round, device, modality, reason) and their ack goes out at once; the counts ride along with the next
transaction (a durable write, a :meth:`flush`, :meth:`stop`), or get one of their own once the oldest
is ``refusal_flush_seconds`` old or ``max_pending_refusals`` keys are waiting. So refusals cost at most
one fsync per ``refusal_flush_seconds``, whatever their number, and a crash loses at most those counts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedmfs.core.wire import RoundState, encode_message

from .ledger import Ledger
from .machine import (
    DeviceAhead,
    PersistEvaluation,
    PersistGlobal,
    PersistReport,
    PersistRound,
    PersistStatus,
    PersistUpload,
    Publish,
    Refused,
    RoundClosed,
)
from .metrics import Metrics

__all__ = ["Batch", "LedgerWriter", "PutDevices", "PutTimeLeft"]

log = logging.getLogger("fedmfs.coordinator")

PublishFn = Callable[[str, bytes, int, bool], object]


@dataclass(frozen=True, slots=True)
class PutDevices:
    """The fleet file was reloaded: record the new device configs."""
    devices: tuple


@dataclass(frozen=True, slots=True)
class PutTimeLeft:
    """The open round's time left on the monotonic clock (ledger meta ``round_left``: "round:seconds"),
    so a restart resumes the round with it whatever the wall clock did meanwhile."""
    round: int
    seconds: float


@dataclass(slots=True)
class _Counted:
    """Refusals of one (round, device, modality, reason) not yet in the ledger."""
    count: int
    nbytes: int
    detail: str
    first_at: float
    at: float


@dataclass(slots=True)
class Batch:
    """The actions of one loop turn of the machine's thread, in order, with the round they belong to."""
    actions: list
    round: int
    submitted: float = field(default_factory=time.perf_counter)


class LedgerWriter:
    """Persists batches of actions (one transaction per group of queued batches), then publishes.

    Use :meth:`write` synchronously before :meth:`start` (startup) or after :meth:`stop`;
    :meth:`submit` while the thread runs.
    """

    def __init__(self, ledger: Ledger, metrics: Metrics, publish: PublishFn | None = None,
                 on_failure: Callable[[], None] | None = None, max_group: int = 64,
                 refusal_flush_seconds: float = 5.0, max_pending_refusals: int = 1024):
        self.ledger = ledger
        self.metrics = metrics
        self.publish = publish
        self.on_failure = on_failure
        self.max_group = max_group
        self.refusal_flush_seconds = refusal_flush_seconds
        self.max_pending_refusals = max_pending_refusals
        self._refusals: dict[tuple[int, str, str | None, str], _Counted] = {}
        self._refusals_since: float | None = None    # monotonic time of the oldest pending refusal
        self.failed = False
        self.seconds: dict[int, float] = {}      # time spent persisting + publishing, per round
        self.closing_seconds: dict[int, float] = {}   # of the batch that closed the round
        self.commits = 0     # transactions committed (each one fsync)
        self._q: queue.Queue[Batch | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fedmfs-ledger-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: Batch) -> None:
        if self._thread is None:
            self.write(batch)
        else:
            self._q.put(batch)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is committed and published (True) or ``timeout``."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._q.put(Batch([done], -1))
        return done.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (if it runs) and write the refusals still counted in memory."""
        t = self._thread
        if t is not None:
            self._q.put(None)
            t.join(timeout)
            if t.is_alive():
                log.error("ledger writer did not stop within %.0f s", timeout)
                return
            self._thread = None
        if self._refusals and not self.failed:
            try:
                self._write_group([Batch([], -1)], force=True)
            except Exception:   # only refusal counts are lost: say so, let the shutdown go on
                log.exception("the last %d refusal counts could not be written", len(self._refusals))

    @property
    def pending(self) -> int:
        return self._q.qsize()

    # -- the thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._q.get(timeout=self._refusals_wait())
            except queue.Empty:      # refusals have waited long enough: a transaction of their own
                first = Batch([], -1)
            if first is None:
                break
            group = [first]
            while len(group) < self.max_group:       # group commit: take what queued up meanwhile
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
            if self.failed:
                self._release(group)
                continue
            try:
                self._write_group(group)
            except Exception:
                log.critical("persisting %d batches failed; stopping to resume from the ledger", len(group),
                             exc_info=True)
                self.metrics.errors.labels("persist").inc()
                self.failed = True
                self._release(group)
                if self.on_failure is not None:
                    self.on_failure()

    def _refusals_wait(self) -> float | None:
        """Seconds until the pending refusals are due (None: nothing pending, wait for work)."""
        if self._refusals_since is None or self.failed:
            return None
        return max(0.0, self._refusals_since + self.refusal_flush_seconds - time.monotonic())

    def _refusals_due(self) -> bool:
        return bool(self._refusals) and (len(self._refusals) >= self.max_pending_refusals
                                         or self._refusals_wait() == 0.0)

    @staticmethod
    def _release(group: list[Batch]) -> None:
        for b in group:
            for a in b.actions:
                if isinstance(a, threading.Event):
                    a.set()

    def write(self, batch: Batch) -> None:
        """Persist and publish one batch on the calling thread (raises if the transaction fails)."""
        self._write_group([batch])

    def _write_group(self, group: list[Batch], force: bool = False) -> None:
        t0 = time.perf_counter()
        publishes: list[list[Publish]] = []
        durable: list[Any] = []
        for b in group:
            pubs = []
            for a in b.actions:
                if isinstance(a, Publish):
                    pubs.append(a)
                elif isinstance(a, Refused):
                    self._count_refusal(a)
                elif isinstance(a, DeviceAhead):       # a metric only: nothing to persist
                    self.metrics.ahead.labels(a.device).inc()
                elif isinstance(a, threading.Event):
                    force = True         # flush(): everything so far, the refusal counts too
                else:
                    durable.append(a)
            publishes.append(pubs)
        with_refusals = bool(self._refusals) and (force or bool(durable) or self._refusals_due())
        if durable or with_refusals:
            with self.ledger.batch():
                for a in durable:
                    self._persist(a)
                if with_refusals:
                    self._persist_refusals()
            self.commits += 1
            if with_refusals:
                self._refusals.clear()
                self._refusals_since = None
        t1 = time.perf_counter()
        share = (t1 - t0) / len(group)
        for b, pubs in zip(group, publishes):
            tb = time.perf_counter()
            if self.publish is not None:
                for p in pubs:
                    self.publish(p.topic, p.payload, p.qos, p.retain)
            spent = share + time.perf_counter() - tb
            if b.round >= 0:
                self.seconds[b.round] = self.seconds.get(b.round, 0.0) + spent
                if any(isinstance(a, RoundClosed) for a in b.actions):
                    self.closing_seconds[b.round] = spent
            for a in b.actions:
                if isinstance(a, threading.Event):
                    a.set()

    def _count_refusal(self, a: Refused) -> None:
        now = time.time()
        key = (a.round, a.device, a.modality, a.reason.value)
        c = self._refusals.get(key)
        if c is None:
            self._refusals[key] = _Counted(1, a.nbytes, a.detail, now, now)
            if self._refusals_since is None:
                self._refusals_since = time.monotonic()
        else:
            c.count += 1
            c.nbytes += a.nbytes
            c.detail, c.at = a.detail, now
        self.metrics.refused.labels(a.reason.value).inc()

    def _persist_refusals(self) -> None:
        for (r, device, modality, reason), c in self._refusals.items():
            self.ledger.put_refusal(r, device, modality, reason, c.nbytes, c.detail, c.count, c.first_at, c.at)

    def _persist(self, a) -> None:
        led, m = self.ledger, self.metrics
        if isinstance(a, PersistUpload):
            if led.put_upload(a.round, a.device, a.modality, a.payload, a.sha256, a.samples):
                m.accepted.labels(a.modality).inc()
                m.bytes.labels(a.device, a.modality).inc(len(a.payload))
        elif isinstance(a, PersistReport):
            led.put_report(a.round, a.device, encode_message(a.report))
            m.reports.inc()
            for mod, value in a.report.record.shapley.items():
                m.shapley.labels(a.device, mod).set(value)
        elif isinstance(a, PersistEvaluation):
            led.put_evaluation(a.evaluation)
            m.accuracy.labels(a.evaluation.device).set(a.evaluation.accuracy)
        elif isinstance(a, PersistRound):
            led.put_round(a.round, a.state, a.deadline, a.opened_at, a.expected, dict(a.caps),
                          a.closed_at, dict(a.aggregated))
            m.round.set(a.round)
            if a.state is RoundState.OPEN:
                log.info("round %d open until %.0f, expecting %d devices", a.round, a.deadline, len(a.expected))
        elif isinstance(a, PersistGlobal):
            led.put_global(a.modality, a.version, a.round, a.sha256, a.frame)
        elif isinstance(a, RoundClosed):
            m.rounds.labels("met" if a.quorum_met else "missed").inc()
            m.duration.observe(a.duration)
            log.info("round %d closed after %.1f s: %d reports, aggregated %s", a.round, a.duration,
                     len(a.reported), a.aggregated or "nothing")
        elif isinstance(a, PersistStatus):
            led.set_online(a.device, a.online)
        elif isinstance(a, PutDevices):
            led.put_devices(a.devices)
        elif isinstance(a, PutTimeLeft):
            led.put_meta("round_left", f"{a.round}:{a.seconds:.3f}")
