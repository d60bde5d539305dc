"""Provisioning: ``fedmfs-coordinator enrol DEVICE`` and ``revoke DEVICE``.

Enrolling a device writes, on the gateway, its broker credentials (a Mosquitto password-file line,
optionally a client certificate from the fleet CA), its ACL block (in a section of the broker's ACL
file that this module manages between two marker lines) and its ``[[device]]`` table in the fleet
file (added if absent, kept as it is if present); and, in an output directory for the device, a ready
``edge.toml`` with the broker's host, port and CA, the device id, the fleet and the coordinator's
public key, next to ``edge.password`` (600), ``ca.crt`` and with ``--cert`` ``client.crt`` /
``client.key`` (600). Revoking removes the password line, the ACL block and the fleet-file table, and
adds an issued certificate's serial to the CRL. Both are idempotent: enrolling again rotates the
password (and the certificate: the older one is revoked), revoking again changes nothing.

Every file is replaced atomically (temp file in the same directory, fsync, rename) and keeps the mode
and owner of the file it replaces (the broker reads its password file as the user ``mosquitto``); new
secrets are 600 from the start. The broker reads its files at start and on SIGHUP: after either
command, ``systemctl reload mosquitto`` (and ``systemctl reload fedmfs-coordinator`` for the fleet file).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fedmfs.core.config import tomllib
from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.fsio import atomic_write
from fedmfs.core.wire import Topics, validate_name
from fedmfs.core.wire.signing import load_private_key

from .config import ProvisionConfig

__all__ = [
    "ACL_BEGIN",
    "ACL_END",
    "RELOAD",
    "EnrolResult",
    "RevokeResult",
    "acl_lines",
    "check_password",
    "enrol",
    "password_line",
    "revoke",
]

# Mosquitto 2's password hash ($7$, what mosquitto_passwd writes): PBKDF2-HMAC-SHA512, a 12-byte salt,
# 101 iterations (mosquitto_passwd's default). The passwords are 256 random bits, so the iteration
# count adds nothing against guessing, and the broker pays it on every connection.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12

ACL_BEGIN = "# >>> fedmfs enrol: managed by `fedmfs-coordinator enrol` / `revoke`; edits in here are overwritten"
ACL_END = "# <<< fedmfs enrol"


# --- files ------------------------------------------------------------------------------------------

def _replace(path: Path, data: bytes, new_mode: int = 0o600) -> None:
    """Write ``data`` over ``path`` atomically. An existing file keeps its mode and owner; a new one
    gets ``new_mode`` (set on the temp file before anything is written into it)."""
    atomic_write(path, data, mode=new_mode, keep_existing=True, sync_dir=True)


def _read(path: Path, what: str, missing_ok: bool = True) -> str:
    try:
        return path.read_text()
    except FileNotFoundError as e:
        if missing_ok:
            return ""
        raise ConfigError(f"{what} {path} does not exist") from e
    except OSError as e:
        raise ConfigError(f"{what} {path} unreadable: {e.strerror or e}; run as root or its owner") from e


def _write(path: Path, text: str | bytes, what: str, new_mode: int = 0o600) -> None:
    try:
        _replace(path, text.encode() if isinstance(text, str) else text, new_mode)
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path}: {e.strerror or e}; run as root or its owner") from e


# --- the password file ------------------------------------------------------------------------------

def password_line(user: str, password: str, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """``user:$7$ITERATIONS$SALT$HASH`` (base64), the line ``mosquitto_passwd -b FILE USER PASSWORD``
    writes for Mosquitto 2."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(line: str, password: str) -> bool:
    """Whether a ``$7$`` password-file line holds ``password`` (as the broker checks it)."""
    user, _, h = line.strip().partition(":")
    parts = h.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2])), want)


