"""Control messages (UTF-8 JSON with ``v`` and ``type``), their codes, and their strict decoders."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar, overload

from fedmfs.core.errors import PayloadError
from fedmfs.core.fields import (
    HEX64,
    finite,
    get_field,
    modality_list,
    nonneg_int,
    validate_modality,
    validate_name,
)
from fedmfs.core.payload import MAX_SAMPLES
from fedmfs.core.records import RoundRecord
from fedmfs.core.safejson import loads as json_loads
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.wire.limits import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_SAMPLES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_CONTROL_BYTES,
    MAX_FETCH_CHUNKS,
    MAX_FETCH_GLOBALS,
    MAX_MISSING_LISTED,
    PROTOCOL_VERSION,
)
from fedmfs.core.wire.signing import (
    ControlHeader,
    Signer,
    Verifier,
    decode_control,
    encode_control,
    is_control_frame,
)

__all__ = [
    "Ack",
    "AckReason",
    "DeviceConfig",
    "DeviceState",
    "DeviceStatus",
    "Evaluation",
    "Fetch",
    "GlobalWant",
    "Message",
    "Report",
    "RoundAnnouncement",
    "RoundState",
    "decode_message",
    "encode_message",
    "sign_message",
    "verify_message",
]

class RoundState(str, Enum):
    OPEN = "open"          # uploads welcome until the deadline
    CLOSED = "closed"      # aggregated; the next round is about to open
    DONE = "done"          # the run is over: no more rounds


class AckReason(str, Enum):
    """The coordinator's answer to one upload (or to a malformed message of a device)."""

    ACCEPTED = "accepted"                  # counted (also the answer to a duplicate of an accepted upload)
    MISSING_CHUNKS = "missing_chunks"      # resend the listed chunk indices
    OVER_CAP = "over_cap"                  # the device's byte cap for this round would be exceeded
    OVER_GAMMA = "over_gamma"              # the device already had gamma modalities accepted this round
    ROUND_CLOSED = "round_closed"          # the round is not open (closed, or not yet open)
    UNKNOWN_MODALITY = "unknown_modality"  # the fleet has no such modality
    WRONG_SHAPE = "wrong_shape"            # tensor names or shapes differ from the modality's model
    BAD_PAYLOAD = "bad_payload"            # the reassembled payload does not decode or verify
    BAD_CHUNK = "bad_chunk"                # a chunk frame is malformed or inconsistent
    DUPLICATE = "duplicate"                # a different payload was already accepted for this modality
    TOO_MANY_SAMPLES = "too_many_samples"  # the payload claims more samples than the device's max_samples
    UNKNOWN_DEVICE = "unknown_device"      # the device is not in the fleet file
    TOO_LARGE = "too_large"                # the upload exceeds the protocol's size limit
    BAD_MESSAGE = "bad_message"            # a report or other control message was malformed
    REPORT_ACCEPTED = "report_accepted"    # the device's report for the round was recorded
    EVALUATION_ACCEPTED = "evaluation_accepted"  # the device's Stage #2 evaluation was recorded

    @property
    def final(self) -> bool:
        """True when the device should stop sending this upload (accepted or refused for good)."""
        return self is not AckReason.MISSING_CHUNKS


