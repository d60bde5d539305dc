"""The MQTT wire protocol (docs/protocol.md): topics, messages, chunk frames, signed global models.

numpy-free and torch-free: this module is imported by the coordinator, the edge daemon and the
simulator. Every decoder validates strictly and raises :class:`fedmfs.errors.PayloadError` with a
reason on anything malformed; none of them can crash on hostile bytes (they are fuzzed).

Control messages are UTF-8 JSON objects with a ``v`` (protocol version) and a ``type`` field. Model
bytes never travel in JSON: an upload is split into binary chunk frames (a 56-byte header + a slice of
the payload), a global model is one binary frame (a JSON header with the Ed25519 signature + the
payload). Device, round and modality of a chunk are in its topic, so the frame header stays small.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from fedmfs.errors import PayloadError

__all__ = [
    "PROTOCOL_VERSION", "TOPIC_ROOT", "SELECTION_METHODS", "MAX_CONTROL_BYTES", "MAX_CHUNK_BYTES", "DEFAULT_CHUNK_BYTES",
    "MAX_UPLOAD_BYTES", "MAX_CHUNKS", "CHUNK_HEADER_BYTES",
    "TopicKind", "ParsedTopic", "Topics", "parse_topic",
    "RoundState", "AckReason", "DeviceState",
    "RoundAnnouncement", "DeviceConfig", "Report", "Ack", "DeviceStatus",
    "encode_message", "decode_message",
    "ChunkHeader", "encode_chunk", "decode_chunk", "split_payload", "Reassembler", "ChunkResult",
    "GlobalHeader", "encode_global", "decode_global", "global_signing_bytes",
    "Signer", "Verifier", "generate_keypair", "validate_name",
]

PROTOCOL_VERSION = 1
TOPIC_ROOT = "fedmfs/v1"
MAX_CONTROL_BYTES = 256 * 1024          # a JSON control message (report, config, ack, round)
DEFAULT_CHUNK_BYTES = 64 * 1024         # payload bytes per chunk frame
MAX_CHUNK_BYTES = 4 * 1024 * 1024       # largest chunk a receiver accepts
MAX_UPLOAD_BYTES = 64 * 1024 * 1024     # largest model payload (= fedmfs.payload.MAX_PAYLOAD_BYTES)
MAX_CHUNKS = 65536
SELECTION_METHODS = ("fedmfs", "all", "random", "size_only", "shapley_only", "local")
MAX_MISSING_LISTED = 1024               # an ack lists at most this many missing chunk indices

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MOD = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def validate_name(kind: str, value: Any) -> str:
    """Fleet and device ids: 1-64 of [A-Za-z0-9_.-], not starting with a punctuation mark, so they
    are safe as MQTT topic levels (no '/', '+', '#') and as file names."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise PayloadError(f"{kind} {value!r} must match {_NAME.pattern}")
    return value


def _modality(value: Any) -> str:
    if not isinstance(value, str) or not _MOD.match(value):
        raise PayloadError(f"modality {value!r} must match {_MOD.pattern}")
    return value


# --------------------------------------------------------------------------------------------- topics

