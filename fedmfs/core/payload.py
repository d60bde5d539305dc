"""Model payloads: safetensors bytes with a small header in the safetensors metadata.

A payload carries one modality model (a dict of named float tensors) encoded with a codec:
``fp32`` (as is), ``fp16`` (half precision), ``int8`` (per-tensor symmetric quantisation; the scale of
tensor ``w`` travels as float32 tensor ``w.__scale__``). The header (all strings, as safetensors
metadata must be) holds: ``format`` (=``fedmfs-model``), ``version``, ``round``, ``modality``,
``samples``, ``codec`` and ``sha256`` of the decoded float32 tensors (names sorted, raw bytes), so the
receiver verifies what it will aggregate. Never pickle: safetensors cannot execute code.

Every header value is checked before any work: a string (safetensors' own rule), integers as plain
decimal digits in range (``samples`` in [1, :data:`MAX_SAMPLES`], so a claim of 2^64 samples never
reaches the coordinator's SQLite ledger), the JSON header at most :data:`MAX_HEADER_BYTES` and
:data:`fedmfs.core.safejson.MAX_JSON_DEPTH` levels deep.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from enum import Enum

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedmfs.core.errors import PayloadError
from fedmfs.core.safejson import loads as json_loads

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "MAX_ROUND",
    "MAX_SAMPLES",
    "PAYLOAD_VERSION",
    "Codec",
    "ModelHeader",
    "decode_model",
    "encode_model",
    "encoded_size",
    "state_digest",
]

PAYLOAD_VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024      # the safetensors JSON header (ours: about 100 bytes per tensor)
# The largest sample count a header may claim: far above any device's training windows, far below
# SQLite's INTEGER (2^63 - 1) and exact in float64 sums of many devices. A fleet bounds each device
# much lower (the fleet file's max_samples, fedmfs.core.wire.limits.DEFAULT_MAX_SAMPLES).
MAX_SAMPLES = 2**31 - 1
MAX_ROUND = 2**31 - 1
_SCALE = ".__scale__"
_META_VALUE_CHARS = 256
_DECIMAL = re.compile(r"(0|[1-9][0-9]{0,18})")


class Codec(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True, slots=True)
class ModelHeader:
    round: int
    modality: str
    samples: int
    codec: Codec = Codec.FP32
    sha256: str = ""
    version: int = PAYLOAD_VERSION


def state_digest(state: dict[str, np.ndarray]) -> str:
    """sha256 over the float32 tensors in name order (name, shape and bytes of each)."""
    h = hashlib.sha256()
    for k in sorted(state):
        a = np.ascontiguousarray(state[k], dtype=np.float32)
        h.update(k.encode())
        h.update(json.dumps(list(a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _quantise(state: dict[str, np.ndarray], codec: Codec) -> dict[str, np.ndarray]:
    if codec is Codec.FP32:
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    if codec is Codec.FP16:
        return {k: np.ascontiguousarray(v, dtype=np.float16) for k, v in state.items()}
    out: dict[str, np.ndarray] = {}
    for k, v in state.items():
        v = np.asarray(v, dtype=np.float32)
        scale = float(np.abs(v).max()) / 127.0 if v.size else 0.0
        scale = scale or 1.0
        out[k] = np.clip(np.rint(v / scale), -127, 127).astype(np.int8)
        out[k + _SCALE] = np.array([scale], dtype=np.float32)
    return out


def dequantise(tensors: dict[str, np.ndarray], codec: Codec) -> dict[str, np.ndarray]:
    if codec is Codec.INT8:
        out = {}
        for k, v in tensors.items():
            if k.endswith(_SCALE):
                continue
            s = tensors.get(k + _SCALE)
            if s is None or s.shape != (1,) or v.dtype != np.int8:
                raise PayloadError(f"int8 tensor {k!r} lacks its float32 scale {k + _SCALE!r}")
            out[k] = v.astype(np.float32) * np.float32(s[0])
        return out
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def encode_model(state: dict[str, np.ndarray], header: ModelHeader) -> bytes:
    """Encode a model's tensors with the header's codec; the sha256 is computed here."""
    codec = Codec(header.codec)
    if not 1 <= int(header.samples) <= MAX_SAMPLES or not 0 <= int(header.round) <= MAX_ROUND:
        raise PayloadError(f"header: samples must be in [1, {MAX_SAMPLES}] and round in [0, {MAX_ROUND}], "
                           f"got {header.samples} and {header.round}")
    if not state:
        raise PayloadError("cannot encode an empty model")
    for k in state:
        if k.endswith(_SCALE) or not k:
            raise PayloadError(f"tensor name {k!r} is reserved")
    tensors = _quantise(state, codec)
    decoded = dequantise(tensors, codec)
    meta = {
        "format": "fedmfs-model",
        "version": str(header.version),
        "round": str(int(header.round)),
        "modality": header.modality,
        "samples": str(int(header.samples)),
        "codec": codec.value,
        "sha256": state_digest(decoded),
    }
    return st_save(tensors, metadata=meta)


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise PayloadError(f"payload too short ({len(data)} bytes)")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {len(data)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise PayloadError(f"safetensors header length {n} exceeds the payload or the limit of {MAX_HEADER_BYTES}")
    head = json_loads(data[8:8 + n], "safetensors header")
    if not isinstance(head, dict):
        raise PayloadError("safetensors header is not an object")
    meta = head.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != "fedmfs-model":
        raise PayloadError("not a fedmfs model payload (metadata 'format' != 'fedmfs-model')")
    bad = sorted(k for k, v in meta.items() if not isinstance(v, str) or len(v) > _META_VALUE_CHARS)
    if bad:
        raise PayloadError(f"payload header values must be strings of at most {_META_VALUE_CHARS} characters: "
                           f"{', '.join(map(repr, bad))} are not")
    return meta


def _header_int(meta: dict[str, str], key: str, lo: int, hi: int) -> int:
    """A header integer: plain decimal digits (no sign, space, '_' or leading zero) in [lo, hi]."""
    text = meta[key]
    if not _DECIMAL.fullmatch(text):
        raise PayloadError(f"payload header {key!r} must be a decimal integer in [{lo}, {hi}], got {text[:40]!r}")
    v = int(text)
    if not lo <= v <= hi:
        raise PayloadError(f"payload header {key!r} must be in [{lo}, {hi}], got {v}")
    return v


def _check_tensors(tensors: dict[str, np.ndarray], codec: Codec) -> None:
    """The tensors are what :func:`encode_model` writes with ``codec``: at least one, named, of the codec's
    dtype; ``<name>.__scale__`` only with int8, float32 of shape (1,), next to its tensor. (Fuzzing's
    round trip found payloads the decoder took and the encoder refuses: no tensors, an empty name, a
    float64 ``w.__scale__`` in an fp32 payload, an int8 scale without its tensor.)"""
    if not tensors:
        raise PayloadError("payload holds no tensors")
    want = np.dtype({Codec.FP32: np.float32, Codec.FP16: np.float16, Codec.INT8: np.int8}[codec])
    bad = []
    for k, v in sorted(tensors.items()):
        if not k.endswith(_SCALE):
            if not k:
                bad.append("a tensor with an empty name")
            elif v.dtype != want:
                bad.append(f"tensor {k!r} is {v.dtype}, the codec {codec.value} needs {want}")
        elif codec is not Codec.INT8:
            bad.append(f"tensor name {k!r} is reserved for the scales of the int8 codec")
        elif k[:-len(_SCALE)] not in tensors:
            bad.append(f"scale {k!r} has no tensor {k[:-len(_SCALE)]!r}")
        elif v.dtype != np.float32 or v.shape != (1,):
            bad.append(f"scale {k!r} must be float32 of shape (1,), got {v.dtype} {v.shape}")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise PayloadError("; ".join(bad[:5]) + more)


def decode_model(data: bytes) -> tuple[ModelHeader, dict[str, np.ndarray]]:
    """Decode and verify a payload: header fields, codec, tensor dtypes, finiteness and sha256."""
    meta = _read_metadata(bytes(data))
    try:
        version = _header_int(meta, "version", 0, MAX_ROUND)
        if version != PAYLOAD_VERSION:
            raise PayloadError(f"payload version {version} not supported (this fedmfs speaks {PAYLOAD_VERSION})")
        header = ModelHeader(
            round=_header_int(meta, "round", 0, MAX_ROUND),
            modality=meta["modality"],
            samples=_header_int(meta, "samples", 1, MAX_SAMPLES),
            codec=Codec(meta["codec"]),
            sha256=meta["sha256"],
            version=version,
        )
    except KeyError as e:
        raise PayloadError(f"payload header lacks {e.args[0]!r}") from e
    except ValueError as e:
        raise PayloadError(f"payload header has a bad value: {e}") from e
    try:
        tensors = st_load(bytes(data))
    except Exception as e:  # safetensors raises its own SafetensorError on any malformed body
        raise PayloadError(f"malformed safetensors body: {e}") from e
    _check_tensors(tensors, header.codec)
    state = dequantise(tensors, header.codec)
    for k, v in state.items():
        if not np.isfinite(v).all():
            raise PayloadError(f"tensor {k!r} has NaN or infinite values")
    if state_digest(state) != header.sha256:
        raise PayloadError("sha256 mismatch: the payload was altered or truncated")
    return header, state


def encoded_size(state: dict[str, np.ndarray], codec: Codec | str = Codec.FP32, modality: str = "m") -> int:
    """Bytes on the wire of ``state`` encoded with ``codec`` (what selection calls a model's size)."""
    return len(encode_model(state, ModelHeader(round=0, modality=modality, samples=1, codec=Codec(codec))))