class DeviceState(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"



def _round_state(d: Mapping) -> RoundState:
    try:
        return RoundState(get_field(d, "state", str))
    except ValueError as e:
        raise PayloadError(f"unknown round state {d.get('state')!r}") from e


@dataclass(frozen=True, slots=True)
class RoundAnnouncement:
    """Retained on ``round``: the current round, its deadline (unix seconds) and what to train on.

    ``globals`` maps each modality to the sha256 of the signed global payload the round starts from
    (absent: no global yet, start from the device's own initialisation), so a device knows which
    retained global models it must hold before training.
    """

    fleet: str
    round: int
    state: RoundState
    deadline: float
    rounds_total: int
    expected: tuple[str, ...] = ()
    globals: Mapping[str, str] = field(default_factory=dict)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    type = "round"

    def to_dict(self) -> dict:
        return {"fleet": self.fleet, "round": self.round, "state": self.state.value, "deadline": self.deadline,
                "rounds_total": self.rounds_total, "expected": list(self.expected),
                "globals": dict(self.globals), "chunk_bytes": self.chunk_bytes}

    @classmethod
    def from_dict(cls, d: Mapping) -> RoundAnnouncement:
        state = _round_state(d)
        g = get_field(d, "globals", dict)
        for k, v in g.items():
            validate_modality(k)
            if not isinstance(v, str) or not HEX64.match(v):
                raise PayloadError(f"globals[{k!r}] must be a sha256 hex digest")
        chunk = nonneg_int(d, "chunk_bytes")
        if not 1 <= chunk <= MAX_CHUNK_BYTES:
            raise PayloadError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk}")
        return cls(fleet=validate_name("fleet", get_field(d, "fleet", str)), round=nonneg_int(d, "round"),
                   state=state, deadline=finite(d, "deadline"), rounds_total=nonneg_int(d, "rounds_total"),
                   expected=tuple(validate_name("device", x) for x in get_field(d, "expected", list)),
                   globals=dict(g), chunk_bytes=chunk)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Retained on ``device/<id>/config``: the selection policy the device uploads with, exactly as
    it must apply it (method, gamma, alphas, byte cap per round, codec), and ``max_samples``, the
    largest sample count (aggregation weight) the coordinator accepts from it: an upload claiming
    more is refused ``too_many_samples``. Optional on the wire (absent: the default)."""

    device: str
    policy: SelectionPolicy = field(default_factory=SelectionPolicy)
    max_samples: int = DEFAULT_MAX_SAMPLES
    type = "config"

    def __post_init__(self) -> None:
        validate_name("device", self.device)
        m = self.max_samples
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_SAMPLES:
            raise PayloadError(f"max_samples must be an integer in [1, {MAX_SAMPLES}], got {m!r}")

    def to_dict(self) -> dict:
        return {"device": self.device, **self.policy.to_dict(), "max_samples": self.max_samples}

    @classmethod
    def from_dict(cls, d: Mapping) -> DeviceConfig:
        for k in ("method", "codec"):
            get_field(d, k, str)
        get_field(d, "cap_rule", str, optional=True)
        get_field(d, "priority", str, optional=True)
        get_field(d, "gamma", int)
        for k in ("alpha_s", "alpha_c", "alpha_r"):
            finite(d, k)
        for k in ("evidence", "upload_seconds"):
            if d.get(k) is not None:
                finite(d, k)
        nonneg_int(d, "cap_bytes", optional=True)
        try:
            policy = SelectionPolicy.from_dict(d)
        except ValueError as e:
            raise PayloadError(f"config: {e}") from e
        return cls(device=get_field(d, "device", str), policy=policy,
                   max_samples=get_field(d, "max_samples", int, optional=True, default=DEFAULT_MAX_SAMPLES))


@dataclass(frozen=True, slots=True)
class Report:
    """A device's account of one round (its :class:`~fedmfs.core.records.RoundRecord`), published
    after all its uploads were answered, with what was accepted and the bytes that crossed the wire."""

    record: RoundRecord
    accepted: tuple[str, ...] = ()
    bytes_sent: int = 0        # payload bytes of the accepted uploads
    wire_bytes: int = 0        # MQTT PUBLISH bytes of this round's chunk frames (this device)
    type = "report"

    @property
    def device(self) -> str:
        return self.record.device

    @property
    def round(self) -> int:
        return self.record.round

    def to_dict(self) -> dict:
        return {"record": self.record.to_dict(), "accepted": list(self.accepted), "bytes_sent": self.bytes_sent,
                "wire_bytes": self.wire_bytes}

    @classmethod
    def from_dict(cls, d: Mapping) -> Report:
        rec = RoundRecord.from_dict(get_field(d, "record", dict))
        accepted = modality_list(d, "accepted")
        if not set(accepted) <= set(rec.chosen):
            raise PayloadError(f"report accepts {sorted(set(accepted) - set(rec.chosen))}, which were not chosen")
        return cls(record=rec, accepted=accepted, bytes_sent=nonneg_int(d, "bytes_sent"),
                   wire_bytes=nonneg_int(d, "wire_bytes"))


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A device's test accuracy of its personalised model after Stage #2 on round ``round``'s globals,
    published on its ``report`` topic once that round closed (also after the last round)."""

    device: str
    round: int
    accuracy: float
    windows: int = 0           # test windows it was measured on
    type = "evaluation"

    def to_dict(self) -> dict:
        return {"device": self.device, "round": self.round, "accuracy": self.accuracy, "windows": self.windows}

    @classmethod
    def from_dict(cls, d: Mapping) -> Evaluation:
        acc = finite(d, "accuracy")
        if not 0.0 <= acc <= 1.0:
            raise PayloadError(f"accuracy must be in [0, 1], got {acc}")
        return cls(device=validate_name("device", get_field(d, "device", str)), round=nonneg_int(d, "round"),
                   accuracy=acc, windows=nonneg_int(d, "windows"))