class TopicKind(str, Enum):
    ROUND = "round"
    GLOBAL = "global"
    CONFIG = "config"
    UPLOAD = "upload"
    REPORT = "report"
    ACK = "ack"
    STATUS = "status"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: TopicKind
    fleet: str
    device: str | None = None
    round: int | None = None
    modality: str | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one fleet (one place builds them, :func:`parse_topic` reads them)."""

    fleet: str

    def __post_init__(self) -> None:
        validate_name("fleet", self.fleet)

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    def round(self) -> str:
        return f"{self.base}/round"

    def global_model(self, modality: str) -> str:
        return f"{self.base}/global/{_modality(modality)}"

    def global_all(self) -> str:
        return f"{self.base}/global/+"

    def _dev(self, device: str) -> str:
        return f"{self.base}/device/{validate_name('device', device)}"

    def config(self, device: str) -> str:
        return f"{self._dev(device)}/config"

    def upload(self, device: str, round_index: int, modality: str) -> str:
        return f"{self._dev(device)}/upload/{int(round_index)}/{_modality(modality)}"

    def report(self, device: str) -> str:
        return f"{self._dev(device)}/report"

    def ack(self, device: str) -> str:
        return f"{self._dev(device)}/ack"

    def status(self, device: str) -> str:
        return f"{self._dev(device)}/status"

    # wildcard subscriptions of the coordinator
    def all_uploads(self) -> str:
        return f"{self.base}/device/+/upload/#"

    def all_reports(self) -> str:
        return f"{self.base}/device/+/report"

    def all_status(self) -> str:
        return f"{self.base}/device/+/status"


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a topic of this protocol; anything else raises PayloadError."""
    if not isinstance(topic, str) or len(topic) > 512:
        raise PayloadError("topic is not a string of at most 512 characters")
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] + "/" + parts[1] != TOPIC_ROOT:
        raise PayloadError(f"topic {topic!r} is not under {TOPIC_ROOT}/<fleet>/")
    fleet = validate_name("fleet", parts[2])
    rest = parts[3:]
    if rest == ["round"]:
        return ParsedTopic(TopicKind.ROUND, fleet)
    if len(rest) == 2 and rest[0] == "global":
        return ParsedTopic(TopicKind.GLOBAL, fleet, modality=_modality(rest[1]))
    if len(rest) >= 3 and rest[0] == "device":
        dev = validate_name("device", rest[1])
        tail = rest[2:]
        if len(tail) == 1 and tail[0] in ("config", "report", "ack", "status"):
            return ParsedTopic(TopicKind(tail[0]), fleet, device=dev)
        if len(tail) == 3 and tail[0] == "upload":
            if not tail[1].isdigit() or len(tail[1]) > 9:
                raise PayloadError(f"topic {topic!r}: round {tail[1]!r} is not a non-negative integer")
            return ParsedTopic(TopicKind.UPLOAD, fleet, device=dev, round=int(tail[1]),
                               modality=_modality(tail[2]))
    raise PayloadError(f"topic {topic!r} is not a fedmfs topic")


# ---------------------------------------------------------------------------------------------- codes

class RoundState(str, Enum):
    OPEN = "open"          # uploads welcome until the deadline
    CLOSED = "closed"      # aggregated; the next round is about to open
    DONE = "done"          # the run is over: no more rounds


class AckReason(str, Enum):
    """The coordinator's answer to one upload (or to a malformed message of a device)."""

    ACCEPTED = "accepted"                  # counted (also the answer to a duplicate of an accepted upload)
    MISSING_CHUNKS = "missing_chunks"      # resend the listed chunk indices
    OVER_CAP = "over_cap"                  # the device's byte cap for this round would be exceeded
    ROUND_CLOSED = "round_closed"          # the round is not open (closed, or not yet open)
    UNKNOWN_MODALITY = "unknown_modality"  # the fleet has no such modality
    WRONG_SHAPE = "wrong_shape"            # tensor names or shapes differ from the modality's model
    BAD_PAYLOAD = "bad_payload"            # the reassembled payload does not decode or verify
    BAD_CHUNK = "bad_chunk"                # a chunk frame is malformed or inconsistent
    DUPLICATE = "duplicate"                # a different payload was already accepted for this modality
    UNKNOWN_DEVICE = "unknown_device"      # the device is not in the fleet file
    TOO_LARGE = "too_large"                # the upload exceeds the protocol's size limit
    BAD_MESSAGE = "bad_message"            # a report or other control message was malformed
    REPORT_ACCEPTED = "report_accepted"    # the device's report for the round was recorded

    @property
    def final(self) -> bool:
        """True when the device should stop sending this upload (accepted or refused for good)."""
        return self is not AckReason.MISSING_CHUNKS


class DeviceState(str, Enum):
    ONLINE = "online"
    OFFLINE = "offline"


# ------------------------------------------------------------------------------------------- messages

