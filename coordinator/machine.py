"""The coordinator's round machine, sans-I/O: events in, actions out; no sockets, threads or clocks.

The pair of :class:`fedmfs.edge.machine.EdgeMachine`. The MQTT service (fedmfs.coordinator.service),
the in-process simulator (fedmfs.sim.driver), the tests and the benchmarks drive the same machine.
Events carry the time (``now``, unix seconds) and the raw bytes from the wire; actions say what to
publish, what to persist (always before the ack that promises it) and what happened (for metrics).

Invariants the tests check by replaying event orders:

* an upload is counted at most once per (round, device, modality); an identical re-send is answered
  ``accepted`` again; a different second upload is refused ``duplicate``;
* bytes accepted for a device in a round never exceed the cap it had when the round opened;
* bounded influence: an upload counts with at most its device's ``max_samples`` as weight (a larger
  claim is refused ``too_many_samples``) and with its update (upload - current global) clipped to
  :func:`~fedmfs.core.aggregation.clip_bound`; so under the weighted mean a new global is at most C from
  the old one, and one device of weight w displaces it from what the honest uploads (weight W_h, mean
  update D_h) alone give by at most ``w / (w + W_h) * (C + ||D_h||)`` (docs/protocol.md "Bounded influence");
* only devices of the fleet file are recorded online or offline;
* every ``round``, ``config`` and global it publishes is signed with the fleet epoch (docs/protocol.md
  "Signed fleet state"), so devices can refuse forged and replayed fleet state;
* nothing a peer sends raises out of :meth:`CoordinatorMachine.handle`: it becomes an ack with a reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedmfs.core.aggregation import DEFAULT_RULE, Aggregator, clip_bound, clip_update, make_aggregator, update_norm
from fedmfs.core.errors import PayloadError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.payload import MAX_SAMPLES, Codec, ModelHeader, decode_model, encode_model
from fedmfs.core.wire import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    Ack,
    AckReason,
    DeviceConfig,
    DeviceState,
    DeviceStatus,
    Evaluation,
    Fetch,
    Publish,
    Reassembler,
    Report,
    RoundAnnouncement,
    RoundState,
    Signer,
    Tick,
    TopicKind,
    Topics,
    decode_chunk,
    decode_global,
    decode_message,
    encode_global,
    encode_message,
    parse_topic,
    sign_message,
    split_payload,
)

__all__ = [
    "ChunkArrived",
    "CoordinatorMachine",
    "DeviceAhead",
    "FetchArrived",
    "FleetChanged",
    "GlobalModel",
    "PersistEvaluation",
    "PersistGlobal",
    "PersistReport",
    "PersistRound",
    "PersistStatus",
    "PersistUpload",
    "Publish",
    "Reconnected",
    "Refused",
    "ReportArrived",
    "RoundClosed",
    "RoundPolicy",
    "Start",
    "StatusArrived",
    "Tick",
    "event_for",
    "modality_shapes",
]

log = logging.getLogger("fedmfs.coordinator.machine")
State = dict[str, np.ndarray]
# announcements of one round are ordered: a round opens, closes, and the last one ends the run
_STATE_ORDER = {RoundState.OPEN: 0, RoundState.CLOSED: 1, RoundState.DONE: 2}


def modality_shapes(spec: ModalitySpec, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a modality model (fedmfs.learner.models.ModalityModel), derived without torch."""
    h, f = spec.hidden, spec.features
    return {
        "lstm.weight_ih_l0": (4 * h, f), "lstm.weight_hh_l0": (4 * h, h),
        "lstm.bias_ih_l0": (4 * h,), "lstm.bias_hh_l0": (4 * h,),
        "head.weight": (num_classes, h), "head.bias": (num_classes,),
    }