@dataclass(frozen=True, slots=True)
class Ack:
    """The coordinator's answer on ``device/<id>/ack``. ``modality`` is None for a report's ack."""

    device: str
    round: int
    reason: AckReason
    modality: str | None = None
    sha256: str = ""
    missing: tuple[int, ...] = ()
    detail: str = ""
    type = "ack"

    def to_dict(self) -> dict:
        return {"device": self.device, "round": self.round, "reason": self.reason.value,
                "modality": self.modality, "sha256": self.sha256, "missing": list(self.missing),
                "detail": self.detail[:500]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Ack:
        try:
            reason = AckReason(get_field(d, "reason", str))
        except ValueError as e:
            raise PayloadError(f"unknown ack reason {d.get('reason')!r}") from e
        mod = get_field(d, "modality", str, optional=True)
        missing = get_field(d, "missing", list)
        if len(missing) > MAX_MISSING_LISTED or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_CHUNKS for i in missing):
            raise PayloadError("field 'missing' must list chunk indices")
        sha = get_field(d, "sha256", str)
        if sha and not HEX64.match(sha):
            raise PayloadError("field 'sha256' must be a sha256 hex digest or empty")
        return cls(device=validate_name("device", get_field(d, "device", str)), round=nonneg_int(d, "round"),
                   reason=reason, modality=None if mod is None else validate_modality(mod), sha256=sha,
                   missing=tuple(missing), detail=get_field(d, "detail", str)[:500])


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """Retained on ``device/<id>/status``; ``offline`` is also the device's MQTT last will."""

    device: str
    state: DeviceState
    type = "status"

    def to_dict(self) -> dict:
        return {"device": self.device, "state": self.state.value}

    @classmethod
    def from_dict(cls, d: Mapping) -> DeviceStatus:
        try:
            state = DeviceState(get_field(d, "state", str))
        except ValueError as e:
            raise PayloadError(f"unknown device state {d.get('state')!r}") from e
        return cls(device=validate_name("device", get_field(d, "device", str)), state=state)


def _int_from(d: Mapping, key: str, low: int, high: int) -> int:
    v = get_field(d, key, int)
    if not low <= v <= high:
        raise PayloadError(f"field {key!r} must be in [{low}, {high}], got {v}")
    return v


@dataclass(frozen=True, slots=True)
class GlobalWant:
    """One global model a device lacks: the ``sha256`` of its payload (as the round's ``globals`` lists
    it) and the chunk indices of its signed frame the device still needs (chunked with the round's
    ``chunk_bytes``; indices past the frame's end are ignored, so a device that does not know the frame's
    length yet asks for 0..k-1)."""

    modality: str
    sha256: str
    chunks: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"modality": self.modality, "sha256": self.sha256, "chunks": list(self.chunks)}

    @classmethod
    def from_dict(cls, d: Any) -> GlobalWant:
        if not isinstance(d, dict):
            raise PayloadError("a fetch's globals entry must be an object")
        sha = get_field(d, "sha256", str)
        if not HEX64.match(sha):
            raise PayloadError("a fetch's globals entry needs a sha256 hex digest")
        chunks = get_field(d, "chunks", list)
        if len(chunks) > MAX_FETCH_CHUNKS or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_CHUNKS for i in chunks):
            raise PayloadError(f"field 'chunks' must list at most {MAX_FETCH_CHUNKS} chunk indices")
        return cls(validate_modality(get_field(d, "modality", str)), sha, tuple(chunks))


