"""The edge device's round machine, sans-I/O: events in, actions out; no sockets, threads, files or clocks.

The daemon (:mod:`fedmfs.edge.daemon`) is a thin adapter around it: it turns paho messages, the
worker thread's completions and the clock into events, and carries out the actions (publish,
persist, start a heavy job). The unit tests replay event orders against the same machine.

What a round looks like from here: the retained ``round`` announcement, the device's ``config`` and
the globals it lists are held -> Stage #2 on the last closed round's globals (a :class:`RunStage2`
job) -> training from the round's globals (a :class:`StartTraining` job) -> the chosen payloads are
uploaded in chunks (one :class:`~fedmfs.edge.uploads.UploadTracker` each) -> the report, repeated
until the coordinator acknowledges it (or the round closes) -> the round is finished.

Invariants (checked by tests/edge/test_edge_machine.py):

* at most one heavy job runs at a time, and only the adapter's worker runs it; the machine keeps
  answering acks, configs and announcements meanwhile;
* state is persisted (:class:`SaveProgress`) before the work it promises is started anew after a
  restart; the progress snapshot is the JSON document ``state.json``;
* a round is finished once (report acknowledged, round closed, or the report unanswered after
  ``max_attempts``), and an ack for another round, modality or payload changes nothing;
* nothing a peer sends raises out of :meth:`EdgeMachine.handle`;
* fresh, signed fleet state (docs/protocol.md "Signed fleet state"): a ``round``, ``config`` or global
  counts only signed by the coordinator (checked by :func:`decode_inbound` and :func:`verify_global`),
  of this fleet and of the device's fleet epoch or a later one, and never older than what the device
  holds: announcements never go back in (round, state), a modality's global never back in round. What
  is refused leaves the state as it was and is logged with the reason (rate-limited per kind).

After each Stage #2 the device sends its :class:`~fedmfs.core.wire.Evaluation` (test accuracy of the
personalised model) until the coordinator records it; the run is finished once the evaluation after the
last round is recorded (or unanswered after ``max_attempts``).

Progress (``state.json``)::

    {"reported": <last finished round or -1>, "stage2": <last round Stage #2 ran on or -1>,
     "evaluated": <last round whose evaluation the coordinator recorded or -1>,
     "epoch": <the fleet epoch of the announcements taken, or -1: none yet>,
     "announced": <the latest round announced (signed) or -1>, "announced_state": "open" | "closed" | "done",
     "pending": null | {"round": r, "chosen": [modality, ...], "status": {modality: final reason},
                        "chunk_bytes": n, "started": {modality: true},
                        "sha256": {modality: sha256 of its payload file}, "rebuilt": true}}
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.records import RoundRecord
from fedmfs.core.wire import (
    MAX_FETCH_CHUNKS,
    Ack,
    AckReason,
    DeviceConfig,
    DeviceState,
    DeviceStatus,
    Evaluation,
    Fetch,
    GlobalWant,
    Publish,
    Reassembler,
    Report,
    RoundAnnouncement,
    RoundState,
    Tick,
    TopicKind,
    Topics,
    Verifier,
    decode_chunk,
    decode_control,
    decode_global,
    decode_message,
    encode_message,
    parse_topic,
    verify_message,
)

from .uploads import UploadStatus, UploadTracker, publish_packet_bytes

__all__ = [
    "JobKind", "Connected", "Announced", "ConfigArrived", "AckArrived", "GlobalArrived", "GlobalFrame",
    "GlobalChunk", "Trained", "Rebuilt", "Stage2Done", "JobFailed", "Tick", "Publish", "SaveProgress",
    "SaveHistory", "SaveGlobal", "DropPending", "CancelChunks", "CheckGlobal", "StartTraining", "RunStage2",
    "RebuildPayloads", "Finished", "Fatal", "EdgeMachine", "decode_inbound",
    "verify_global", "check_progress", "FRESH_PROGRESS", "RefusalLog",
]

log = logging.getLogger("fedmfs.edge")

FRESH_PROGRESS: Mapping[str, Any] = {"reported": -1, "stage2": -1, "evaluated": -1, "pending": None,
                                     "epoch": -1, "announced": -1, "announced_state": RoundState.OPEN.value}

# announcements of one round are ordered too: a round opens, closes, and the last one ends the run
_STATE_ORDER = {RoundState.OPEN: 0, RoundState.CLOSED: 1, RoundState.DONE: 2}


class RefusalLog:
    """Refusals logged at WARNING, each kind at most once per ``every`` seconds (event time), with a
    count of those held back: a hostile client repeating a forged message cannot flood the journal."""

    def __init__(self, every: float = 60.0):
        self.every = every
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def refuse(self, kind: str, now: float, msg: str, *args: object, level: int = logging.WARNING) -> None:
        if now - self.last.get(kind, -math.inf) < self.every:
            self.held[kind] = self.held.get(kind, 0) + 1
            return
        held = self.held.pop(kind, 0)
        log.log(level, msg + (f" ({held} more like it held back)" if held else ""), *args)
        self.last[kind] = now


class JobKind(str, Enum):
    TRAIN = "train"
    STAGE2 = "stage2"
    REBUILD = "rebuild"


# --------------------------------------------------------------------------------------------- events

@dataclass(frozen=True, slots=True)
class Connected:
    """The link (re)connected; ``mqtt5`` says which protocol it speaks (for the wire-byte count)."""
    now: float
    mqtt5: bool = True


@dataclass(frozen=True, slots=True)
class Announced:
    """A ``round`` message whose signature was verified (:func:`decode_inbound`); ``epoch`` is the fleet
    epoch of its signed header."""
    announcement: RoundAnnouncement
    now: float = 0.0
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class ConfigArrived:
    """A ``config`` message whose signature was verified; ``epoch`` and ``round`` from its signed header
    (``round``: the coordinator's round when it published it)."""
    config: DeviceConfig
    now: float = 0.0
    epoch: int = 0
    round: int = 0


@dataclass(frozen=True, slots=True)
class AckArrived:
    ack: Ack
    now: float


@dataclass(frozen=True, slots=True)
class GlobalArrived:
    """A global model whose signature and payload were verified (:func:`verify_global`).

    ``state`` is opaque here (the numpy tensors the worker trains from); ``stored`` says the frame
    came from the state directory, so there is nothing to persist; ``round`` and ``epoch`` are from the
    signed header (the round the global is trained in, the fleet epoch)."""
    modality: str
    sha256: str
    state: Any
    frame: bytes
    stored: bool = False
    round: int = 0
    epoch: int = 0
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class GlobalFrame:
    """A global-model frame straight off the wire, still to be verified by the adapter."""
    frame: bytes


@dataclass(frozen=True, slots=True)
class GlobalChunk:
    """A chunk frame of a global model this device fetched (on ``device/<id>/global/<modality>``)."""
    modality: str
    frame: bytes
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """The pending payloads of ``round`` re-encoded from the saved local models (a :class:`RebuildPayloads`
    job); ``payloads`` lacks those that could not be rebuilt."""
    round: int
    payloads: Mapping[str, bytes]
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class Trained:
    """The training job of ``round`` is over: its payloads are written; ``record`` is what the report says."""
    round: int
    chosen: tuple[str, ...]
    payloads: Mapping[str, bytes]
    record: RoundRecord
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class Stage2Done:
    """Stage #2 on round ``round``'s globals is over: ``accuracy`` on ``windows`` test windows."""
    round: int
    accuracy: float
    windows: int = 0
    now: float = 0.0


@dataclass(frozen=True, slots=True)
class JobFailed:
    """A heavy job raised. ``retryable``: try again after the retry delay; else the daemon stops."""
    kind: JobKind
    round: int
    error: str
    retryable: bool
    now: float
    exit_code: int = 1


Event = (Connected | Announced | ConfigArrived | AckArrived | GlobalArrived | GlobalChunk | Trained | Rebuilt
         | Stage2Done | JobFailed | Tick)


# -------------------------------------------------------------------------------------------- actions

@dataclass(frozen=True, slots=True)
class SaveProgress:
    """Write ``state.json`` (a snapshot, safe to serialise on any thread)."""
    progress: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SaveHistory:
    history: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SaveGlobal:
    modality: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class DropPending:
    """The pending round is over: delete its payload files (and drop its chunk frames not yet sent)."""


@dataclass(frozen=True, slots=True)
class CancelChunks:
    """An upload is over (accepted or refused): chunk frames for ``topic`` not yet sent are dropped."""
    topic: str


@dataclass(frozen=True, slots=True)
class CheckGlobal:
    """A fetched global frame is complete: verify its signature (:func:`verify_global`) and feed the
    :class:`GlobalArrived` back (the adapter holds the coordinator's key)."""
    modality: str
    frame: bytes


@dataclass(frozen=True, slots=True)
class StartTraining:
    """Run (in the worker) spool merge, Learner.local_round, selection, payload files, learner save.

    ``starts``: the globals to train from; ``deploy``: the globals deployed now (for a client restored
    from the state directory)."""
    round: int
    starts: Mapping[str, Any]
    deploy: Mapping[str, Any]
    config: DeviceConfig


@dataclass(frozen=True, slots=True)
class RunStage2:
    """Run (in the worker) Stage #2 on ``deploy``, evaluate, export the personalised ONNX model set."""
    round: int
    deploy: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RebuildPayloads:
    """Run (in the worker) re-encoding the pending payloads of ``round`` for ``modalities`` from the saved
    local models (their files were lost or damaged); answered with :class:`Rebuilt`."""
    round: int
    modalities: tuple[str, ...]
    codec: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The run is over (the coordinator announced ``done`` and Stage #2 ran on the last round)."""


@dataclass(frozen=True, slots=True)
class Fatal:
    """Stop the daemon with ``exit_code`` (a job failed in a way a retry cannot fix)."""
    reason: str
    exit_code: int = 1


Action = (Publish | SaveProgress | SaveHistory | SaveGlobal | DropPending | CancelChunks | CheckGlobal | StartTraining
          | RunStage2 | RebuildPayloads | Finished | Fatal)


# ------------------------------------------------------------------------------------------- decoding

def decode_inbound(topic: str, payload: bytes, device: str, now: float,
                   verifier: Verifier) -> Event | GlobalFrame | None:
    """The event a broker message means for ``device``; None for what it ignores (other devices'
    topics, cleared retained messages). Malformed topics or messages raise PayloadError, and so do a
    ``round`` or ``config`` not signed with ``verifier``'s key for the topic's fleet."""
    t = parse_topic(topic)
    if not payload:
        return None
    if t.kind is TopicKind.GLOBAL:
        return GlobalFrame(payload)
    if t.kind is TopicKind.ROUND:
        head, ann = verify_message(payload, verifier, t.fleet, RoundAnnouncement)
        return Announced(ann, now, head.epoch)
    if t.kind is TopicKind.CONFIG and t.device == device:
        head, cfg = verify_message(payload, verifier, t.fleet, DeviceConfig)
        return ConfigArrived(cfg, now, head.epoch, head.round)
    if t.kind is TopicKind.STATE and t.device == device:
        # the round or config frame this device fetched: the signed header says which (checked again,
        # with the signature, by verify_message)
        kind = decode_control(payload, None)[0].kind
        if kind == RoundAnnouncement.type:
            head, ann = verify_message(payload, verifier, t.fleet, RoundAnnouncement)
            return Announced(ann, now, head.epoch)
        head, cfg = verify_message(payload, verifier, t.fleet, DeviceConfig)
        return ConfigArrived(cfg, now, head.epoch, head.round)
    if t.kind is TopicKind.DEVICE_GLOBAL and t.device == device and t.modality is not None:
        return GlobalChunk(t.modality, payload, now)
    if t.kind is TopicKind.ACK and t.device == device:
        return AckArrived(decode_message(payload, Ack), now)
    return None


def verify_global(frame: bytes, verifier: Verifier, fleet: str, stored: bool = False,
                  now: float = 0.0) -> GlobalArrived:
    """Check a signed global frame (signature, fleet, payload) and decode its tensors. Whether it is
    fresh (epoch, round) is the machine's to judge."""
    from fedmfs.core.payload import decode_model  # numpy; imported here so the protocol half stays light

    h, payload = decode_global(frame, verifier)
    if h.fleet != fleet:
        raise PayloadError(f"global model of fleet {h.fleet!r}, this device is in {fleet!r}")
    header, st = decode_model(payload)
    if header.modality != h.modality:
        raise PayloadError("global model: payload modality differs from the signed header")
    return GlobalArrived(h.modality, h.sha256, st, frame, stored, h.round, h.epoch, now)


def check_progress(obj: Any, where: str = "state.json") -> dict:
    """Validate a loaded progress document (a restart must not trip over a half-understood file)."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: {why}; move it away to start this device afresh")

    if not isinstance(obj, dict) or not isinstance(obj.get("reported"), int) or not isinstance(obj.get("stage2"), int):
        raise bad("needs integer 'reported' and 'stage2'")
    evaluated = obj.get("evaluated", obj["stage2"])   # files of earlier versions had no evaluations
    if not isinstance(evaluated, int):
        raise bad("'evaluated' must be an integer")
    # files before protocol 2 had no fleet state: no epoch seen, no announcement recorded
    fleet_state = {k: obj.get(k, FRESH_PROGRESS[k]) for k in ("epoch", "announced", "announced_state")}
    if not all(isinstance(fleet_state[k], int) and not isinstance(fleet_state[k], bool) for k in ("epoch", "announced")):
        raise bad("'epoch' and 'announced' must be integers")
    if fleet_state["announced_state"] not in {s.value for s in RoundState}:
        raise bad("'announced_state' must be open, closed or done")
    p = obj.get("pending")
    if p is not None:
        if not (isinstance(p, dict) and isinstance(p.get("round"), int) and isinstance(p.get("chosen"), list)
                and all(isinstance(m, str) for m in p["chosen"]) and isinstance(p.get("status", {}), dict)
                and isinstance(p.get("chunk_bytes"), int) and p["chunk_bytes"] > 0
                and isinstance(p.get("started", {}), dict) and isinstance(p.get("sha256", {}), dict)
                and all(isinstance(v, str) for v in p.get("sha256", {}).values())):
            raise bad("'pending' is malformed")
        p.setdefault("status", {})
    return {"reported": obj["reported"], "stage2": obj["stage2"], "evaluated": evaluated, "pending": p,
            **fleet_state}


# ------------------------------------------------------------------------------------------- machine

@dataclass(slots=True)
class _Download:
    """One global model being fetched: the payload sha256 the round names, the chunks of its signed
    frame received so far (a Reassembler, once the first chunk told the frame's size), and the chunk
    indices asked for and not yet arrived."""
    sha256: str
    asm: Reassembler | None = None
    asked: set = field(default_factory=set)
    progress_at: float = float("-inf")    # the last ask or arrival

    def ask(self, now: float, window: int, timeout: float) -> tuple[int, ...]:
        """The chunk indices to ask for now: keep about ``window`` chunks asked for; what was asked more
        than ``timeout`` seconds ago without any chunk arriving since is taken as lost."""
        if self.asked and now - self.progress_at > timeout:
            self.asked.clear()
        if len(self.asked) > window // 2:
            return ()
        missing = range(window) if self.asm is None else self.asm.missing()
        new = tuple(i for i in missing if i not in self.asked)[:window - len(self.asked)]
        if new:
            self.asked.update(new)
            self.progress_at = now
        return new


@dataclass(slots=True)
class _Job:
    kind: JobKind
    round: int
    chunk_bytes: int = 0
    stale: bool = False      # started in an earlier fleet epoch: its result is dropped


@dataclass(slots=True)
class EdgeMachine:
    """One device's round logic. Feed it events with :meth:`handle`; do what the actions say.

    ``progress``/``history`` are the persisted documents of an earlier run (None: a fresh device);
    ``payloads`` the pending round's payload bytes the adapter read back from the state directory.
    """

    device: str
    fleet: str
    ack_timeout: float = 10.0
    max_attempts: int = 30
    retry_delay: float = 1.0
    # global-model bytes asked for and not yet arrived: about two seconds of what the link delivers
    # (measured), between these bounds; a cut loses what was on its way, so a slow link asks for little
    download_window: int = 1024 * 1024
    min_download_window: int = 64 * 1024
    # with nothing missing, still ask the coordinator every this many seconds whether the round moved
    # on (a broker that restarted without persistence lost the announcements this device missed)
    idle_fetch_seconds: float = 30.0
    progress: dict = field(default_factory=lambda: copy.deepcopy(dict(FRESH_PROGRESS)))
    history: dict = field(default_factory=dict)
    payloads: dict = field(default_factory=dict)
    topics: Topics = field(init=False)
    globals: dict = field(init=False, default_factory=dict)     # modality -> (sha256, state)
    global_keys: dict = field(init=False, default_factory=dict)  # modality -> (epoch, round) of the held global
    config: DeviceConfig | None = field(init=False, default=None)
    config_key: tuple[int, int] = field(init=False, default=(-1, -1))   # (epoch, round) of the held config
    refusals: RefusalLog = field(init=False, default_factory=RefusalLog)
    announcement: RoundAnnouncement | None = field(init=False, default=None)
    uploads: dict = field(init=False, default_factory=dict)     # modality -> UploadTracker
    job: _Job | None = field(init=False, default=None)
    retry_at: float = field(init=False, default=float("-inf"))
    report_sent_at: float | None = field(init=False, default=None)
    report_attempts: int = field(init=False, default=0)
    evaluation_sent_at: float | None = field(init=False, default=None)
    evaluation_attempts: int = field(init=False, default=0)
    wire_bytes: int = field(init=False, default=0)   # MQTT PUBLISH bytes of this round's chunks (this process)
    mqtt5: bool = field(init=False, default=True)
    finished: bool = field(init=False, default=False)
    downloads: dict = field(init=False, default_factory=dict)   # modality -> _Download
    fetch_at: float = field(init=False, default=float("-inf"))  # when the next fetch is due
    download_bytes: int = field(init=False, default=0)     # chunk bytes of globals received (this process)
    failures: int = field(init=False, default=0)           # retryable job failures in a row
    download_rate: float | None = field(init=False, default=None)   # bytes/s of fetched chunks (EWMA)
    _rx: tuple[float, int] | None = field(init=False, default=None)  # (since, bytes) of the current measure

    def __post_init__(self) -> None:
        self.topics = Topics(self.fleet)
        self.progress = check_progress(copy.deepcopy(self.progress))

    # -- the entry point -------------------------------------------------------------------------
    def handle(self, ev: Event) -> list[Action]:
        if isinstance(ev, Tick):
            return self._step(ev.now)
        if isinstance(ev, AckArrived):
            return self._on_ack(ev.ack, ev.now)
        if isinstance(ev, Announced):
            return self._on_announced(ev)
        if isinstance(ev, ConfigArrived):
            return self._on_config(ev)
        if isinstance(ev, GlobalArrived):
            return self._on_global(ev)
        if isinstance(ev, GlobalChunk):
            return self._on_global_chunk(ev)
        if isinstance(ev, Connected):
            self.mqtt5 = ev.mqtt5
            # what was asked before the link dropped is lost (fetched chunks travel at QoS 0): ask again now
            for d in self.downloads.values():
                d.asked.clear()
            self.fetch_at = ev.now
            return [Publish(self.topics.status(self.device),
                            encode_message(DeviceStatus(self.device, DeviceState.ONLINE)), 1, True)]
        if isinstance(ev, Rebuilt):
            return self._on_rebuilt(ev)
        if isinstance(ev, Trained):
            return self._on_trained(ev)
        if isinstance(ev, Stage2Done):
            return self._on_stage2(ev)
        if isinstance(ev, JobFailed):
            return self._on_failed(ev)
        raise TypeError(f"not an edge event: {ev!r}")

    @property
    def busy(self) -> bool:
        return self.job is not None

    # -- helpers ---------------------------------------------------------------------------------
    def _snapshot(self) -> list[Action]:
        return [SaveProgress(copy.deepcopy(self.progress))]

    def _history_snapshot(self) -> SaveHistory:
        return SaveHistory(copy.deepcopy(self.history))

    def _have_globals(self, ann: RoundAnnouncement) -> bool:
        return all(self.globals.get(m, ("",))[0] == sha for m, sha in ann.globals.items())

    def deploy_states(self) -> dict:
        """The globals the current announcement lists (all held ones before any announcement)."""
        ann = self.announcement
        return {m: st for m, (sha, st) in self.globals.items() if ann is None or ann.globals.get(m) == sha}

    def _frames(self, up: UploadTracker, frames: list[bytes], round_index: int) -> list[Action]:
        topic = self.topics.upload(self.device, round_index, up.modality)
        for f in frames:
            self.wire_bytes += publish_packet_bytes(topic, len(f), 1, self.mqtt5)
        return [Publish(topic, f, 1, False, chunk=True) for f in frames]

    # -- fleet state: signed, of this fleet, fresh -------------------------------------------------
    def _older_epoch(self, epoch: int) -> bool:
        return 0 <= epoch < self.progress["epoch"]

    def _on_announced(self, ev: Announced) -> list[Action]:
        ann, p = ev.announcement, self.progress
        if ann.fleet != self.fleet:
            self.refusals.refuse("round-fleet", ev.now, "refused a round message of fleet %r (this device is in %r)",
                                 ann.fleet, self.fleet)
            return []
        if self._older_epoch(ev.epoch):
            self.refusals.refuse("round-epoch", ev.now, "refused round %d (%s): fleet epoch %d is older than this "
                                 "device's %d, a replay from an earlier fleet", ann.round, ann.state.value, ev.epoch,
                                 p["epoch"])
            return []
        out: list[Action] = []
        if 0 <= p["epoch"] < ev.epoch:
            out += self._new_epoch(ev.epoch)
        elif p["epoch"] == ev.epoch:
            held = (p["announced"], _STATE_ORDER[RoundState(p["announced_state"])])
            if (ann.round, _STATE_ORDER[ann.state]) < held:
                self.refusals.refuse("round-replay", ev.now, "refused round %d (%s): older than round %d (%s) "
                                     "this device has seen, a replay", ann.round, ann.state.value, p["announced"],
                                     p["announced_state"])
                return []
        self.announcement = ann
        new = {"epoch": ev.epoch, "announced": ann.round, "announced_state": ann.state.value}
        if any(p[k] != v for k, v in new.items()):
            p.update(new)
            out += self._snapshot()
        return out

    def _new_epoch(self, epoch: int) -> list[Action]:
        """The coordinator signs a later fleet epoch: the operator re-created the fleet. The round
        bookkeeping of the old fleet ends here (its pending upload too); local models stay."""
        p = self.progress
        log.warning("fleet epoch %d follows this device's %d: the fleet was re-created; round bookkeeping "
                    "starts afresh (reported round %d forgotten)", epoch, p["epoch"], p["reported"])
        p.update(reported=-1, stage2=-1, evaluated=-1, pending=None, epoch=epoch, announced=-1,
                 announced_state=RoundState.OPEN.value)
        if self.job is not None:
            self.job.stale = True
        self.uploads.clear()
        self.payloads = {}
        self.report_sent_at, self.report_attempts = None, 0
        self.evaluation_sent_at, self.evaluation_attempts = None, 0
        self.wire_bytes = 0
        self.finished = False
        return [DropPending()]

    def _on_config(self, ev: ConfigArrived) -> list[Action]:
        if ev.config.device != self.device:
            self.refusals.refuse("config-device", ev.now, "refused a config naming device %r (this is %r)",
                                 ev.config.device, self.device)
            return []
        key = (ev.epoch, ev.round)
        if self._older_epoch(ev.epoch):
            self.refusals.refuse("config-epoch", ev.now, "refused a config of fleet epoch %d: older than this "
                                 "device's %d, a replay from an earlier fleet", ev.epoch, self.progress["epoch"])
            return []
        if key < self.config_key:
            self.refusals.refuse("config-replay", ev.now, "refused a config of epoch %d round %d: older than the "
                                 "one held (epoch %d round %d), a replay", *key, *self.config_key)
            return []
        self.config, self.config_key = ev.config, key
        return []

    def _on_global(self, ev: GlobalArrived) -> list[Action]:
        # No upper bound is needed on the round: a frame signed with this epoch was made by the
        # coordinator, so it cannot be from a round that has not happened.
        key = (ev.epoch, ev.round)
        held = self.global_keys.get(ev.modality)
        what = "stored global" if ev.stored else "global"
        if self._older_epoch(ev.epoch):
            self.refusals.refuse(f"global-epoch-{ev.modality}", ev.now, "refused %s %s of fleet epoch %d: older "
                                 "than this device's %d, a replay from an earlier fleet", what, ev.modality, ev.epoch,
                                 self.progress["epoch"])
            return []
        if held is not None and key < held:
            self.refusals.refuse(f"global-replay-{ev.modality}", ev.now, "refused %s %s of round %d (epoch %d): "
                                 "older than the one held, of round %d (epoch %d), a replay", what, ev.modality,
                                 ev.round, ev.epoch, held[1], held[0])
            return []
        self.globals[ev.modality] = (ev.sha256, ev.state)
        self.global_keys[ev.modality] = key
        return [] if ev.stored else [SaveGlobal(ev.modality, ev.frame)]

    # -- events ----------------------------------------------------------------------------------
    def _on_ack(self, ack: Ack, now: float) -> list[Action]:
        if ack.reason is AckReason.EVALUATION_ACCEPTED:
            if ack.round <= self.progress["evaluated"]:
                return []
            log.info("round %d: evaluation recorded by the coordinator", ack.round)
            return self._evaluated(ack.round)
        pending = self.progress["pending"]
        if pending is None or ack.round != pending["round"]:
            log.debug("ack %s for round %d, modality %s: not for a pending upload", ack.reason.value, ack.round,
                      ack.modality)
            return []
        if ack.modality is None:
            if ack.reason in (AckReason.REPORT_ACCEPTED, AckReason.ROUND_CLOSED):
                log.info("round %d: report %s", pending["round"], "recorded by the coordinator"
                         if ack.reason is AckReason.REPORT_ACCEPTED else "answered round_closed: the round is over")
                return self._finish_round(pending["round"])
            log.warning("round %d: report refused: %s (%s)", pending["round"], ack.reason.value, ack.detail)
            return []
        up = self.uploads.get(ack.modality)
        if up is None or up.done or (ack.sha256 and ack.sha256 != up.sha256):
            return []
        r = pending["round"]
        if ack.reason is AckReason.ACCEPTED:
            log.info("round %d: %s accepted by the coordinator (%s)", r, up.modality, ack.detail)
        elif ack.reason is AckReason.MISSING_CHUNKS:
            log.info("round %d: %s: the coordinator lacks %d of %d chunks; resending them", r, up.modality,
                     len(ack.missing), len(up.frames))
        elif ack.reason is AckReason.BAD_CHUNK:
            log.warning("round %d: %s: bad_chunk (%s); restarting this upload", r, up.modality, ack.detail)
        else:
            log.warning("round %d: %s refused: %s (%s)", r, up.modality, ack.reason.value, ack.detail)
        out = self._frames(up, up.on_ack(ack, now), r)
        out += self._settle(up, pending)
        return out

    def _settle(self, up: UploadTracker, pending: dict) -> list[Action]:
        """Record an upload that is over (once) and drop its frames not yet sent."""
        if not up.done or up.modality in pending["status"]:
            return []
        pending["status"][up.modality] = up.reason.value if up.reason else up.status.value
        if up.status is UploadStatus.FAILED:
            log.error("round %d: %s: no answer after %d probes; giving this upload up", pending["round"],
                      up.modality, up.attempts)
        return [CancelChunks(self.topics.upload(self.device, pending["round"], up.modality)), *self._snapshot()]

    def _on_global_chunk(self, ev: GlobalChunk) -> list[Action]:
        m = ev.modality
        d = self.downloads.get(m)
        if d is None:
            return []       # not asked for (any more): a late or repeated chunk
        try:
            h, data = decode_chunk(ev.frame)
            if d.asm is None or d.asm.header.sha256 != h.sha256:
                d.asm = Reassembler(h)     # the frame's size is known from its first chunk
                d.asked = {i for i in d.asked if i < h.total}
            res = d.asm.add(h, data)
        except PayloadError as e:
            d.asm = None
            d.asked.clear()
            self.refusals.refuse(f"global-chunk-{m}", ev.now, "refused a chunk of global %s: %s", m, e)
            return []
        self.download_bytes += len(data)
        self._measure(ev.now, len(ev.frame))
        d.asked.discard(h.index)
        d.progress_at = ev.now
        if res.payload is None:
            return []
        del self.downloads[m]
        log.info("global %s fetched: %d bytes in %d chunks", m, len(res.payload), h.total)
        return [CheckGlobal(m, res.payload)]

    def _measure(self, now: float, n: int) -> None:
        """The rate chunks arrive at, over periods of at least 2 s (a gap of 10 s starts afresh)."""
        since, got = self._rx if self._rx is not None and now - self._rx[0] <= 10.0 else (now, 0)
        got += n
        if now - since >= 2.0:
            rate = got / (now - since)
            self.download_rate = rate if self.download_rate is None else 0.5 * self.download_rate + 0.5 * rate
            since, got = now, 0
        self._rx = (since, got)

    def _round_config(self) -> DeviceConfig:
        """The config a round trains and selects with: the coordinator's, with the byte cap lowered to
        what the link carries in the policy's ``upload_seconds`` (dynamic bandwidth) once the device has
        measured its link (the rate its fetched chunks arrived at)."""
        assert self.config is not None
        p = self.config.policy
        cap = p.link_cap(self.download_rate)
        if cap == p.cap_bytes:
            return self.config
        log.info("link %.0f B/s x %g s: this round's cap %d bytes (the coordinator's: %s)", self.download_rate or 0,
                 p.upload_seconds, cap, p.cap_bytes)
        return replace(self.config, policy=replace(p, cap_bytes=cap))

    def window_bytes(self) -> int:
        """How many chunk bytes to keep asked for: about 2 s of the measured rate, within bounds."""
        if self.download_rate is None:
            return self.min_download_window
        return int(min(self.download_window, max(self.min_download_window, 2.0 * self.download_rate)))

    def _fetch(self, now: float) -> list[Action]:
        """Ask the coordinator for what this device lacks (docs/protocol.md "Fetching fleet state"): the
        chunks of the globals the round names that it does not hold (a window at a time, again after a
        timeout or a reconnect), the round and its config while it has none, and otherwise, now and then,
        whether the round moved on."""
        ann = self.announcement
        wants: list[GlobalWant] = []
        if ann is not None and ann.fleet == self.fleet:
            wanted = {m: sha for m, sha in ann.globals.items() if self.globals.get(m, ("",))[0] != sha}
            for m in [m for m, d in self.downloads.items() if wanted.get(m) != d.sha256]:
                del self.downloads[m]
            window = max(2, min(MAX_FETCH_CHUNKS, self.window_bytes() // ann.chunk_bytes))
            for m, sha in sorted(wanted.items()):
                d = self.downloads.setdefault(m, _Download(sha))
                idx = d.ask(now, window, self.ack_timeout)
                if idx:
                    wants.append(GlobalWant(m, sha, idx))
        else:
            self.downloads.clear()
        if not wants and now < self.fetch_at:
            return []
        lacking = ann is None or self.config is None or bool(self.downloads)
        self.fetch_at = now + (self.ack_timeout if lacking else self.idle_fetch_seconds)
        p = self.progress
        msg = Fetch(self.device, p["epoch"], p["announced"], RoundState(p["announced_state"]), self.config is None,
                    tuple(wants))
        if wants:
            log.debug("fetching %s", ", ".join(f"{w.modality} chunks {list(w.chunks)}" for w in wants))
        return [Publish(self.topics.fetch(self.device), encode_message(msg), 1, False)]

    def _on_trained(self, ev: Trained) -> list[Action]:
        job = self.job
        if job is None or job.kind is not JobKind.TRAIN or job.round != ev.round:
            log.error("a training result for round %d that nobody asked for; ignored", ev.round)
            return []
        self.job = None
        self.failures = 0
        if job.stale:
            log.info("a training result for round %d of an earlier fleet epoch; dropped", ev.round)
            return []
        self.history.setdefault(str(ev.round), {})["record"] = ev.record.to_dict()
        self.payloads = {m: ev.payloads[m] for m in ev.chosen}
        self.progress["pending"] = {"round": ev.round, "chosen": list(ev.chosen), "status": {},
                                    "chunk_bytes": job.chunk_bytes,
                                    "sha256": {m: hashlib.sha256(self.payloads[m]).hexdigest() for m in ev.chosen}}
        log.info("round %d: trained, uploading %s", ev.round, ", ".join(ev.chosen) or "nothing")
        return [self._history_snapshot(), *self._snapshot()]

    def _on_stage2(self, ev: Stage2Done) -> list[Action]:
        job = self.job
        if job is None or job.kind is not JobKind.STAGE2 or job.round != ev.round:
            log.error("a Stage #2 result for round %d that nobody asked for; ignored", ev.round)
            return []
        self.job = None
        self.failures = 0
        if job.stale:
            log.info("a Stage #2 result for round %d of an earlier fleet epoch; dropped", ev.round)
            return []
        h = self.history.setdefault(str(ev.round), {})
        h["accuracy"], h["windows"] = ev.accuracy, ev.windows
        self.progress["stage2"] = ev.round
        self.evaluation_sent_at, self.evaluation_attempts = None, 0
        return [self._history_snapshot(), *self._snapshot()]

    def _on_failed(self, ev: JobFailed) -> list[Action]:
        self.job = None
        if not ev.retryable:
            return [Fatal(f"{ev.kind.value} of round {ev.round} failed: {ev.error}", ev.exit_code)]
        # a fault that persists (a full disk) is retried ever less often, up to once a minute, and
        # logged at most once a minute: one line each, no traceback
        self.failures += 1
        delay = min(60.0, self.retry_delay * 2 ** (self.failures - 1))
        self.retry_at = ev.now + delay
        self.refusals.refuse("job-failed", ev.now, "%s of round %d failed (retry in %.0f s; failure %d in a row): %s",
                             ev.kind.value, ev.round, delay, self.failures, ev.error, level=logging.ERROR)
        return []

    # -- the round ---------------------------------------------------------------------------------
    def _start(self, job: _Job, action: Action, now: float) -> list[Action]:
        if self.job is not None or now < self.retry_at:
            return []
        self.job = job
        return [action]

    def _step(self, now: float) -> list[Action]:
        out: list[Action] = self._fetch(now)
        ann = self.announcement
        if ann is None or self.config is None or ann.fleet != self.fleet or self.finished:
            return out
        if not self._have_globals(ann):
            return out   # the globals of this round are being fetched
        pending = self.progress["pending"]
        if pending is not None and (pending["round"] != ann.round or ann.state is not RoundState.OPEN):
            log.info("round %d closed before this device finished it", pending["round"])
            out += self._finish_round(pending["round"])
            pending = None
        if ann.state is RoundState.CLOSED:
            return out
        last_closed = ann.round - 1 if ann.state is RoundState.OPEN else ann.round
        if self.progress["stage2"] < last_closed and last_closed >= 0:
            return out + self._start(_Job(JobKind.STAGE2, last_closed),
                                     RunStage2(last_closed, self.deploy_states()), now)
        if self.progress["evaluated"] < self.progress["stage2"]:
            out += self._send_evaluation(now)
        if ann.state is RoundState.DONE:
            if self.job is None and self.progress["evaluated"] >= last_closed:
                # a job still running (a slow last round) or an unrecorded evaluation is waited for
                self.finished = True
                out.append(Finished())
            return out
        if pending is None and self.progress["reported"] < ann.round:
            starts = {m: st for m, (sha, st) in self.globals.items() if m in ann.globals}
            return out + self._start(_Job(JobKind.TRAIN, ann.round, ann.chunk_bytes),
                                     StartTraining(ann.round, starts, self.deploy_states(), self._round_config()), now)
        if pending is not None:
            out += self._drive_uploads(pending, now)
        return out

    def _payload(self, pending: dict, m: str) -> bytes | None:
        """The pending payload of ``m`` if it is intact (its sha256 is the one recorded when it was made)."""
        payload = self.payloads.get(m)
        want = pending.get("sha256", {}).get(m)
        if payload is not None and want and hashlib.sha256(payload).hexdigest() != want:
            log.error("round %d: the pending payload of %s is damaged (its sha256 is not the one recorded when "
                      "it was made); not sending it", pending["round"], m)
            self.payloads.pop(m, None)
            return None
        return payload

    def _drive_uploads(self, pending: dict, now: float) -> list[Action]:
        r = pending["round"]
        out: list[Action] = []
        lost = []
        for m in pending["chosen"]:
            if m in pending["status"] or m in self.uploads:
                continue
            payload = self._payload(pending, m)
            if payload is None:
                lost.append(m)
                continue
            up = UploadTracker(m, payload, pending["chunk_bytes"], self.ack_timeout, self.max_attempts)
            self.uploads[m] = up
            # after a restart the coordinator may hold part of it: probe first, resend what it lacks
            resume = pending.get("started", {}).get(m, False)
            if resume:
                log.info("round %d: resuming the upload of %s (%d chunks): probing for what the coordinator lacks",
                         r, m, len(up.frames))
            out += self._frames(up, up.start(now, resume=resume), r)
            pending.setdefault("started", {})[m] = True
            out += self._snapshot()
        if lost and not (self.job is not None and self.job.kind is JobKind.REBUILD):
            job = []
            if not pending.get("rebuilt") and self.config is not None:
                # rebuild them from the saved local models (in the worker), once
                job = self._start(_Job(JobKind.REBUILD, r),
                                  RebuildPayloads(r, tuple(lost), self.config.policy.codec), now)
            if job:
                log.warning("round %d: rebuilding the payload of %s from the saved local model", r, ", ".join(lost))
                pending["rebuilt"] = True
                out += [*self._snapshot(), *job]
            elif pending.get("rebuilt"):
                for m in lost:
                    log.error("round %d: the payload of %s is lost and could not be rebuilt; giving it up", r, m)
                    pending["status"][m] = UploadStatus.FAILED.value
                out += self._snapshot()
        for up in self.uploads.values():
            frames = up.on_tick(now)
            if frames and up.status is UploadStatus.WAITING:
                log.info("round %d: %s: no answer for %.0f s; probing (attempt %d of %d)", r, up.modality,
                         self.ack_timeout, up.attempts, self.max_attempts)
            out += self._frames(up, frames, r)
            out += self._settle(up, pending)
        if all(m in pending["status"] for m in pending["chosen"]):
            out += self._send_report(pending, now)
        return out

    def _on_rebuilt(self, ev: Rebuilt) -> list[Action]:
        job = self.job
        if job is None or job.kind is not JobKind.REBUILD or job.round != ev.round:
            log.error("rebuilt payloads for round %d that nobody asked for; ignored", ev.round)
            return []
        self.job = None
        pending = self.progress["pending"]
        if pending is None or pending["round"] != ev.round or job.stale:
            return []
        for m, payload in ev.payloads.items():
            sha = hashlib.sha256(payload).hexdigest()
            if sha != pending.get("sha256", {}).get(m):
                log.warning("round %d: the rebuilt payload of %s differs from the one made in training (sha256 %s); "
                            "sending it", ev.round, m, sha[:12])
            else:
                log.info("round %d: the payload of %s rebuilt from the saved local model", ev.round, m)
            pending.setdefault("sha256", {})[m] = sha
            self.payloads[m] = payload
        return self._snapshot()

    def _send_report(self, pending: dict, now: float) -> list[Action]:
        if self.report_sent_at is not None and now - self.report_sent_at < self.ack_timeout:
            return []
        if self.report_attempts >= self.max_attempts:
            log.error("round %d: no answer to the report after %d attempts", pending["round"], self.report_attempts)
            return self._finish_round(pending["round"])
        r = pending["round"]
        try:
            record = RoundRecord.from_dict(self.history.get(str(r), {}).get("record"))
        except PayloadError as e:   # history.json damaged: report what is known for sure
            log.error("round %d: the round record is unreadable (%s); reporting the choice only", r, e)
            record = RoundRecord(self.device, r, 0, chosen=tuple(pending["chosen"]),
                                 sizes={m: 0 for m in pending["chosen"]})
        accepted = tuple(m for m in pending["chosen"] if pending["status"].get(m) == AckReason.ACCEPTED.value)
        rep = Report(record, accepted, sum(int(record.sizes.get(m, 0)) for m in accepted), self.wire_bytes)
        self.report_sent_at = now
        self.report_attempts += 1
        return [Publish(self.topics.report(self.device), encode_message(rep), 1, False)]

    def _send_evaluation(self, now: float) -> list[Action]:
        r = self.progress["stage2"]
        if self.evaluation_sent_at is not None and now - self.evaluation_sent_at < self.ack_timeout:
            return []
        if self.evaluation_attempts >= self.max_attempts:
            log.error("round %d: no answer to the evaluation after %d attempts; giving it up", r,
                      self.evaluation_attempts)
            return self._evaluated(r)
        h = self.history.get(str(r), {})
        if "accuracy" not in h:   # history.json lost: Stage #2 is redone on the next step
            log.error("round %d: the Stage #2 accuracy is not in the history; running Stage #2 again", r)
            self.progress["stage2"] = r - 1
            return self._snapshot()
        self.evaluation_sent_at = now
        self.evaluation_attempts += 1
        ev = Evaluation(self.device, r, float(h["accuracy"]), int(h.get("windows", 0)))
        return [Publish(self.topics.report(self.device), encode_message(ev), 1, False)]

    def _evaluated(self, r: int) -> list[Action]:
        self.progress["evaluated"] = max(self.progress["evaluated"], r)
        self.evaluation_sent_at, self.evaluation_attempts = None, 0
        return self._snapshot()

    def _finish_round(self, r: int) -> list[Action]:
        pending = self.progress["pending"] or {}
        h = self.history.setdefault(str(r), {})
        h["acks"] = dict(pending.get("status", {}))
        h["wire_bytes"] = h.get("wire_bytes", 0) + self.wire_bytes
        h["payload_bytes_sent"] = sum(up.frame_bytes_sent for up in self.uploads.values())
        self.wire_bytes = 0
        self.progress["reported"] = max(self.progress["reported"], r)
        self.progress["pending"] = None
        self.uploads.clear()
        self.payloads = {}
        self.report_sent_at = None
        self.report_attempts = 0
        return [self._history_snapshot(), *self._snapshot(), DropPending()]