def _password_users(text: str) -> list[str]:
    return [ln.partition(":")[0] for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def _set_password(path: Path, user: str, line: str | None) -> bool:
    """Replace (``line``) or remove (None) ``user``'s line; True if the file changed."""
    text = _read(path, "the broker's password file")
    lines = [ln for ln in text.splitlines() if ln.partition(":")[0] != user or ln.startswith("#")]
    changed = len(lines) != len(text.splitlines())
    if line is not None:
        lines.append(line)
        changed = True
    if changed:
        _write(path, "".join(ln + "\n" for ln in lines), "the broker's password file")
    return changed


# --- the ACL file -----------------------------------------------------------------------------------

def acl_lines(fleet: str, device: str) -> list[str]:
    """A device's ACL block (derived from :class:`~fedmfs.core.wire.Topics`): it reads the fleet's
    round and global models and its own config, acks and the state and global-model chunks it fetched,
    writes its own uploads, report and fetch requests, and both reads and writes its own status (its
    last will). Nothing else of this fleet or any other."""
    t = Topics(fleet)
    own = t.status(device).rsplit("/", 1)[0]    # fedmfs/v1/<fleet>/device/<id>
    return [f"user {device}",
            f"topic read {t.round()}",
            f"topic read {t.global_all()}",
            f"topic read {t.config(device)}",
            f"topic read {t.ack(device)}",
            f"topic read {t.state(device)}",
            f"topic read {t.device_globals(device)}",
            f"topic write {own}/upload/+/+",
            f"topic write {t.report(device)}",
            f"topic write {t.fetch(device)}",
            f"topic readwrite {t.status(device)}"]


@dataclass
class _Acl:
    head: list[str]                 # before the managed section
    blocks: dict[str, list[str]]    # device -> its block, in file order
    tail: list[str]                 # after it

    @classmethod
    def parse(cls, text: str, path: Path) -> _Acl:
        lines = text.splitlines()
        if ACL_BEGIN not in lines:
            return cls(lines, {}, [])
        i = lines.index(ACL_BEGIN)
        try:
            j = lines.index(ACL_END, i)
        except ValueError as e:
            raise ConfigError(f"{path}: the line {ACL_BEGIN!r} has no {ACL_END!r} after it; restore it or remove "
                              "the section") from e
        blocks: dict[str, list[str]] = {}
        cur: list[str] | None = None
        for ln in lines[i + 1:j]:
            if ln.startswith("user "):
                cur = blocks.setdefault(ln.split(None, 1)[1].strip(), [])
            if cur is not None and ln.strip():
                cur.append(ln)
        return cls(lines[:i], blocks, lines[j + 1:])

    def render(self, path: Path) -> str:
        head = list(self.head)
        while head and not head[-1].strip():
            head.pop()
        section = [ACL_BEGIN]
        for block in self.blocks.values():
            section += block + [""]
        section.append(ACL_END)
        # Mosquitto applies a `topic` line to the last `user` line above it: after the section, the
        # first rule must start its own user block (or be a pattern), or it would be the last device's
        for ln in self.tail:
            word = ln.split(None, 1)[0] if ln.strip() and not ln.lstrip().startswith("#") else ""
            if word == "topic":
                raise ConfigError(f"{path}: a `topic` line follows the fedmfs enrol section without a `user` line; "
                                  "move the section to the end of the file or put a `user` line before it")
            if word in ("user", "pattern"):
                break
        return "\n".join(head + ([""] if head else []) + section + self.tail) + "\n"

    def others(self, device: str) -> bool:
        """A hand-written ``user DEVICE`` line outside the section."""
        return any(ln.strip() == f"user {device}" for ln in self.head + self.tail)


# --- certificates -----------------------------------------------------------------------------------

def _load_ca(cfg: ProvisionConfig):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    if cfg.ca_key is None or cfg.ca_cert is None:
        raise ConfigError(f"{cfg.config} [provision]: --cert needs ca_key and ca_cert (or tls_ca) of the fleet CA")
    try:
        cert = x509.load_pem_x509_certificate(_read(cfg.ca_cert, "CA certificate", False).encode())
    except ValueError as e:
        raise ConfigError(f"CA certificate {cfg.ca_cert} is not a PEM certificate: {e}") from e
    try:
        key = serialization.load_pem_private_key(cfg.ca_key.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise ConfigError(f"CA key {cfg.ca_key} does not exist; set [provision] ca_key to the fleet CA's key") from e
    except (TypeError, ValueError) as e:   # encrypted (TypeError) or not a key
        raise ConfigError(f"CA key {cfg.ca_key} is not an unencrypted PEM private key ({e}); "
                          "decrypt a copy for enrolling: openssl pkey -in KEY -out PLAIN") from e
    except OSError as e:
        raise ConfigError(f"CA key {cfg.ca_key} unreadable: {e.strerror or e}; run as root") from e
    if key.public_key() != cert.public_key():
        raise ConfigError(f"CA key {cfg.ca_key} does not belong to CA certificate {cfg.ca_cert}")
    return cert, key


def _issue(cfg: ProvisionConfig, device: str) -> tuple[bytes, bytes, int]:
    """A client certificate (CN = device id, client auth only) and its new key, signed by the fleet CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca, ca_key = _load_ca(cfg)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    serial = x509.random_serial_number()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=cfg.cert_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem, serial


def _crl_add(cfg: ProvisionConfig, serials: list[int]) -> None:
    """Write the CRL with ``serials`` added (or a fresh, empty one: the broker's ``crlfile`` must exist).
    Its next update is ten years out: OpenSSL refuses every client certificate once a CRL expired."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    assert cfg.crl_file is not None
    ca, ca_key = _load_ca(cfg)
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now)
         .next_update(now + datetime.timedelta(days=3650)))
    old: dict[int, datetime.datetime] = {}
    if cfg.crl_file.exists():
        try:
            crl = x509.load_pem_x509_crl(cfg.crl_file.read_bytes())
        except ValueError as e:
            raise ConfigError(f"CRL {cfg.crl_file} is not a PEM CRL: {e}; move it away to start a new one") from e
        old = {r.serial_number: r.revocation_date_utc for r in crl}
    for s in serials:
        old.setdefault(s, now)
    for s, when in sorted(old.items()):
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(when).build())
    _write(cfg.crl_file, b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), "the CRL",
           new_mode=0o644)


