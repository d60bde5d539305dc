"""Protocol constants (docs/protocol.md): the version, the topic root and every size limit."""

from __future__ import annotations

__all__ = [
           "DEFAULT_CHUNK_BYTES",
           "DEFAULT_MAX_SAMPLES",
           "MAX_CHUNKS",
           "MAX_CHUNK_BYTES",
           "MAX_CONTROL_BYTES",
           "MAX_FETCH_CHUNKS",
           "MAX_FETCH_GLOBALS",
           "MAX_MISSING_LISTED",
           "MAX_UPLOAD_BYTES",
           "PROTOCOL_VERSION",
           "TOPIC_ROOT",
]

PROTOCOL_VERSION = 2      # 2: signed round and config frames, the fleet epoch (docs/protocol.md)
TOPIC_ROOT = "fedmfs/v1"          # unchanged by protocol 2: the broker ACLs and enrol name it
MAX_CONTROL_BYTES = 256 * 1024          # a JSON control message (report, config, ack, round)
DEFAULT_CHUNK_BYTES = 64 * 1024         # payload bytes per chunk frame
MAX_CHUNK_BYTES = 4 * 1024 * 1024       # largest chunk a receiver accepts
MAX_UPLOAD_BYTES = 64 * 1024 * 1024     # largest model payload (= fedmfs.core.payload.MAX_PAYLOAD_BYTES)
MAX_CHUNKS = 65536
MAX_MISSING_LISTED = 1024               # an ack lists at most this many missing chunk indices
MAX_FETCH_CHUNKS = 64                   # a fetch asks for at most this many chunks of one global
MAX_FETCH_GLOBALS = 64                  # ... of at most this many globals

# The largest sample count (aggregation weight) the coordinator takes from a device that the fleet file
# gives no max_samples (docs/protocol.md "Bounded influence"); the protocol's own ceiling on any
# header's count is fedmfs.core.payload.MAX_SAMPLES (2^31 - 1).
DEFAULT_MAX_SAMPLES = 10_000
