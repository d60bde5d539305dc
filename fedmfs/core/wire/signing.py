"""Signed frames: the coordinator's Ed25519 key, the global-model frame and the control frame it signs.

Both frames are a 4-byte magic (the last byte the protocol version), a 2-byte big-endian header length,
a small JSON header with a detached hex Ed25519 signature, then the body: a model payload (``FMG``) or
a JSON control message, ``round`` or ``config`` (``FMS``). The signature covers a domain tag, the fleet,
the fleet epoch, the round and the body's sha256, so a device can tell a frame of its coordinator, its
fleet and its fleet's current life from anything else (docs/protocol.md "Signed fleet state").
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.fields import (
    HEX64,
    get_field,
    nonneg_int,
    validate_modality,
    validate_name,
)
from fedmfs.core.fsio import atomic_write
from fedmfs.core.safejson import loads as json_loads
from fedmfs.core.wire.limits import MAX_CONTROL_BYTES, MAX_UPLOAD_BYTES, PROTOCOL_VERSION

__all__ = [
    "CONTROL_KINDS",
    "ControlHeader",
    "GlobalHeader",
    "Signer",
    "Verifier",
    "control_signing_bytes",
    "decode_control",
    "decode_global",
    "encode_control",
    "encode_global",
    "generate_keypair",
    "global_signing_bytes",
    "is_control_frame",
    "load_private_key",
    "write_private_key",
]

_GLOBAL_MAGIC = b"FMG" + bytes([PROTOCOL_VERSION])
_LEGACY_GLOBAL_MAGIC = b"FMG\x01"     # protocol 1: no epoch; read only from the coordinator's own ledger
_CONTROL_MAGIC = b"FMS" + bytes([PROTOCOL_VERSION])
_HEAD = struct.Struct(">4sH")
_SIG = re.compile(r"[0-9a-f]{128}")
CONTROL_KINDS = ("round", "config")     # the control messages the coordinator signs


@dataclass(frozen=True, slots=True)
class GlobalHeader:
    fleet: str
    round: int       # the round this global is trained in (initial models: 0)
    modality: str
    sha256: str
    signature: str   # hex Ed25519 signature of global_signing_bytes(...)
    epoch: int = 0   # the fleet epoch (docs/protocol.md "Signed fleet state")


@dataclass(frozen=True, slots=True)
class ControlHeader:
    """The signed header of a control frame: whose fleet and epoch, which kind, at which round."""

    fleet: str
    kind: str        # "round" or "config"
    epoch: int
    round: int       # round: the announced round; config: the coordinator's round when it published it
    sha256: str      # of the body (the JSON control message)
    signature: str


def global_signing_bytes(fleet: str, round_index: int, modality: str, sha256: str, epoch: int = 0) -> bytes:
    """What the coordinator signs: domain tag, fleet, epoch, round, modality and the payload's sha256."""
    return (f"fedmfs/v{PROTOCOL_VERSION}/global\n{fleet}\n{int(epoch)}\n{int(round_index)}\n{modality}\n"
            f"{sha256}").encode()


def control_signing_bytes(fleet: str, kind: str, epoch: int, round_index: int, sha256: str) -> bytes:
    """What the coordinator signs for a control message: domain tag, fleet, kind, epoch, round and the
    sha256 of the message bytes (a different domain tag than globals: no frame passes for the other)."""
    return f"fedmfs/v{PROTOCOL_VERSION}/control\n{fleet}\n{kind}\n{int(epoch)}\n{int(round_index)}\n{sha256}".encode()