def _issued(cfg: ProvisionConfig, device: str) -> Path | None:
    return None if cfg.issued_dir is None else cfg.issued_dir / f"{device}.crt"


def _serial_of(path: Path) -> int:
    from cryptography import x509
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


# --- the fleet file ---------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[")


def _fleet_ids(text: str, path: Path) -> list[str]:
    try:
        raw = tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    devices = raw.get("device", [])
    if not isinstance(devices, list):
        return []
    return [d["id"] for d in devices if isinstance(d, dict) and isinstance(d.get("id"), str)]


def _fleet_add(path: Path, device: str) -> bool:
    text = _read(path, "fleet file")
    if device in _fleet_ids(text, path):
        return False
    new = text + ("" if not text or text.endswith("\n") else "\n") + f'\n[[device]]\nid = "{device}"\n'
    assert device in _fleet_ids(new, path)
    _write(path, new, "fleet file", new_mode=0o644)
    return True


def _fleet_remove(path: Path, device: str) -> bool:
    """Remove the device's ``[[device]]`` table (up to the next table header; comment lines right above
    that header stay with it) and one blank line around it. The rest of the file is kept byte for byte."""
    text = _read(path, "fleet file")
    ids = _fleet_ids(text, path)
    if device not in ids:
        return False
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if _HEADER.match(ln)]
    for k, i in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        if lines[i].strip() != "[[device]]":
            continue
        try:
            table = tomllib.loads("".join(lines[i:end]))
        except tomllib.TOMLDecodeError:
            continue
        if table.get("device", [{}])[0].get("id") != device:
            continue
        while end > i + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")) \
                and end < len(lines):
            end -= 1
        if i > 0 and not lines[i - 1].strip() and (end == len(lines) or not lines[end].strip()):
            i -= 1    # one blank line between tables, as before
        new = "".join(lines[:i] + lines[end:])
        if sorted(_fleet_ids(new, path)) != sorted(d for d in ids if d != device):
            raise ConfigError(f"{path}: could not remove the [[device]] table of {device!r} cleanly; remove it by hand")
        _write(path, new, "fleet file", new_mode=0o644)
        return True
    raise ConfigError(f"{path}: device {device!r} is not in a [[device]] table of its own (an inline table?); "
                      "remove it by hand")


