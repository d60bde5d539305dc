"""Upload chunk frames: a 56-byte binary header + a slice of the payload; reassembly in any order."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from fedmfs.core.errors import PayloadError
from fedmfs.core.wire.limits import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_UPLOAD_BYTES,
    PROTOCOL_VERSION,
)

__all__ = [
    "CHUNK_HEADER_BYTES",
    "ChunkHeader",
    "ChunkResult",
    "Reassembler",
    "decode_chunk",
    "encode_chunk",
    "split_payload",
]

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

    __slots__ = ("_last_seen", "_parts", "_received", "header")

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
        header.check()      # the index too (decode_chunk checks it; a caller building headers may not)
        if len(data) != header.expected_len():
            raise PayloadError(f"chunk {header.index} carries {len(data)} bytes, expected {header.expected_len()}")
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