def _head(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()


def encode_global(fleet: str, round_index: int, modality: str, payload: bytes, signer: Signer,
                  epoch: int = 0) -> bytes:
    sha = hashlib.sha256(payload).hexdigest()
    sig = signer.sign(global_signing_bytes(fleet, round_index, modality, sha, epoch))
    head = _head({"fleet": fleet, "epoch": int(epoch), "round": int(round_index), "modality": modality,
                  "sha256": sha, "signature": sig.hex()})
    return _HEAD.pack(_GLOBAL_MAGIC, len(head)) + head + payload


def _split(frame: bytes, magics: tuple[bytes, ...], what: str, max_body: int) -> tuple[bytes, dict, bytes]:
    """(magic, JSON header, body) of a signed frame; every failure a PayloadError naming ``what``."""
    if len(frame) < _HEAD.size:
        raise PayloadError(f"{what} frame too short")
    magic, n = _HEAD.unpack_from(frame)
    if magic not in magics:
        raise PayloadError(f"{what} magic {magic!r} is not {magics[0]!r}")
    if len(frame) > _HEAD.size + n + max_body or len(frame) < _HEAD.size + n:
        raise PayloadError(f"{what} frame: header length exceeds the frame")
    d = json_loads(frame[_HEAD.size:_HEAD.size + n], f"{what} header")   # bounded: never a ValueError
    if not isinstance(d, dict):
        raise PayloadError(f"{what} header is not an object")
    return magic, d, frame[_HEAD.size + n:]


def _sig_and_sha(d: dict, what: str) -> tuple[str, str]:
    sig = get_field(d, "signature", str)
    sha = get_field(d, "sha256", str)
    if not HEX64.match(sha) or not _SIG.fullmatch(sig):
        raise PayloadError(f"{what} header: bad sha256 or signature format")
    return sig, sha


def decode_global(frame: bytes, verifier: Verifier | None) -> tuple[GlobalHeader, bytes]:
    """Parse a global-model frame, check the payload's sha256 and (unless ``verifier`` is None, which
    only the coordinator itself may use for its own files) the Ed25519 signature. With no verifier a
    protocol-1 frame (no epoch; epoch 0) is read too: the coordinator re-signs its ledger's globals."""
    frame = bytes(frame)
    magics = (_GLOBAL_MAGIC,) if verifier is not None else (_GLOBAL_MAGIC, _LEGACY_GLOBAL_MAGIC)
    magic, d, payload = _split(frame, magics, "global model", MAX_UPLOAD_BYTES)
    sig, sha = _sig_and_sha(d, "global model")
    epoch = 0 if magic == _LEGACY_GLOBAL_MAGIC else nonneg_int(d, "epoch")
    h = GlobalHeader(validate_name("fleet", get_field(d, "fleet", str)), nonneg_int(d, "round"),
                     validate_modality(get_field(d, "modality", str)), sha, sig, epoch)
    if hashlib.sha256(payload).hexdigest() != h.sha256:
        raise PayloadError("global model payload does not match its sha256")
    if verifier is not None:
        verifier.verify(bytes.fromhex(sig), global_signing_bytes(h.fleet, h.round, h.modality, h.sha256, h.epoch),
                        "global model")
    return h, payload


def is_control_frame(data: bytes) -> bool:
    """True for bytes that start like a signed control frame (of any protocol version)."""
    return bytes(data[:3]) == b"FMS"


def encode_control(fleet: str, kind: str, epoch: int, round_index: int, body: bytes, signer: Signer) -> bytes:
    """A signed control frame around ``body`` (a JSON ``round`` or ``config`` message)."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"control kind must be one of {CONTROL_KINDS}, got {kind!r}")
    sha = hashlib.sha256(body).hexdigest()
    sig = signer.sign(control_signing_bytes(fleet, kind, epoch, round_index, sha))
    head = _head({"fleet": fleet, "kind": kind, "epoch": int(epoch), "round": int(round_index), "sha256": sha,
                  "signature": sig.hex()})
    return _HEAD.pack(_CONTROL_MAGIC, len(head)) + head + body


def decode_control(frame: bytes, verifier: Verifier | None) -> tuple[ControlHeader, bytes]:
    """Parse a signed control frame, check the body's sha256 and (unless ``verifier`` is None: a reader
    that only observes, never trusts) the signature; returns the header and the body bytes."""
    frame = bytes(frame)
    if is_control_frame(frame) and len(frame) >= 4 and frame[:4] != _CONTROL_MAGIC:
        raise PayloadError(f"signed control frame of protocol version {frame[3]} (this fedmfs speaks "
                           f"{PROTOCOL_VERSION}); upgrade the coordinator and the devices together")
    _, d, body = _split(frame, (_CONTROL_MAGIC,), "signed control", MAX_CONTROL_BYTES)
    sig, sha = _sig_and_sha(d, "signed control")
    kind = get_field(d, "kind", str)
    if kind not in CONTROL_KINDS:
        raise PayloadError(f"signed control frame of kind {kind!r} (only {', '.join(CONTROL_KINDS)} are signed)")
    h = ControlHeader(validate_name("fleet", get_field(d, "fleet", str)), kind, nonneg_int(d, "epoch"),
                      nonneg_int(d, "round"), sha, sig)
    if hashlib.sha256(body).hexdigest() != h.sha256:
        raise PayloadError("signed control frame: the message does not match its sha256")
    if verifier is not None:
        verifier.verify(bytes.fromhex(sig), control_signing_bytes(h.fleet, h.kind, h.epoch, h.round, h.sha256),
                        f"{kind} message")
    return h, body


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

    def verify(self, signature: bytes, data: bytes, what: str = "global model") -> None:
        from cryptography.exceptions import InvalidSignature
        try:
            self._key.verify(signature, data)
        except InvalidSignature as e:
            raise PayloadError(f"{what} signature does not verify with the coordinator's key") from e


def generate_keypair() -> tuple[str, str]:
    """A new (private hex, public hex) Ed25519 pair."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    k = Ed25519PrivateKey.generate()
    priv = k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption()).hex()
    return priv, Signer(priv).public_hex()


