"""The device's side of one upload, sans-I/O: which chunk frames to (re)send, and when it is over.

Send every chunk once; then wait for the coordinator's ack. ``missing_chunks`` -> resend exactly
those; no ack within ``ack_timeout`` -> probe with the last chunk (the coordinator answers with what
it lacks, or ``accepted`` if it already has it); any other reason is final. Bounded attempts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from fedmfs.core.wire import Ack, AckReason, split_payload

__all__ = ["UploadStatus", "UploadTracker", "publish_packet_bytes"]


def publish_packet_bytes(topic: str, payload_len: int, qos: int = 1, mqtt5: bool = True) -> int:
    """Bytes of one MQTT PUBLISH packet: fixed header + topic + packet id + (v5) properties + payload."""
    body = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if mqtt5 else 0) + payload_len
    n, rem = 1, body
    while True:   # the remaining-length varint
        n += 1
        rem //= 128
        if not rem:
            break
    return n + body


class UploadStatus(str, Enum):
    NEW = "new"
    WAITING = "waiting"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    FAILED = "failed"      # no answer after max_attempts probes


@dataclass
class UploadTracker:
    modality: str
    payload: bytes
    chunk_bytes: int
    ack_timeout: float
    max_attempts: int
    status: UploadStatus = UploadStatus.NEW
    reason: AckReason | None = None
    attempts: int = 0
    sent_at: float = 0.0
    frames_sent: int = 0
    frame_bytes_sent: int = 0
    frames: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.frames = split_payload(self.payload, self.chunk_bytes)
        import hashlib
        self.sha256 = hashlib.sha256(self.payload).hexdigest()

    @property
    def done(self) -> bool:
        return self.status in (UploadStatus.ACCEPTED, UploadStatus.REFUSED, UploadStatus.FAILED)

    def _send(self, idx, now: float) -> list[bytes]:
        self.sent_at = now
        self.status = UploadStatus.WAITING
        out = [self.frames[i] for i in idx if 0 <= i < len(self.frames)]
        self.frames_sent += len(out)
        self.frame_bytes_sent += sum(len(f) for f in out)
        return out

    def start(self, now: float, resume: bool = False) -> list[bytes]:
        """All frames; after a restart (``resume``) only the last one, as a probe."""
        return self._send([len(self.frames) - 1] if resume else range(len(self.frames)), now)

    def on_ack(self, ack: Ack, now: float) -> list[bytes]:
        if self.done or ack.modality != self.modality or (ack.sha256 and ack.sha256 != self.sha256):
            return []
        if ack.reason is AckReason.MISSING_CHUNKS:
            return self._send(list(ack.missing) or [len(self.frames) - 1], now)
        if ack.reason is AckReason.BAD_CHUNK and self.attempts < self.max_attempts:
            self.attempts += 1
            return self._send(range(len(self.frames)), now)    # restart this upload from scratch
        self.reason = ack.reason
        self.status = UploadStatus.ACCEPTED if ack.reason is AckReason.ACCEPTED else UploadStatus.REFUSED
        return []

    def on_tick(self, now: float) -> list[bytes]:
        if self.status is not UploadStatus.WAITING or now - self.sent_at < self.ack_timeout:
            return []
        if self.attempts >= self.max_attempts:
            self.status = UploadStatus.FAILED
            return []
        self.attempts += 1
        return self._send([len(self.frames) - 1], now)