# --- enrol and revoke -------------------------------------------------------------------------------

@dataclass
class EnrolResult:
    device: str
    out: Path
    files: list[Path]              # what goes to the device
    changed: list[str] = field(default_factory=list)   # what changed on the gateway
    warnings: list[str] = field(default_factory=list)
    serial: int | None = None


@dataclass
class RevokeResult:
    device: str
    changed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _check_device(cfg: ProvisionConfig, device: str) -> None:
    try:
        validate_name("device", device)
    except PayloadError as e:
        raise ConfigError(f"device id: {e}") from e
    if device == cfg.coordinator_user:
        raise ConfigError(f"device id {device!r} is the coordinator's broker user ([broker] username in "
                          f"{cfg.config}); choose another id")
    for key in ("password_file", "acl_file"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"{cfg.config}: [provision] {key} is not set; name the broker's {key} "
                              "(mosquitto.conf) there")


def _toml(v: object) -> str:
    return json.dumps(str(v))   # a TOML basic string


def enrol(cfg: ProvisionConfig, device: str, out: Path, cert: bool = False) -> EnrolResult:
    """Enrol ``device`` (see the module docstring); the device's files go to ``out``."""
    _check_device(cfg, device)
    assert cfg.password_file is not None and cfg.acl_file is not None
    public = load_private_key(cfg.signing_key).public_hex()
    if cfg.tls_ca is None:
        raise ConfigError(f"{cfg.config}: no CA for the devices; set [broker] tls_ca or [provision] tls_ca "
                          "(the CA that signed the broker's certificate)")
    ca_pem = _read(cfg.tls_ca, "broker CA certificate", missing_ok=False)
    if cert and cfg.crl_file is None:
        raise ConfigError(f"{cfg.config}: --cert needs [provision] crl_file (the broker's crlfile), so that "
                          "revoke can revoke the certificate")
    res = EnrolResult(device, out, [])
    text = _read(cfg.acl_file, "the broker's ACL file")
    acl = _Acl.parse(text, cfg.acl_file)
    if acl.others(device):
        res.warnings.append(f"{cfg.acl_file} also has a hand-written `user {device}` block outside the managed "
                            "section: revoke does not remove it")
    # the device's files first: nothing on the gateway changes if the output directory is unwritable
    password = secrets.token_urlsafe(32)
    serial, cert_files = None, []
    if cert:
        crt, key, serial = _issue(cfg, device)
        _write(out / "client.key", key, "the client key")
        _write(out / "client.crt", crt, "the client certificate", new_mode=0o644)
        cert_files = [out / "client.crt", out / "client.key"]
    _write(out / "edge.password", password + "\n", "the device's password file")
    _write(out / "ca.crt", ca_pem, "the CA certificate", new_mode=0o644)
    tls = 'tls_cert = "client.crt"\ntls_key = "client.key"\n' if cert else ""
    edge = (f"# fedmfs-edge run --config /etc/fedmfs/edge.toml (written by fedmfs-coordinator enrol {device})\n"
            f"# Copy this file with edge.password, ca.crt{', client.crt, client.key' if cert else ''} to\n"
            "# /etc/fedmfs/ on the device (relative paths are relative to this file); set data, spec, state_dir.\n"
            f"device = {_toml(device)}\nfleet = {_toml(cfg.fleet)}\n"
            f"coordinator_key = {_toml(public)}   # verifies the signed global models\n"
            f"data = {_toml(f'/srv/fedmfs/data/{device}.npz')}   # the client file (docs/data.md)\n"
            'spec = "/srv/fedmfs/data/fleet.json"\n'
            'state_dir = "/var/lib/fedmfs-edge"\n\n'
            f"[broker]\nhost = {_toml(cfg.host)}\nport = {cfg.port}\nusername = {_toml(device)}\n"
            'password_file = "edge.password"\ntls_ca = "ca.crt"\n' + tls)
    _write(out / "edge.toml", edge, "the device's edge.toml", new_mode=0o644)
    res.files = [out / "edge.toml", out / "edge.password", out / "ca.crt", *cert_files]
    # then the gateway: certificate record and CRL, password, ACL, fleet file
    if cert:
        assert serial is not None
        res.serial = serial
        issued = _issued(cfg, device)
        older = [_serial_of(issued)] if issued is not None and issued.exists() else []
        _crl_add(cfg, older)   # creates the CRL if absent; an older certificate of this device is revoked
        if older:
            res.changed.append(f"certificate serial {older[0]:x} revoked in {cfg.crl_file}")
        if issued is not None:
            _write(issued, crt, "the issued certificate's copy", new_mode=0o644)
        res.changed.append(f"client certificate serial {serial:x} issued (valid {cfg.cert_days} days)")
    _set_password(cfg.password_file, device, password_line(device, password))
    res.changed.append(f"password of {device} set in {cfg.password_file}")
    block = acl_lines(cfg.fleet, device)
    if acl.blocks.get(device) != block:
        acl.blocks[device] = block
        _write(cfg.acl_file, acl.render(cfg.acl_file), "the broker's ACL file", new_mode=0o644)
        res.changed.append(f"ACL block of {device} written to {cfg.acl_file}")
    if _fleet_add(cfg.fleet_file, device):
        res.changed.append(f"[[device]] id = {device!r} added to {cfg.fleet_file} (the [defaults] apply)")
    return res