def _describe(path: Path) -> str:
    """``mode 640, owner uid 0 (root), group gid 0 (root)`` of ``path``, for an error message."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"not accessible: {e.strerror}"
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = "?"
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = "?"
    return f"mode {stat.S_IMODE(st.st_mode):03o}, owner uid {st.st_uid} ({user}), group gid {st.st_gid} ({group})"


def _running_as() -> str:
    uid = os.geteuid()
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def load_private_key(path: str | os.PathLike) -> Signer:
    """The coordinator's signing key from ``path`` (64 hex digits, as ``fedmfs-coordinator keygen``
    writes it). A missing, unreadable or malformed file is a :class:`ConfigError` that names the file,
    its mode and owner, who we run as, and the fix."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except FileNotFoundError as e:
        raise ConfigError(f"signing key {p} does not exist; create one with "
                          f"`fedmfs-coordinator keygen --out {p}`") from e
    except PermissionError as e:
        raise ConfigError(
            f"signing key {p} is not readable by the coordinator (running as {_running_as()}; the file has "
            f"{_describe(p)}); give it to the service user: `chown fedmfs: {p} && chmod 600 {p}`") from e
    except IsADirectoryError as e:
        raise ConfigError(f"signing key {p} is a directory; point signing_key at the file "
                          f"`fedmfs-coordinator keygen --out FILE` wrote") from e
    except OSError as e:
        raise ConfigError(f"signing key {p} unreadable ({_describe(p)}): {e.strerror or e}") from e
    try:
        return Signer(raw.decode("ascii"))
    except (UnicodeDecodeError, PayloadError) as e:
        raise ConfigError(f"signing key {p} is not an Ed25519 private key (64 hex digits expected); write a "
                          f"new one with `fedmfs-coordinator keygen --out {p} --force` and give the devices "
                          "its public key") from e


def write_private_key(path: str | os.PathLike, private_hex: str) -> None:
    """Write a private key readable by its owner only (mode 600, whatever the umask or the mode of a
    file it replaces): an existing file is made 600 first, the new key goes to a 600 temp file in the
    same directory, is fsynced and renamed over ``path``, and the directory is fsynced."""
    p = Path(path)
    if p.exists():
        os.chmod(p, 0o600)   # the old key stops being readable by others now, not after the rename
    atomic_write(p, (private_hex.strip() + "\n").encode(), mode=0o600, sync_dir=True)