def _get(d: Mapping, key: str, kind: type | tuple, *, optional: bool = False, default: Any = None) -> Any:
    if key not in d:
        if optional:
            return default
        raise PayloadError(f"message lacks field {key!r}")
    v = d[key]
    if optional and v is None:
        return default
    # bool is an int in Python: refuse it where a number is wanted
    if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise PayloadError(f"field {key!r} must be {kind}, got a bool")
    if not isinstance(v, kind):
        raise PayloadError(f"field {key!r} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


def _nonneg_int(d: Mapping, key: str, *, optional: bool = False, default: Any = None) -> Any:
    v = _get(d, key, int, optional=optional, default=default)
    if v is not None and not 0 <= v < 2**53:
        raise PayloadError(f"field {key!r} must be a non-negative integer, got {v}")
    return v


def _finite(d: Mapping, key: str, *, optional: bool = False, default: Any = None) -> Any:
    v = _get(d, key, (int, float), optional=optional, default=default)
    if v is not None:
        v = float(v)
        if not math.isfinite(v):
            raise PayloadError(f"field {key!r} must be finite")
    return v


def _float_map(d: Mapping, key: str) -> dict[str, float]:
    m = _get(d, key, dict)
    out = {}
    for k, v in m.items():
        _modality(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise PayloadError(f"field {key!r}: value for {k!r} must be a finite number")
        out[k] = float(v)
    return out


def _int_map(d: Mapping, key: str) -> dict[str, int]:
    m = _get(d, key, dict)
    out = {}
    for k, v in m.items():
        _modality(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PayloadError(f"field {key!r}: value for {k!r} must be a non-negative integer")
        out[k] = int(v)
    return out


def _mod_list(d: Mapping, key: str) -> tuple[str, ...]:
    lst = _get(d, key, list)
    return tuple(_modality(x) for x in lst)


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
    def from_dict(cls, d: Mapping) -> "RoundAnnouncement":
        try:
            state = RoundState(_get(d, "state", str))
        except ValueError as e:
            raise PayloadError(f"unknown round state {d.get('state')!r}") from e
        g = _get(d, "globals", dict)
        for k, v in g.items():
            _modality(k)
            if not isinstance(v, str) or not _HEX64.match(v):
                raise PayloadError(f"globals[{k!r}] must be a sha256 hex digest")
        chunk = _nonneg_int(d, "chunk_bytes")
        if not 1 <= chunk <= MAX_CHUNK_BYTES:
            raise PayloadError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk}")
        return cls(fleet=validate_name("fleet", _get(d, "fleet", str)), round=_nonneg_int(d, "round"),
                   state=state, deadline=_finite(d, "deadline"), rounds_total=_nonneg_int(d, "rounds_total"),
                   expected=tuple(validate_name("device", x) for x in _get(d, "expected", list)),
                   globals=dict(g), chunk_bytes=chunk)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Retained on ``device/<id>/config``: the device's byte cap per round, gamma and alphas.

    ``cap_bytes`` None means no cap (the top-gamma rule alone decides)."""

    device: str
    gamma: int
    alpha_s: float = 0.5
    alpha_c: float = 0.5
    alpha_r: float = 0.0
    cap_bytes: int | None = None
    codec: str = "fp32"
    method: str = "fedmfs"
    type = "config"

    def __post_init__(self) -> None:
        validate_name("device", self.device)
        if self.gamma < 0:
            raise PayloadError(f"gamma must be >= 0, got {self.gamma}")
        if min(self.alpha_s, self.alpha_c, self.alpha_r) < 0 or self.alpha_s + self.alpha_c + self.alpha_r <= 0:
            raise PayloadError("alphas must be >= 0 with a positive sum")
        if self.cap_bytes is not None and self.cap_bytes < 0:
            raise PayloadError("cap_bytes must be >= 0")
        if self.codec not in ("fp32", "fp16", "int8"):
            raise PayloadError(f"codec must be fp32, fp16 or int8, got {self.codec!r}")
        if self.method not in SELECTION_METHODS:
            raise PayloadError(f"method must be one of {', '.join(SELECTION_METHODS)}, got {self.method!r}")

    def to_dict(self) -> dict:
        return {"device": self.device, "gamma": self.gamma, "alpha_s": self.alpha_s, "alpha_c": self.alpha_c,
                "alpha_r": self.alpha_r, "cap_bytes": self.cap_bytes, "codec": self.codec,
                "method": self.method}

    @classmethod
    def from_dict(cls, d: Mapping) -> "DeviceConfig":
        return cls(device=_get(d, "device", str), gamma=_nonneg_int(d, "gamma"),
                   alpha_s=_finite(d, "alpha_s"), alpha_c=_finite(d, "alpha_c"), alpha_r=_finite(d, "alpha_r"),
                   cap_bytes=_nonneg_int(d, "cap_bytes", optional=True), codec=_get(d, "codec", str),
                   method=_get(d, "method", str))


@dataclass(frozen=True, slots=True)
class Report:
    """A device's account of one round, published after all its uploads were answered."""

    device: str
    round: int
    samples: int
    shapley: Mapping[str, float]
    priorities: Mapping[str, float]
    sizes: Mapping[str, int]
    chosen: tuple[str, ...]
    accepted: tuple[str, ...] = ()
    bytes_sent: int = 0
    accuracy: float | None = None
    type = "report"

    def to_dict(self) -> dict:
        return {"device": self.device, "round": self.round, "samples": self.samples,
                "shapley": dict(self.shapley), "priorities": dict(self.priorities), "sizes": dict(self.sizes),
                "chosen": list(self.chosen), "accepted": list(self.accepted), "bytes_sent": self.bytes_sent,
                "accuracy": self.accuracy}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Report":
        acc = _finite(d, "accuracy", optional=True)
        return cls(device=validate_name("device", _get(d, "device", str)), round=_nonneg_int(d, "round"),
                   samples=_nonneg_int(d, "samples"), shapley=_float_map(d, "shapley"),
                   priorities=_float_map(d, "priorities"), sizes=_int_map(d, "sizes"),
                   chosen=_mod_list(d, "chosen"), accepted=_mod_list(d, "accepted"),
                   bytes_sent=_nonneg_int(d, "bytes_sent"), accuracy=acc)


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
    def from_dict(cls, d: Mapping) -> "Ack":
        try:
            reason = AckReason(_get(d, "reason", str))
        except ValueError as e:
            raise PayloadError(f"unknown ack reason {d.get('reason')!r}") from e
        mod = _get(d, "modality", str, optional=True)
        missing = _get(d, "missing", list)
        if len(missing) > MAX_MISSING_LISTED or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < MAX_CHUNKS for i in missing):
            raise PayloadError("field 'missing' must list chunk indices")
        sha = _get(d, "sha256", str)
        if sha and not _HEX64.match(sha):
            raise PayloadError("field 'sha256' must be a sha256 hex digest or empty")
        return cls(device=validate_name("device", _get(d, "device", str)), round=_nonneg_int(d, "round"),
                   reason=reason, modality=None if mod is None else _modality(mod), sha256=sha,
                   missing=tuple(missing), detail=_get(d, "detail", str)[:500])


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """Retained on ``device/<id>/status``; ``offline`` is also the device's MQTT last will."""

    device: str
    state: DeviceState
    type = "status"

    def to_dict(self) -> dict:
        return {"device": self.device, "state": self.state.value}

    @classmethod
    def from_dict(cls, d: Mapping) -> "DeviceStatus":
        try:
            state = DeviceState(_get(d, "state", str))
        except ValueError as e:
            raise PayloadError(f"unknown device state {d.get('state')!r}") from e
        return cls(device=validate_name("device", _get(d, "device", str)), state=state)


_MESSAGES = {c.type: c for c in (RoundAnnouncement, DeviceConfig, Report, Ack, DeviceStatus)}
Message = RoundAnnouncement | DeviceConfig | Report | Ack | DeviceStatus


def encode_message(msg: Message) -> bytes:
    """A control message as compact UTF-8 JSON with the protocol version and the message type."""
    body = {"v": PROTOCOL_VERSION, "type": msg.type, **msg.to_dict()}
    return json.dumps(body, separators=(",", ":"), allow_nan=False, sort_keys=True).encode()


def decode_message(data: bytes, expect: type | None = None) -> Message:
    """Decode and validate a control message; ``expect`` restricts the accepted type."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError("message is not bytes")
    if len(data) > MAX_CONTROL_BYTES:
        raise PayloadError(f"message of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        d = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PayloadError(f"message is not UTF-8 JSON: {e}") from e
    if not isinstance(d, dict):
        raise PayloadError("message is not a JSON object")
    v = d.get("v")
    if v != PROTOCOL_VERSION:
        raise PayloadError(f"protocol version {v!r} not supported (this fedmfs speaks {PROTOCOL_VERSION})")
    cls = _MESSAGES.get(d.get("type")) if isinstance(d.get("type"), str) else None
    if cls is None:
        raise PayloadError(f"unknown message type {d.get('type')!r}")
    if expect is not None and cls is not expect:
        raise PayloadError(f"expected a {expect.type} message, got {cls.type}")
    try:
        return cls.from_dict(d)
    except PayloadError:
        raise
    except (TypeError, ValueError, AttributeError) as e:
        raise PayloadError(f"malformed {cls.type} message: {e}") from e


# ------------------------------------------------------------------------------------- chunk frames

_CHUNK = struct.Struct(">4sIIIQ32s")    # magic, chunk index, total chunks, chunk bytes, payload bytes, sha256
CHUNK_HEADER_BYTES = _CHUNK.size        # 56
_CHUNK_MAGIC = b"FMC" + bytes([PROTOCOL_VERSION])


@dataclass(frozen=True, slots=True)
class ChunkHeader:
    """One chunk of an upload: ``index`` of ``total``; all but the last carry exactly ``chunk_bytes``."""

    index: int
    total: int
    chunk_bytes: int
    payload_bytes: int
    sha256: str

    def check(self) -> None:
        if not 1 <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise PayloadError(f"chunk_bytes {self.chunk_bytes} outside [1, {MAX_CHUNK_BYTES}]")
        if not 1 <= self.payload_bytes <= MAX_UPLOAD_BYTES:
            raise PayloadError(f"payload of {self.payload_bytes} bytes outside [1, {MAX_UPLOAD_BYTES}]")
        if self.total != -(-self.payload_bytes // self.chunk_bytes) or self.total > MAX_CHUNKS:
            raise PayloadError(f"total {self.total} does not match {self.payload_bytes} bytes in "
                               f"chunks of {self.chunk_bytes}")
        if not 0 <= self.index < self.total:
            raise PayloadError(f"chunk index {self.index} outside [0, {self.total})")

    def expected_len(self) -> int:
        if self.index < self.total - 1:
            return self.chunk_bytes
        return self.payload_bytes - self.chunk_bytes * (self.total - 1)


def encode_chunk(header: ChunkHeader, data: bytes) -> bytes:
    header.check()
    if len(data) != header.expected_len():
        raise PayloadError(f"chunk {header.index} has {len(data)} bytes, expected {header.expected_len()}")
    return _CHUNK.pack(_CHUNK_MAGIC, header.index, header.total, header.chunk_bytes, header.payload_bytes,
                       bytes.fromhex(header.sha256)) + data


def decode_chunk(frame: bytes) -> tuple[ChunkHeader, bytes]:
    """Parse and check a chunk frame: header consistency and the slice's length."""
    frame = bytes(frame)
    if len(frame) < CHUNK_HEADER_BYTES:
        raise PayloadError(f"chunk frame of {len(frame)} bytes is shorter than its {CHUNK_HEADER_BYTES}-byte header")
    magic, index, total, chunk_bytes, payload_bytes, sha = _CHUNK.unpack_from(frame)
    if magic != _CHUNK_MAGIC:
        raise PayloadError(f"chunk frame magic {magic!r} is not {_CHUNK_MAGIC!r} (wrong protocol version?)")
    h = ChunkHeader(index, total, chunk_bytes, payload_bytes, sha.hex())
    h.check()
    data = frame[CHUNK_HEADER_BYTES:]
    if len(data) != h.expected_len():
        raise PayloadError(f"chunk {index} carries {len(data)} bytes, expected {h.expected_len()}")
    return h, data


def split_payload(payload: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """The chunk frames of a payload, in index order."""
    if not payload:
        raise PayloadError("cannot split an empty payload")
    sha = hashlib.sha256(payload).hexdigest()
    total = -(-len(payload) // chunk_bytes)
    return [encode_chunk(ChunkHeader(i, total, chunk_bytes, len(payload), sha),
                         payload[i * chunk_bytes:(i + 1) * chunk_bytes]) for i in range(total)]


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """What adding a chunk did: ``payload`` when complete (sha256 verified), else ``missing`` indices
    (reported once the last chunk was seen, so a device resends only what is lost)."""

    payload: bytes | None
    missing: tuple[int, ...]
    last_seen: bool


class Reassembler:
    """Reassembles one upload from chunk frames in any order, with duplicates; memory = payload size."""

    __slots__ = ("header", "_parts", "_received", "_last_seen")

    def __init__(self, header: ChunkHeader):
        header.check()
        self.header = header
        self._parts: dict[int, bytes] = {}
        self._received = 0
        self._last_seen = False

    @property
    def received_bytes(self) -> int:
        return self._received

    def missing(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.header.total) if i not in self._parts)

    def add(self, header: ChunkHeader, data: bytes) -> ChunkResult:
        h0 = self.header
        if (header.total, header.chunk_bytes, header.payload_bytes, header.sha256) != (
                h0.total, h0.chunk_bytes, h0.payload_bytes, h0.sha256):
            raise PayloadError("chunk does not belong to this upload (total, sizes or sha256 differ)")
        if header.index not in self._parts:
            self._parts[header.index] = bytes(data)
            self._received += len(data)
        if header.index == h0.total - 1:
            self._last_seen = True
        if len(self._parts) == h0.total:
            payload = b"".join(self._parts[i] for i in range(h0.total))
            if hashlib.sha256(payload).hexdigest() != h0.sha256:
                raise PayloadError("reassembled payload does not match its sha256")
            return ChunkResult(payload, (), True)
        return ChunkResult(None, self.missing() if self._last_seen else (), self._last_seen)


# ----------------------------------------------------------------------------- signed global models

_GLOBAL_MAGIC = b"FMG" + bytes([PROTOCOL_VERSION])
_GLOBAL_HEAD = struct.Struct(">4sH")


@dataclass(frozen=True, slots=True)
class GlobalHeader:
    fleet: str
    round: int
    modality: str
    sha256: str
    signature: str   # hex Ed25519 signature of global_signing_bytes(...)


def global_signing_bytes(fleet: str, round_index: int, modality: str, sha256: str) -> bytes:
    """What the coordinator signs: domain tag, fleet, round, modality and the payload's sha256."""
    return f"fedmfs/v{PROTOCOL_VERSION}/global\n{fleet}\n{int(round_index)}\n{modality}\n{sha256}".encode()


def encode_global(fleet: str, round_index: int, modality: str, payload: bytes, signer: "Signer") -> bytes:
    sha = hashlib.sha256(payload).hexdigest()
    sig = signer.sign(global_signing_bytes(fleet, round_index, modality, sha))
    head = json.dumps({"fleet": fleet, "round": int(round_index), "modality": modality, "sha256": sha,
                       "signature": sig.hex()}, separators=(",", ":"), sort_keys=True).encode()
    return _GLOBAL_HEAD.pack(_GLOBAL_MAGIC, len(head)) + head + payload


def decode_global(frame: bytes, verifier: "Verifier | None") -> tuple[GlobalHeader, bytes]:
    """Parse a global-model frame, check the payload's sha256 and (unless ``verifier`` is None, which
    only the coordinator itself may use for its own files) the Ed25519 signature."""
    frame = bytes(frame)
    if len(frame) < _GLOBAL_HEAD.size:
        raise PayloadError("global model frame too short")
    magic, n = _GLOBAL_HEAD.unpack_from(frame)
    if magic != _GLOBAL_MAGIC:
        raise PayloadError(f"global model magic {magic!r} is not {_GLOBAL_MAGIC!r}")
    if len(frame) > _GLOBAL_HEAD.size + n + MAX_UPLOAD_BYTES or len(frame) < _GLOBAL_HEAD.size + n:
        raise PayloadError("global model frame: header length exceeds the frame")
    try:
        d = json.loads(frame[_GLOBAL_HEAD.size:_GLOBAL_HEAD.size + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PayloadError(f"global model header is not JSON: {e}") from e
    if not isinstance(d, dict):
        raise PayloadError("global model header is not an object")
    sig = _get(d, "signature", str)
    sha = _get(d, "sha256", str)
    if not _HEX64.match(sha) or not re.fullmatch(r"[0-9a-f]{128}", sig):
        raise PayloadError("global model header: bad sha256 or signature format")
    h = GlobalHeader(validate_name("fleet", _get(d, "fleet", str)), _nonneg_int(d, "round"),
                     _modality(_get(d, "modality", str)), sha, sig)
    payload = frame[_GLOBAL_HEAD.size + n:]
    if hashlib.sha256(payload).hexdigest() != h.sha256:
        raise PayloadError("global model payload does not match its sha256")
    if verifier is not None:
        verifier.verify(bytes.fromhex(sig), global_signing_bytes(h.fleet, h.round, h.modality, h.sha256))
    return h, payload


class Signer:
    """Ed25519 signing key of the coordinator (raw 32-byte private key, hex in files)."""

    def __init__(self, private_hex: str):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        try:
            self._key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex.strip()))
        except ValueError as e:
            raise PayloadError(f"not an Ed25519 private key (64 hex digits expected): {e}") from e

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_hex(self) -> str:
        from cryptography.hazmat.primitives import serialization
        return self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw).hex()


class Verifier:
    """Ed25519 public key a device trusts (raw 32 bytes, hex)."""

    def __init__(self, public_hex: str):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        try:
            self._key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex.strip()))
        except ValueError as e:
            raise PayloadError(f"not an Ed25519 public key (64 hex digits expected): {e}") from e

    def verify(self, signature: bytes, data: bytes) -> None:
        from cryptography.exceptions import InvalidSignature
        try:
            self._key.verify(signature, data)
        except InvalidSignature as e:
            raise PayloadError("global model signature does not verify with the coordinator's key") from e


def generate_keypair() -> tuple[str, str]:
    """A new (private hex, public hex) Ed25519 pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    k = Ed25519PrivateKey.generate()
    priv = k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption()).hex()
    return priv, Signer(priv).public_hex()