def revoke(cfg: ProvisionConfig, device: str) -> RevokeResult:
    """Revoke ``device``: its password line, ACL block, fleet-file table and certificate (CRL)."""
    _check_device(cfg, device)
    assert cfg.password_file is not None and cfg.acl_file is not None
    res = RevokeResult(device)
    issued = _issued(cfg, device)
    if issued is not None and issued.exists():
        if cfg.crl_file is None:
            res.warnings.append(f"{issued} exists but [provision] crl_file is not set: the certificate stays valid")
        else:
            serial = _serial_of(issued)
            _crl_add(cfg, [serial])
            issued.unlink()
            res.changed.append(f"certificate serial {serial:x} revoked in {cfg.crl_file}")
    if device in _password_users(_read(cfg.password_file, "the broker's password file")):
        _set_password(cfg.password_file, device, None)
        res.changed.append(f"password of {device} removed from {cfg.password_file}")
    acl = _Acl.parse(_read(cfg.acl_file, "the broker's ACL file"), cfg.acl_file)
    if acl.blocks.pop(device, None) is not None:
        _write(cfg.acl_file, acl.render(cfg.acl_file), "the broker's ACL file")
        res.changed.append(f"ACL block of {device} removed from {cfg.acl_file}")
    if acl.others(device):
        res.warnings.append(f"{cfg.acl_file} still has a hand-written `user {device}` block; remove it by hand")
    if _fleet_remove(cfg.fleet_file, device):
        res.changed.append(f"[[device]] {device!r} removed from {cfg.fleet_file}")
        if not _fleet_ids(_read(cfg.fleet_file, "fleet file"), cfg.fleet_file):
            res.warnings.append(f"{cfg.fleet_file} has no devices left: the coordinator will not start on it")
    return res


RELOAD = ("reload the broker so that it reads the password and ACL files (and the CRL): "
          "systemctl reload mosquitto (SIGHUP); and the coordinator for the fleet file: "
          "systemctl reload fedmfs-coordinator")