@dataclass(frozen=True, slots=True)
class RoundPolicy:
    """How rounds run. ``quorum``: reports needed to aggregate at the deadline; ``aggregation``: the
    per-modality rule (weighted_mean, trimmed_mean or median, :func:`fedmfs.core.aggregation.make_aggregator`);
    ``max_update_ratio`` and ``min_update_rms``: the update-norm bound C = max(ratio * ||global||,
    rms * sqrt(parameters)) each upload is clipped to (:func:`fedmfs.core.aggregation.clip_bound`;
    ``inf`` turns clipping off)."""

    rounds_total: int = 10
    round_seconds: float = 600.0
    quorum: int = 1
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    aggregation: str = DEFAULT_RULE
    max_update_ratio: float = 1.0     # 3.7 x the largest honest update measured (docs/protocol.md)
    min_update_rms: float = 0.01
    # global-model chunks one device may fetch per round, as a multiple of the fleet's global models'
    # bytes (a device on a flaky link re-fetches what its cuts lost; one that asks for more is hostile)
    fetch_budget: float = 8.0

    def __post_init__(self) -> None:
        if self.rounds_total < 1:
            raise ValueError(f"rounds_total must be >= 1, got {self.rounds_total}")
        if not (self.round_seconds > 0 and math.isfinite(self.round_seconds)):
            raise ValueError(f"round_seconds must be > 0, got {self.round_seconds}")
        if self.quorum < 1:
            raise ValueError(f"quorum must be >= 1, got {self.quorum}")
        if not 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {self.chunk_bytes}")
        make_aggregator(self.aggregation)   # names the allowed rules when this one is unknown
        for k in ("max_update_ratio", "min_update_rms"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise ValueError(f"{k} must be a number >= 0 (inf: no clipping), got {v!r}")
        if isinstance(self.fetch_budget, bool) or not isinstance(self.fetch_budget, (int, float)) \
                or not self.fetch_budget >= 1:
            raise ValueError(f"fetch_budget must be a number >= 1, got {self.fetch_budget!r}")
        if not self.max_update_ratio and not self.min_update_rms:
            raise ValueError("max_update_ratio and min_update_rms are both 0: every update would be clipped to "
                             "nothing; set max_update_ratio > 0")


# --------------------------------------------------------------------------------------------- events

@dataclass(frozen=True, slots=True)
class Start:
    """The service is up (fresh or resumed): (re)publish configs, globals and the round."""
    now: float


@dataclass(frozen=True, slots=True)
class ChunkArrived:
    device: str
    round: int
    modality: str
    frame: bytes
    now: float


@dataclass(frozen=True, slots=True)
class ReportArrived:
    device: str
    data: bytes
    now: float


@dataclass(frozen=True, slots=True)
class StatusArrived:
    device: str
    data: bytes
    now: float


@dataclass(frozen=True, slots=True)
class FetchArrived:
    """A device asks for the fleet state it lacks (a ``fetch`` message on its ``fetch`` topic)."""
    device: str
    data: bytes
    now: float


@dataclass(frozen=True, slots=True)
class Reconnected:
    """The service's broker link came back (the broker may have restarted without its retained
    messages): publish the fleet state again."""
    now: float


@dataclass(frozen=True, slots=True)
class FleetChanged:
    """The fleet file changed: new configs apply from the next round (caps of the open round stay)."""
    devices: tuple[DeviceConfig, ...]
    now: float


Event = Start | ChunkArrived | ReportArrived | StatusArrived | FetchArrived | Reconnected | Tick | FleetChanged


# -------------------------------------------------------------------------------------------- actions

@dataclass(frozen=True, slots=True)
class PersistUpload:
    """Write the accepted payload and its ledger row before the ``accepted`` ack goes out."""
    round: int
    device: str
    modality: str
    payload: bytes
    sha256: str
    samples: int


@dataclass(frozen=True, slots=True)
class PersistReport:
    round: int
    device: str
    report: Report


@dataclass(frozen=True, slots=True)
class PersistEvaluation:
    """A device's Stage #2 accuracy after ``round`` (recorded once; the report's accuracy column)."""
    evaluation: Evaluation


@dataclass(frozen=True, slots=True)
class PersistRound:
    round: int
    state: RoundState
    deadline: float
    opened_at: float
    expected: tuple[str, ...]
    caps: Mapping[str, int | None]
    closed_at: float | None = None
    aggregated: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PersistGlobal:
    modality: str
    version: int
    round: int       # the round this global is trained from (initial models: 0)
    frame: bytes     # the signed frame as published
    sha256: str      # of the payload inside the frame


@dataclass(frozen=True, slots=True)
class PersistStatus:
    """A fleet device said it is online or offline (its status message, decoded and checked)."""
    device: str
    online: bool


@dataclass(frozen=True, slots=True)
class Refused:
    round: int
    device: str
    modality: str | None
    reason: AckReason
    nbytes: int
    detail: str


@dataclass(frozen=True, slots=True)
class DeviceAhead:
    """A device holds a signed round of this fleet epoch later than the coordinator's: the ledger lost
    writes (docs/reliability.md). Logged and counted; the operator runs ``fedmfs-coordinator recover``."""
    device: str
    device_round: int
    round: int


@dataclass(frozen=True, slots=True)
class RoundClosed:
    round: int
    duration: float
    aggregated: Mapping[str, int]
    quorum_met: bool
    reported: tuple[str, ...]


Action = (Publish | PersistUpload | PersistReport | PersistEvaluation | PersistRound | PersistGlobal | PersistStatus
          | Refused | RoundClosed | DeviceAhead)


@dataclass(slots=True)
class GlobalModel:
    state: State
    version: int
    frame: bytes
    sha256: str
    round: int
    _chunks: tuple[int, list[bytes]] | None = None

    def chunks(self, chunk_bytes: int) -> list[bytes]:
        """The signed frame as chunk frames (what a device fetches), made once per chunk size."""
        if self._chunks is None or self._chunks[0] != chunk_bytes:
            self._chunks = (chunk_bytes, split_payload(self.frame, chunk_bytes))
        return self._chunks[1]


@dataclass(slots=True)
class _Accepted:
    sha256: str
    nbytes: int


class CoordinatorMachine:
    """One fleet's rounds. Create it, ``seed_globals`` (fresh) or ``restore_*`` (resumed), then feed
    events to :meth:`handle` and execute the returned actions in order."""

    def __init__(self, fleet: str, spec: DatasetSpec, devices: tuple[DeviceConfig, ...], policy: RoundPolicy,
                 signer: Signer, epoch: int = 0):
        self.topics = Topics(fleet)
        self.fleet = fleet
        # the fleet epoch: set once when the fleet's ledger is created (coordinator.service), signed into
        # every round, config and global, so a device tells this fleet's life from an earlier one's
        self.epoch = int(epoch)
        self.spec = spec
        self.policy = policy
        self.signer = signer
        self.devices: dict[str, DeviceConfig] = {}
        self._set_devices(devices)
        self.shapes = {m.name: modality_shapes(m, spec.num_classes) for m in spec.modalities}
        self.globals: dict[str, GlobalModel] = {}
        self.round = 0
        self.state = RoundState.CLOSED   # not yet opened
        self.deadline = 0.0
        self.opened_at = 0.0
        self.expected: tuple[str, ...] = ()
        self.caps: dict[str, int | None] = {}
        self.online: dict[str, bool] = {}
        self.evaluations: dict[tuple[int, str], float] = {}   # (round, device) -> Stage #2 accuracy
        self.max_samples: dict[str, int] = {d: c.max_samples for d, c in self.devices.items()}
        self.gammas: dict[str, int] = self._gammas()
        self._strangers = _RateLimitedNote(60.0)
        self._ahead = _RateLimitedNote(60.0, logging.ERROR)
        self._greedy = _RateLimitedNote(60.0)
        self._reset_round()

    # -- setup -------------------------------------------------------------------------------------
    def _set_devices(self, devices: tuple[DeviceConfig, ...]) -> None:
        ids = [d.device for d in devices]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate device ids in the fleet: {ids}")
        if not ids:
            raise ValueError("the fleet has no devices")
        self.devices = {d.device: d for d in devices}

    def _gammas(self) -> dict[str, int]:
        """How many modalities each device may have accepted in a round: its policy's gamma (every
        modality of the fleet for the methods that upload all)."""
        return {d: c.policy.gamma_for(len(self.spec.modalities)) for d, c in self.devices.items()}

    def _reset_round(self) -> None:
        self.served: dict[str, int] = {}      # global-model bytes fetched per device this round
        self.accepted: dict[tuple[str, str], _Accepted] = {}
        self.used: dict[str, int] = {}
        self.reported: dict[str, Report] = {}
        self.partial: dict[tuple[str, str], Reassembler] = {}
        self.refused: dict[tuple[str, str, str], AckReason] = {}
        self.aggs: dict[str, Aggregator] = {}

    def seed_globals(self, initial: Mapping[str, State]) -> list[Action]:
        """Install the initial (version 0) global models every device starts round 0 from."""
        out: list[Action] = []
        for m, st in initial.items():
            self._check_shapes(m, st)
            out += self._install_global(m, st, version=0, round_index=0, samples=1)
        return out

    def restore_global(self, modality: str, version: int, round_index: int, frame: bytes) -> None:
        """A global from the ledger, signed again with this epoch and protocol (Ed25519 is deterministic:
        a frame that is already current comes out byte for byte the same)."""
        h, payload = decode_global(frame, None)
        _, st = decode_model(payload)
        frame = encode_global(self.fleet, round_index, modality, payload, self.signer, self.epoch)
        self.globals[modality] = GlobalModel(st, version, frame, h.sha256, round_index)

    def restore_round(self, round_index: int, state: RoundState, deadline: float, opened_at: float,
                      expected: tuple[str, ...], caps: Mapping[str, int | None], now: float | None = None,
                      left: float | None = None) -> None:
        """The open round after a restart: its caps from the ledger, its sample bounds and gammas from
        the fleet file as it is now (the ledger does not keep them). With ``now``, the deadline is read
        back as the time that was left (``left``, as the service last recorded it; else the stored
        deadline minus ``now``), clamped to [``restart_grace``, the round's length]: a clock that stepped
        while the coordinator was down neither closes the round at once nor stretches it."""
        self.round, self.state, self.deadline, self.opened_at = round_index, state, deadline, opened_at
        if now is not None and state is RoundState.OPEN:
            full = max(deadline - opened_at, self.policy.round_seconds)   # with an extension (see _deadline)
            left = deadline - now if left is None else left
            self.deadline = now + min(max(left, self.restart_grace), full)
        self.expected, self.caps = tuple(expected), dict(caps)
        self.max_samples = {d: c.max_samples for d, c in self.devices.items()}
        self.gammas = self._gammas()
        self._reset_round()

    @property
    def restart_grace(self) -> float:
        """Seconds a resumed round stays open at least: devices re-send what the restart lost."""
        return min(60.0, self.policy.round_seconds / 4)

    def restore_upload(self, device: str, modality: str, payload: bytes) -> None:
        """Re-add an upload the ledger says was accepted in the open round (after a restart), bounded
        as when it was accepted: the same global clips it; its weight at most the device's bound now."""
        header, st = decode_model(payload)
        st, _, _ = self._clip(modality, st)
        samples = min(header.samples, self.max_samples.get(device, header.samples))
        self._count(device, modality, samples, st, hashlib.sha256(payload).hexdigest(), len(payload))

    def restore_report(self, report: Report) -> None:
        self.reported[report.device] = report

    # -- helpers -----------------------------------------------------------------------------------
    def _check_shapes(self, modality: str, st: State) -> None:
        want = self.shapes[modality]
        if set(st) != set(want):
            raise ValueError(f"tensor names differ: missing {sorted(set(want) - set(st))}, "
                             f"unexpected {sorted(set(st) - set(want))}")
        bad = [(k, tuple(st[k].shape), want[k]) for k in want if tuple(st[k].shape) != want[k]]
        if bad:
            raise ValueError("wrong shapes (name, got, want): " + ", ".join(map(str, bad)))

    def _install_global(self, m: str, st: State, version: int, round_index: int, samples: int) -> list[Action]:
        # the header's samples: the round's total weight, within what a payload header may claim
        payload = encode_model(st, ModelHeader(round=round_index, modality=m,
                                               samples=min(MAX_SAMPLES, max(1, int(samples))), codec=Codec.FP32))
        frame = encode_global(self.fleet, round_index, m, payload, self.signer, self.epoch)
        _, decoded = decode_model(payload)
        sha = hashlib.sha256(payload).hexdigest()
        self.globals[m] = GlobalModel(decoded, version, frame, sha, round_index)
        return [PersistGlobal(m, version, round_index, frame, sha),
                Publish(self.topics.global_model(m), frame, 1, True)]

    def training_globals(self) -> dict[str, str]:
        """The globals a device trains from, every modality's latest, the never-aggregated initial
        ones included: a device that joins after round 0 starts a modality nobody has uploaded yet from
        the fleet's initial model, not from its own random one. (A device that trained it since round 0
        keeps its local model: it restarts from a global only when that global is new to it.)"""
        return {m: g.sha256 for m, g in sorted(self.globals.items())}

    def announcement(self) -> RoundAnnouncement:
        return RoundAnnouncement(self.fleet, self.round, self.state, self.deadline, self.policy.rounds_total,
                                 self.expected, self.training_globals(), self.policy.chunk_bytes)

    def round_message(self) -> bytes:
        """The signed ``round`` frame of the current announcement."""
        return sign_message(self.announcement(), self.fleet, self.epoch, self.round, self.signer)

    def _announce(self) -> Publish:
        return Publish(self.topics.round(), self.round_message(), 1, True)

    def _config_frame(self, device: str) -> bytes:
        return sign_message(self.devices[device], self.fleet, self.epoch, self.round, self.signer)

    def _configs(self) -> list[Action]:
        """Every device's signed config (retained), stamped with the round it is published in."""
        return [Publish(self.topics.config(d), self._config_frame(d), 1, True) for d in sorted(self.devices)]

    def _ack(self, device: str, reason: AckReason, modality: str | None = None, sha: str = "",
             missing: tuple[int, ...] = (), detail: str = "", round_index: int | None = None) -> Publish:
        ack = Ack(device, self.round if round_index is None else round_index, reason, modality, sha,
                  missing[:1024], detail)
        return Publish(self.topics.ack(device), encode_message(ack), 1, False)

    def _refuse(self, device: str, modality: str | None, reason: AckReason, nbytes: int, detail: str,
                sha: str = "", round_index: int | None = None) -> list[Action]:
        r = self.round if round_index is None else round_index
        log.info("refused %s/%s round %d: %s (%s)", device, modality, r, reason.value, detail)
        return [Refused(r, device, modality, reason, nbytes, detail),
                self._ack(device, reason, modality, sha, (), detail, r)]

    def update_bound(self, modality: str) -> float | None:
        """C, the largest update norm of ``modality`` counted in full this round (None: no global to
        measure an update against, which only a coordinator without initial models has before that
        modality's first aggregation)."""
        g = self.globals.get(modality)
        if g is None:
            return None
        return clip_bound(g.state, self.policy.max_update_ratio, self.policy.min_update_rms)

    def _clip(self, modality: str, st: State) -> tuple[State, float, float]:
        """The upload with its update clipped to C; the update's norm and C (both 0: not measured)."""
        bound = self.update_bound(modality)
        if bound is None or math.isinf(bound):
            return st, 0.0, 0.0
        ref = self.globals[modality].state
        norm = update_norm(st, ref)
        return (clip_update(st, ref, bound) if norm > bound else st), norm, bound

    def _count(self, device: str, modality: str, samples: int, st: State, sha: str, nbytes: int) -> None:
        if modality not in self.aggs:
            self.aggs[modality] = make_aggregator(self.policy.aggregation)
        self.aggs[modality].add(st, float(samples))
        self.accepted[(device, modality)] = _Accepted(sha, nbytes)
        self.used[device] = self.used.get(device, 0) + nbytes

    def _open(self, round_index: int, now: float) -> list[Action]:
        self.round = round_index
        self.state = RoundState.OPEN
        self.opened_at = now
        self.deadline = now + self.policy.round_seconds
        self.expected = tuple(sorted(self.devices))
        self.caps = {d: c.policy.cap_bytes for d, c in self.devices.items()}
        self.max_samples = {d: c.max_samples for d, c in self.devices.items()}
        self.gammas = self._gammas()
        self._reset_round()
        return [PersistRound(self.round, self.state, self.deadline, now, self.expected, dict(self.caps)),
                self._announce()]

    def missing(self) -> list[str]:
        """The expected devices that have not reported this round."""
        return [d for d in self.expected if d not in self.reported]

    def _deadline(self, now: float) -> list[Action]:
        """The deadline passed. Uploads acknowledged ``accepted`` are never dropped: below quorum with
        accepted uploads the round is extended once by a round length (re-announced with the new
        deadline); at the extended deadline it aggregates what it has, quorum or not. Below quorum with
        nothing accepted it closes without aggregating (the globals stay)."""
        n, want = len(self.reported), min(self.policy.quorum, len(self.expected))
        missing = ", ".join(self.missing()) or "-"
        extended = self.deadline - self.opened_at > self.policy.round_seconds * 1.5
        if n < want and self.accepted and not extended:
            self.deadline = now + self.policy.round_seconds
            log.warning("round %d: deadline passed with %d/%d reports, below the quorum of %d (missing: %s); "
                        "%d accepted uploads are kept: the round is extended to %.0f s from now", self.round, n,
                        len(self.expected), want, missing, len(self.accepted), self.policy.round_seconds)
            return [PersistRound(self.round, self.state, self.deadline, self.opened_at, self.expected,
                                 dict(self.caps)), self._announce()]
        log.info("round %d: deadline passed with %d/%d reports (missing: %s)", self.round, n, len(self.expected),
                 missing)
        return self._close(now, force=bool(self.accepted))

    def _close(self, now: float, force: bool = False) -> list[Action]:
        quorum = len(self.reported) >= min(self.policy.quorum, len(self.expected))
        out: list[Action] = []
        counts: dict[str, int] = {}
        if quorum or force:
            for m in self.spec.names:   # canonical order: deterministic frames and logs
                agg = self.aggs.get(m)
                if agg is None or not agg.count:
                    continue
                counts[m] = agg.count
                prev = self.globals.get(m)
                out += self._install_global(m, agg.result(), (prev.version if prev else 0) + 1,
                                            self.round + 1, int(agg.weight))
        self.state = RoundState.CLOSED
        out.append(PersistRound(self.round, self.state, self.deadline, self.opened_at, self.expected,
                                dict(self.caps), now, counts))
        out.append(RoundClosed(self.round, now - self.opened_at, counts, quorum, tuple(sorted(self.reported))))
        if self.round + 1 < self.policy.rounds_total:
            out += self._open(self.round + 1, now)
        else:
            self.state = RoundState.DONE
            out.append(PersistRound(self.round, self.state, self.deadline, self.opened_at, self.expected,
                                    dict(self.caps), now, counts))
            out.append(self._announce())
        return out

    # -- the event handler ------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Action]:
        """Apply one event; never raises on peer input (bad input becomes a refusal)."""
        if isinstance(event, ChunkArrived):
            return self._on_chunk(event)
        if isinstance(event, ReportArrived):
            return self._on_report(event)
        if isinstance(event, Tick):
            if self.state is RoundState.OPEN and event.now >= self.deadline:
                return self._deadline(event.now)
            return []
        if isinstance(event, FetchArrived):
            return self._on_fetch(event)
        if isinstance(event, Reconnected):
            # the broker may have lost its retained messages: the configs, globals and round again
            return [*self._configs(), *self._republish_globals(), self._announce()]
        if isinstance(event, StatusArrived):
            return self._on_status(event)
        if isinstance(event, Start):
            return self._on_start(event.now)
        if isinstance(event, FleetChanged):
            self._set_devices(event.devices)
            return self._configs()
        raise TypeError(f"unknown event {event!r}")

    def _on_status(self, ev: StatusArrived) -> list[Action]:
        """Only a fleet device's own, well-formed status is recorded; the rest is noted (rate-limited)."""
        if ev.device not in self.devices:
            self._strangers.note(ev.now, "status from %r ignored: not in the fleet file", ev.device)
            return []
        try:
            st = decode_message(ev.data, DeviceStatus)
        except PayloadError as e:
            log.info("bad status from %s: %s", ev.device, e)
            return []
        if st.device != ev.device:
            log.info("status naming device %r on %r's topic ignored", st.device, ev.device)
            return []
        online = st.state is DeviceState.ONLINE
        self.online[ev.device] = online
        return [PersistStatus(ev.device, online)]

    def _republish_globals(self) -> list[Action]:
        return [Publish(self.topics.global_model(m), g.frame, 1, True) for m, g in sorted(self.globals.items())]

    def _on_fetch(self, ev: FetchArrived) -> list[Action]:
        """Answer a device's ``fetch`` with what it lacks, on its own topics: the current ``round`` frame
        when the announcement it holds differs, its config when it asks, and the chunks it lists of the
        globals it names (QoS 0: what a cut loses, the device asks for again). A device asking for a
        global the coordinator no longer has gets the current round, which names the current ones."""
        dev = ev.device
        if dev not in self.devices:
            self._strangers.note(ev.now, "fetch from %r ignored: not in the fleet file", dev)
            return []
        try:
            f = decode_message(ev.data, Fetch)
        except PayloadError as e:
            return self._refuse(dev, None, AckReason.BAD_MESSAGE, len(ev.data), str(e))
        if f.device != dev:
            return self._refuse(dev, None, AckReason.BAD_MESSAGE, len(ev.data),
                                f"fetch names device {f.device!r} on device {dev!r}'s topic")
        out: list[Action] = []
        state_topic = self.topics.state(dev)
        held = (f.round, _STATE_ORDER[f.state])
        mine = (self.round, _STATE_ORDER[self.state])
        if f.epoch == self.epoch and held > mine:
            self._ahead.note(ev.now, "device %s holds round %d (%s) of this fleet's epoch, ahead of this "
                             "coordinator's round %d (%s): the ledger lost writes (a restored backup?). Stop the "
                             "coordinator and run `fedmfs-coordinator recover` (docs/reliability.md)", dev, f.round,
                             f.state.value, self.round, self.state.value)
            out.append(DeviceAhead(dev, f.round, self.round))
        send_round = f.epoch != self.epoch or held != mine
        if f.config or f.epoch != self.epoch:
            out.append(Publish(state_topic, self._config_frame(dev), 1, False))
        chunk_bytes = self.policy.chunk_bytes
        budget = self.policy.fetch_budget * sum(len(g.frame) for g in self.globals.values()) + 2 * chunk_bytes
        for want in f.globals:
            g = self.globals.get(want.modality)
            if g is None or g.sha256 != want.sha256:
                send_round = True      # an older global: the current round names the new one
                continue
            frames = g.chunks(chunk_bytes)
            topic = self.topics.device_global(dev, want.modality)
            for i in sorted(set(want.chunks)):
                if i >= len(frames):
                    continue
                if self.served.get(dev, 0) + len(frames[i]) > budget:
                    self._greedy.note(ev.now, "device %s fetched more than %.0f bytes of global models in round "
                                      "%d (fetch_budget %.0f x the globals); its further fetches wait for the next "
                                      "round", dev, budget, self.round, self.policy.fetch_budget)
                    break
                self.served[dev] = self.served.get(dev, 0) + len(frames[i])
                out.append(Publish(topic, frames[i], 0, False))
        if send_round:
            out.insert(0, Publish(state_topic, self.round_message(), 1, False))
        return out

    def _on_start(self, now: float) -> list[Action]:
        out: list[Action] = self._configs()
        out += self._republish_globals()
        if self.state is RoundState.CLOSED and not self.opened_at:
            out += self._open(0, now)       # a fresh fleet
        elif self.state is RoundState.CLOSED:
            out += self._close_resumed(now)
        else:
            out.append(self._announce())
        return out

    def _close_resumed(self, now: float) -> list[Action]:
        # a restart between closing round r and opening r+1: open the next one now
        if self.round + 1 < self.policy.rounds_total:
            return self._open(self.round + 1, now)
        self.state = RoundState.DONE
        return [self._announce()]

    def _on_chunk(self, ev: ChunkArrived) -> list[Action]:
        dev, mod = ev.device, ev.modality
        try:
            header, data = decode_chunk(ev.frame)
        except PayloadError as e:
            return self._refuse(dev, mod, AckReason.BAD_CHUNK, len(ev.frame), str(e), round_index=ev.round)
        last = header.index == header.total - 1
        key = (dev, mod, header.sha256)
        # Answers that repeat for every chunk of a doomed upload would flood the device: answer the
        # first and the last chunk (the device's probe) only.
        chatty = header.index == 0 or last
        if dev not in self.devices:
            return self._refuse(dev, mod, AckReason.UNKNOWN_DEVICE, len(data), "not in the fleet file",
                                header.sha256, ev.round) if chatty else []
        if ev.round != self.round or self.state is not RoundState.OPEN:
            return self._refuse(dev, mod, AckReason.ROUND_CLOSED, len(data),
                                f"round {ev.round} is not open (current round {self.round}, {self.state.value})",
                                header.sha256, ev.round) if chatty else []
        if dev not in self.expected:
            # added to the fleet file after this round opened: its cap and sample bound are not part of
            # the round's snapshot, so it takes part from the next round (never uncapped in this one)
            return self._refuse(dev, mod, AckReason.ROUND_CLOSED, len(data),
                                f"joined the fleet after round {self.round} opened; takes part from round "
                                f"{self.round + 1}", header.sha256, ev.round) if chatty else []
        if mod not in self.shapes:
            return self._refuse(dev, mod, AckReason.UNKNOWN_MODALITY, len(data),
                                f"the fleet's modalities are {', '.join(self.spec.names)}",
                                header.sha256) if chatty else []
        done = self.accepted.get((dev, mod))
        if done is not None:
            if done.sha256 == header.sha256:
                return [self._ack(dev, AckReason.ACCEPTED, mod, header.sha256, (), "already accepted")] if last else []
            return self._refuse(dev, mod, AckReason.DUPLICATE, len(data),
                                "another payload was accepted for this modality in this round",
                                header.sha256) if chatty else []
        if key in self.refused:
            reason = self.refused[key]
            return [self._ack(dev, reason, mod, header.sha256, (), "refused earlier")] if last else []
        cap = self.caps.get(dev)
        if cap is not None and self.used.get(dev, 0) + header.payload_bytes > cap:
            self.refused[key] = AckReason.OVER_CAP
            self.partial.pop((dev, mod), None)
            return self._refuse(dev, mod, AckReason.OVER_CAP, header.payload_bytes,
                                f"{header.payload_bytes} bytes + {self.used.get(dev, 0)} already accepted "
                                f"> cap {cap}", header.sha256)
        over = self._over_gamma(dev)
        if over:
            self.refused[key] = AckReason.OVER_GAMMA
            self.partial.pop((dev, mod), None)
            return self._refuse(dev, mod, AckReason.OVER_GAMMA, header.payload_bytes, over, header.sha256)
        asm = self.partial.get((dev, mod))
        if asm is None or asm.header.sha256 != header.sha256:
            asm = Reassembler(header)    # a new payload replaces an unfinished one
            self.partial[(dev, mod)] = asm
        try:
            res = asm.add(header, data)
        except PayloadError as e:
            self.partial.pop((dev, mod), None)
            return self._refuse(dev, mod, AckReason.BAD_CHUNK, len(data), str(e), header.sha256)
        if res.payload is None:
            if res.missing and last:
                return [self._ack(dev, AckReason.MISSING_CHUNKS, mod, header.sha256, res.missing,
                                  f"{len(res.missing)} chunks missing")]
            return []
        del self.partial[(dev, mod)]
        return self._complete(dev, mod, res.payload, header.sha256)

    def _complete(self, dev: str, mod: str, payload: bytes, sha: str) -> list[Action]:
        key = (dev, mod, sha)
        try:
            header, st = decode_model(payload)
        except PayloadError as e:
            self.refused[key] = AckReason.BAD_PAYLOAD
            return self._refuse(dev, mod, AckReason.BAD_PAYLOAD, len(payload), str(e), sha)
        if header.round != self.round or header.modality != mod:
            self.refused[key] = AckReason.BAD_PAYLOAD
            return self._refuse(dev, mod, AckReason.BAD_PAYLOAD, len(payload),
                                f"payload header says round {header.round} / {header.modality!r}, "
                                f"the topic round {self.round} / {mod!r}", sha)
        try:
            self._check_shapes(mod, st)
        except ValueError as e:
            self.refused[key] = AckReason.WRONG_SHAPE
            return self._refuse(dev, mod, AckReason.WRONG_SHAPE, len(payload), str(e), sha)
        cap = self.caps.get(dev)
        if cap is not None and self.used.get(dev, 0) + len(payload) > cap:
            self.refused[key] = AckReason.OVER_CAP
            return self._refuse(dev, mod, AckReason.OVER_CAP, len(payload), f"cap {cap} exceeded", sha)
        over = self._over_gamma(dev)
        if over:
            self.refused[key] = AckReason.OVER_GAMMA
            return self._refuse(dev, mod, AckReason.OVER_GAMMA, len(payload), over, sha)
        bound = self.max_samples.get(dev, self.devices[dev].max_samples)
        if header.samples > bound:
            self.refused[key] = AckReason.TOO_MANY_SAMPLES
            return self._refuse(dev, mod, AckReason.TOO_MANY_SAMPLES, len(payload),
                                f"{header.samples} samples > this device's max_samples {bound} (fleet file)", sha)
        st, norm, c = self._clip(mod, st)
        self._count(dev, mod, header.samples, st, sha, len(payload))
        detail = f"{len(payload)} bytes, {header.samples} samples"
        if norm > c:
            log.warning("%s/%s round %d: update norm %.4g clipped to %.4g", dev, mod, self.round, norm, c)
            detail += f"; update norm {norm:.4g} clipped to {c:.4g}"
        return [PersistUpload(self.round, dev, mod, payload, sha, header.samples),
                self._ack(dev, AckReason.ACCEPTED, mod, sha, (), detail)]

    def _over_gamma(self, dev: str) -> str:
        """Why a new modality of ``dev`` cannot be accepted this round ("" if it can): it already had its
        gamma of modalities accepted (its state lost, a device may redo a round and choose others)."""
        gamma = self.gammas.get(dev, len(self.spec.modalities))
        had = sorted(m for (d, m) in self.accepted if d == dev)
        if len(had) < gamma:
            return ""
        return f"gamma {gamma}: {', '.join(had)} already accepted for this device in round {self.round}"

    def _on_report(self, ev: ReportArrived) -> list[Action]:
        dev = ev.device
        try:
            msg = decode_message(ev.data)
            if not isinstance(msg, (Report, Evaluation)):
                raise PayloadError(f"a {msg.type} message on a report topic")
        except PayloadError as e:
            return self._refuse(dev, None, AckReason.BAD_MESSAGE, len(ev.data), str(e))
        if isinstance(msg, Evaluation):
            return self._on_evaluation(dev, msg, len(ev.data))
        rep = msg
        if rep.device != dev:
            return self._refuse(dev, None, AckReason.BAD_MESSAGE, len(ev.data),
                                f"report names device {rep.device!r} on device {dev!r}'s topic")
        if dev not in self.devices:
            return self._refuse(dev, None, AckReason.UNKNOWN_DEVICE, len(ev.data), "not in the fleet file",
                                round_index=rep.round)
        if rep.round == self.round and dev in self.reported or rep.round < self.round:
            # a re-sent report (or one for a closed round): answered, recorded once
            if rep.round < self.round or self.state is not RoundState.OPEN:
                return [self._ack(dev, AckReason.ROUND_CLOSED, None, "", (), "round closed", rep.round)]
            return [self._ack(dev, AckReason.REPORT_ACCEPTED, None, "", (), "already recorded", rep.round)]
        if rep.round != self.round or self.state is not RoundState.OPEN:
            return self._refuse(dev, None, AckReason.ROUND_CLOSED, len(ev.data),
                                f"round {rep.round} is not open", round_index=rep.round)
        unchosen = [m for m in rep.record.chosen if m not in self.shapes]
        if unchosen:
            return self._refuse(dev, None, AckReason.BAD_MESSAGE, len(ev.data),
                                f"report names modalities {unchosen} the fleet does not have", round_index=rep.round)
        self.reported[dev] = rep
        out: list[Action] = [PersistReport(self.round, dev, rep),
                             self._ack(dev, AckReason.REPORT_ACCEPTED, None, "", (), "recorded")]
        if set(self.expected) <= set(self.reported):
            out += self._close(ev.now)
        return out

    def _on_evaluation(self, dev: str, ev: Evaluation, nbytes: int) -> list[Action]:
        """A Stage #2 accuracy, welcome for any round that has closed (recorded once)."""
        if ev.device != dev:
            return self._refuse(dev, None, AckReason.BAD_MESSAGE, nbytes,
                                f"evaluation names device {ev.device!r} on device {dev!r}'s topic")
        if dev not in self.devices:
            return self._refuse(dev, None, AckReason.UNKNOWN_DEVICE, nbytes, "not in the fleet file",
                                round_index=ev.round)
        closed = ev.round < self.round or (ev.round == self.round and self.state is not RoundState.OPEN)
        if not closed or ev.round >= self.policy.rounds_total:
            return self._refuse(dev, None, AckReason.ROUND_CLOSED, nbytes,
                                f"round {ev.round} has not closed: nothing to evaluate yet", round_index=ev.round)
        ack = self._ack(dev, AckReason.EVALUATION_ACCEPTED, None, "", (), "recorded", ev.round)
        if (ev.round, dev) in self.evaluations:
            return [ack]
        self.evaluations[(ev.round, dev)] = ev.accuracy
        return [PersistEvaluation(ev), ack]

    def restore_evaluation(self, ev: Evaluation) -> None:
        self.evaluations[(ev.round, ev.device)] = ev.accuracy

    @property
    def all_evaluated(self) -> bool:
        """The run is over and every expected device evaluated its model after the last round."""
        last = self.policy.rounds_total - 1
        return self.state is RoundState.DONE and all((last, d) in self.evaluations for d in self.expected)


class _RateLimitedNote:
    """Logs a recurring note at most once per ``every`` seconds (event time), with how many it held back."""

    def __init__(self, every: float, level: int = logging.WARNING):
        self.every = every
        self.level = level
        self.last = -math.inf
        self.held = 0

    def note(self, now: float, msg: str, *args: object) -> None:
        if now - self.last < self.every:
            self.held += 1
            return
        extra = f" ({self.held} more like it held back)" if self.held else ""
        log.log(self.level, msg + extra, *args)
        self.last, self.held = now, 0


def event_for(fleet: str, topic: str, payload: bytes, now: float) -> Event | None:
    """The machine event a broker message means (None: not for the coordinator). Raises PayloadError
    on a topic outside the protocol."""
    t = parse_topic(topic)
    if t.fleet != fleet or t.device is None:
        return None
    if t.kind is TopicKind.UPLOAD and t.round is not None and t.modality is not None:
        return ChunkArrived(t.device, t.round, t.modality, payload, now)
    if t.kind is TopicKind.REPORT:
        return ReportArrived(t.device, payload, now)
    if t.kind is TopicKind.STATUS:
        return StatusArrived(t.device, payload, now)
    if t.kind is TopicKind.FETCH:
        return FetchArrived(t.device, payload, now)
    return None
