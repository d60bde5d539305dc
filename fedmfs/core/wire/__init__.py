"""The MQTT wire protocol (docs/protocol.md), torch-free.

One module per concept: :mod:`~fedmfs.core.wire.limits` (version and size limits),
:mod:`~fedmfs.core.wire.topics` (topic names), :mod:`~fedmfs.core.wire.messages` (JSON control
messages and their codes), :mod:`~fedmfs.core.wire.chunks` (upload chunk frames and reassembly),
:mod:`~fedmfs.core.wire.signing` (Ed25519 keys, signed global-model and control frames) and
:mod:`~fedmfs.core.wire.actions` (what the round machines ask their adapters to do). Every decoder
validates strictly and raises :class:`fedmfs.core.errors.PayloadError` with a reason; none of them
can crash on hostile bytes (they are fuzzed).
"""

from fedmfs.core.fields import validate_modality, validate_name
from fedmfs.core.wire.actions import Publish, Tick
from fedmfs.core.wire.chunks import (
    CHUNK_HEADER_BYTES,
    ChunkHeader,
    ChunkResult,
    Reassembler,
    decode_chunk,
    encode_chunk,
    split_payload,
)
from fedmfs.core.wire.limits import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_SAMPLES,
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MAX_CONTROL_BYTES,
    MAX_MISSING_LISTED,
    MAX_UPLOAD_BYTES,
    PROTOCOL_VERSION,
    TOPIC_ROOT,
)
from fedmfs.core.wire.messages import (
    Ack,
    AckReason,
    DeviceConfig,
    DeviceState,
    DeviceStatus,
    Evaluation,
    Message,
    Report,
    RoundAnnouncement,
    RoundState,
    decode_message,
    encode_message,
    sign_message,
    verify_message,
)
from fedmfs.core.wire.signing import (
    CONTROL_KINDS,
    ControlHeader,
    GlobalHeader,
    Signer,
    Verifier,
    control_signing_bytes,
    decode_control,
    decode_global,
    encode_control,
    encode_global,
    generate_keypair,
    global_signing_bytes,
    is_control_frame,
)
from fedmfs.core.wire.topics import ParsedTopic, TopicKind, Topics, parse_topic

__all__ = [
    "CHUNK_HEADER_BYTES",
    "CONTROL_KINDS",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_SAMPLES",
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MAX_CONTROL_BYTES",
    "MAX_MISSING_LISTED",
    "MAX_UPLOAD_BYTES",
    "PROTOCOL_VERSION",
    "TOPIC_ROOT",
    "Ack",
    "AckReason",
    "ChunkHeader",
    "ChunkResult",
    "ControlHeader",
    "DeviceConfig",
    "DeviceState",
    "DeviceStatus",
    "Evaluation",
    "GlobalHeader",
    "Message",
    "ParsedTopic",
    "Publish",
    "Reassembler",
    "Report",
    "RoundAnnouncement",
    "RoundState",
    "Signer",
    "Tick",
    "TopicKind",
    "Topics",
    "Verifier",
    "control_signing_bytes",
    "decode_chunk",
    "decode_control",
    "decode_global",
    "decode_message",
    "encode_chunk",
    "encode_control",
    "encode_global",
    "encode_message",
    "generate_keypair",
    "global_signing_bytes",
    "is_control_frame",
    "parse_topic",
    "sign_message",
    "split_payload",
    "validate_modality",
    "validate_name",
    "verify_message",
]
