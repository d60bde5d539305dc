"""Signed frames: the coordinator's Ed25519 key, and the global-model frame it signs."""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import stat
import struct
import tempfile
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
from fedmfs.core.wire.limits import MAX_UPLOAD_BYTES, PROTOCOL_VERSION

__all__ = [
    "GlobalHeader",
    "Signer",
    "Verifier",
    "decode_global",
    "encode_global",
    "generate_keypair",
    "global_signing_bytes",
    "load_private_key",
    "write_private_key",
]

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


def encode_global(fleet: str, round_index: int, modality: str, payload: bytes, signer: Signer) -> bytes:
    sha = hashlib.sha256(payload).hexdigest()
    sig = signer.sign(global_signing_bytes(fleet, round_index, modality, sha))
    head = json.dumps({"fleet": fleet, "round": int(round_index), "modality": modality, "sha256": sha,
                       "signature": sig.hex()}, separators=(",", ":"), sort_keys=True).encode()
    return _GLOBAL_HEAD.pack(_GLOBAL_MAGIC, len(head)) + head + payload


def decode_global(frame: bytes, verifier: Verifier | None) -> tuple[GlobalHeader, bytes]:
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
    sig = get_field(d, "signature", str)
    sha = get_field(d, "sha256", str)
    if not HEX64.match(sha) or not re.fullmatch(r"[0-9a-f]{128}", sig):
        raise PayloadError("global model header: bad sha256 or signature format")
    h = GlobalHeader(validate_name("fleet", get_field(d, "fleet", str)), nonneg_int(d, "round"),
                     validate_modality(get_field(d, "modality", str)), sha, sig)
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
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        os.chmod(p, 0o600)   # the old key stops being readable by others now, not after the rename
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(private_hex.strip() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