@dataclass(frozen=True, slots=True)
class Fetch:
    """A device's request on ``device/<id>/fetch`` for the fleet state it lacks (docs/protocol.md
    "Fetching fleet state"). ``epoch``, ``round`` and ``state`` say which signed announcement it holds
    (-1: none), so the coordinator answers with the current ``round`` frame only when it differs;
    ``config`` asks for the device's config frame; ``globals`` for chunks of global models."""

    device: str
    epoch: int = -1
    round: int = -1
    state: RoundState = RoundState.OPEN
    config: bool = False
    globals: tuple[GlobalWant, ...] = ()
    type = "fetch"

    def to_dict(self) -> dict:
        return {"device": self.device, "epoch": self.epoch, "round": self.round, "state": self.state.value,
                "config": self.config, "globals": [g.to_dict() for g in self.globals]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Fetch:
        state = _round_state(d)
        wants = get_field(d, "globals", list)
        if len(wants) > MAX_FETCH_GLOBALS:
            raise PayloadError(f"a fetch asks for at most {MAX_FETCH_GLOBALS} globals")
        return cls(device=validate_name("device", get_field(d, "device", str)),
                   epoch=_int_from(d, "epoch", -1, 2**53), round=_int_from(d, "round", -1, 2**31 - 1), state=state,
                   config=get_field(d, "config", bool), globals=tuple(GlobalWant.from_dict(g) for g in wants))


_MESSAGES = {c.type: c for c in (RoundAnnouncement, DeviceConfig, Report, Evaluation, Ack, DeviceStatus, Fetch)}
Message = RoundAnnouncement | DeviceConfig | Report | Evaluation | Ack | DeviceStatus | Fetch
M = TypeVar("M", RoundAnnouncement, DeviceConfig, Report, Evaluation, Ack, DeviceStatus, Fetch)


def encode_message(msg: Message) -> bytes:
    """A control message as compact UTF-8 JSON with the protocol version and the message type."""
    body = {"v": PROTOCOL_VERSION, "type": msg.type, **msg.to_dict()}
    return json.dumps(body, separators=(",", ":"), allow_nan=False, sort_keys=True).encode()


@overload
def decode_message(data: bytes, expect: type[M]) -> M: ...


@overload
def decode_message(data: bytes, expect: None = None) -> Message: ...


def decode_message(data: bytes, expect: type | None = None) -> Message:
    """Decode and validate a control message; ``expect`` restricts the accepted type.

    A signed control frame (:func:`sign_message`) is unwrapped *without* checking its signature: this is
    for readers that only observe (tests, benchmarks, tools). A device takes a ``round`` or ``config``
    only through :func:`verify_message`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError("message is not bytes")
    if is_control_frame(data):
        data = decode_control(data, None)[1]
    if len(data) > MAX_CONTROL_BYTES:
        raise PayloadError(f"message of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}")
    d = json_loads(data, "message")      # bounded: nesting, integer digits; every failure a PayloadError
    if not isinstance(d, dict):
        raise PayloadError("message is not a JSON object")
    v = d.get("v")
    if v != PROTOCOL_VERSION:
        raise PayloadError(f"protocol version {v!r} not supported (this fedmfs speaks {PROTOCOL_VERSION})")
    kind = d.get("type")
    cls: Any = _MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise PayloadError(f"unknown message type {kind!r}")
    if expect is not None and cls is not expect:
        raise PayloadError(f"expected a {getattr(expect, 'type', expect.__name__)} message, got {cls.type}")
    try:
        return cls.from_dict(d)
    except PayloadError:
        raise
    except (TypeError, ValueError, AttributeError, RecursionError, OverflowError) as e:
        raise PayloadError(f"malformed {cls.type} message: {e}") from e


def sign_message(msg: RoundAnnouncement | DeviceConfig, fleet: str, epoch: int, round_index: int,
                 signer: Signer) -> bytes:
    """The coordinator's signed frame of a ``round`` or ``config`` message (docs/protocol.md "Signed
    fleet state"): ``epoch`` is the fleet epoch, ``round_index`` the announced round (for a config,
    the round the coordinator was in when it published it)."""
    if isinstance(msg, RoundAnnouncement) and (msg.round != round_index or msg.fleet != fleet):
        raise ValueError("a round announcement is signed with its own fleet and round")
    return encode_control(fleet, msg.type, epoch, round_index, encode_message(msg), signer)


@overload
def verify_message(data: bytes, verifier: Verifier, fleet: str,
                   expect: type[RoundAnnouncement]) -> tuple[ControlHeader, RoundAnnouncement]: ...


@overload
def verify_message(data: bytes, verifier: Verifier, fleet: str,
                   expect: type[DeviceConfig]) -> tuple[ControlHeader, DeviceConfig]: ...


def verify_message(data: bytes, verifier: Verifier, fleet: str, expect: type) -> tuple[ControlHeader, Any]:
    """A ``round`` or ``config`` message the coordinator signed for ``fleet``, and its signed header.

    Refused (PayloadError, with the reason): a plain, unsigned message; a frame of another protocol
    version; a bad signature (tampered, or another key); a frame of another fleet; a header whose kind,
    fleet or round disagrees with the message inside. Freshness (epoch, round) is the device's to judge
    against what it holds (:class:`fedmfs.edge.machine.EdgeMachine`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError("message is not bytes")
    kind = getattr(expect, "type", "?")
    if not is_control_frame(data):
        raise PayloadError(f"{kind} message not signed (a device takes only the coordinator's signed "
                           f"{kind} frames)")
    head, body = decode_control(data, verifier)
    if head.fleet != fleet:
        raise PayloadError(f"signed {head.kind} message of fleet {head.fleet!r}, this device is in {fleet!r}")
    if head.kind != kind:
        raise PayloadError(f"a signed {head.kind} frame where a {kind} message belongs")
    msg = decode_message(body, expect)
    if isinstance(msg, RoundAnnouncement) and (msg.round != head.round or msg.fleet != head.fleet):
        raise PayloadError(f"round message says fleet {msg.fleet!r} round {msg.round}, its signed header "
                           f"{head.fleet!r} round {head.round}")
    return head, msg
