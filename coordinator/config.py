"""coordinator.toml and the fleet file, parsed once into typed objects; errors name the key and the fix.

Precedence: command line > environment (``FEDMFS_BROKER`` = mqtt://HOST:PORT) > file > defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedmfs.adapters.mqtt import BROKER_KEYS, BrokerConfig, broker_from_table
from fedmfs.core.config import check_keys, load_toml
from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.modality import DatasetSpec, load_spec
from fedmfs.core.selection import POLICY_KEYS, SelectionPolicy
from fedmfs.core.wire import DEFAULT_MAX_SAMPLES, DeviceConfig, validate_name

from .machine import RoundPolicy

__all__ = ["CoordinatorConfig", "ProvisionConfig", "load_coordinator_config", "load_fleet_file",
           "load_provision_config"]

_TOP = {"fleet": str, "state_dir": str, "spec": str, "fleet_file": str, "signing_key": str, "seed": int,
        "rounds": dict, "broker": dict, "metrics": dict, "log_level": str, "provision": dict}
_ROUNDS = {"total": int, "seconds": float, "quorum": int, "chunk_bytes": int, "aggregation": str,
           "max_update_ratio": float, "min_update_rms": float, "fetch_budget": float}
_METRICS = {"port": int, "host": str}
_PROVISION = {"password_file": str, "acl_file": str, "host": str, "port": int, "tls_ca": str, "ca_cert": str,
              "ca_key": str, "crl_file": str, "issued_dir": str, "cert_days": int}
_DEVICE = {"id": str, **POLICY_KEYS, "max_samples": int}


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    fleet: str
    state_dir: Path
    spec: DatasetSpec
    devices: tuple[DeviceConfig, ...]
    fleet_file: Path
    signing_key: Path
    policy: RoundPolicy
    broker: BrokerConfig
    seed: int = 0
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"


def _rel(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q)


@dataclass(frozen=True, slots=True)
class ProvisionConfig:
    """What ``fedmfs-coordinator enrol`` / ``revoke`` need: coordinator.toml's fleet, fleet file, signing
    key and coordinator broker user, and its ``[provision]`` table (the broker's password and ACL
    files, what devices connect to, the fleet CA). Read without the spec or the fleet's devices, so
    the first device can be enrolled before either exists."""

    config: Path
    fleet: str
    fleet_file: Path
    signing_key: Path
    coordinator_user: str | None     # [broker] username: no device may take it
    password_file: Path | None       # the broker's password_file (mosquitto.conf)
    acl_file: Path | None            # the broker's acl_file; enrol manages a section between markers
    host: str                        # what devices connect to ([broker] host unless set)
    port: int
    tls_ca: Path | None              # the CA devices verify the broker with ([broker] tls_ca unless set)
    ca_cert: Path | None = None      # the fleet CA that signs client certificates (--cert); tls_ca unless set
    ca_key: Path | None = None
    crl_file: Path | None = None     # the broker's crlfile: revoke adds a revoked device's certificate
    issued_dir: Path | None = None   # a copy of each issued certificate (revoke finds its serial there)
    cert_days: int = 365


def _provision_from(raw: dict, p: Path) -> ProvisionConfig:
    base = p.parent
    t = raw.get("provision", {})
    check_keys(t, _PROVISION, f"{p} [provision]")
    broker = raw.get("broker", {})
    check_keys(broker, BROKER_KEYS, f"{p} [broker]")
    if "cert_days" in t and not 0 < t["cert_days"] <= 3650:
        raise ConfigError(f"{p} [provision]: cert_days must be in 1..3650, got {t['cert_days']}")
    port = t.get("port", broker.get("port", 8883))
    if not 0 < port < 65536:
        raise ConfigError(f"{p} [provision]: port must be in 1..65535, got {port}")

    def opt(key: str, fallback: Path | None = None) -> Path | None:
        return _rel(base, t[key]) if key in t else fallback

    tls_ca = opt("tls_ca", _rel(base, broker["tls_ca"]) if "tls_ca" in broker else None)
    ca_key = opt("ca_key")
    return ProvisionConfig(
        config=p, fleet=raw["fleet"], fleet_file=_rel(base, raw["fleet_file"]),
        signing_key=_rel(base, raw["signing_key"]), coordinator_user=broker.get("username"),
        password_file=opt("password_file"), acl_file=opt("acl_file"),
        host=t.get("host", broker.get("host", "127.0.0.1")), port=port, tls_ca=tls_ca,
        ca_cert=opt("ca_cert", tls_ca), ca_key=ca_key, crl_file=opt("crl_file"),
        issued_dir=opt("issued_dir", ca_key.parent / "issued" if ca_key is not None else None),
        cert_days=t.get("cert_days", 365))


def _read_top(p: Path, required: tuple[str, ...]) -> dict:
    """coordinator.toml's top-level table: known keys only, ``required`` present, a valid fleet name."""
    raw = load_toml(p)
    check_keys(raw, _TOP, str(p))
    for key in required:
        if key not in raw:
            raise ConfigError(f"{p}: missing key {key!r}; see examples/coordinator.toml")
    try:
        validate_name("fleet", raw["fleet"])
    except PayloadError as e:
        raise ConfigError(f"{p}: key 'fleet': {e}") from e
    return raw


def load_provision_config(path: str | os.PathLike) -> ProvisionConfig:
    """coordinator.toml's provisioning settings (see :class:`ProvisionConfig`)."""
    p = Path(path)
    return _provision_from(_read_top(p, ("fleet", "fleet_file", "signing_key")), p)


def load_fleet_file(path: Path) -> tuple[DeviceConfig, ...]:
    """Devices with their selection policy (method, gamma, alphas, cap, codec) and ``max_samples`` (the
    largest aggregation weight taken from the device); ``[defaults]`` fills what a device omits,
    :class:`~fedmfs.core.selection.SelectionPolicy` and :data:`~fedmfs.core.wire.DEFAULT_MAX_SAMPLES`
    what both omit."""
    raw = load_toml(path)
    check_keys(raw, {"defaults": dict, "device": list}, str(path))
    defaults = raw.get("defaults", {})
    check_keys(defaults, {k: v for k, v in _DEVICE.items() if k != "id"}, f"{path} [defaults]")
    out = []
    for i, d in enumerate(raw.get("device", [])):
        where = f"{path} [[device]] #{i + 1}"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be a table with id = \"...\"")
        check_keys(d, _DEVICE, where)
        if "id" not in d:
            raise ConfigError(f"{where}: missing key 'id'; add id = \"device-name\"")
        m = {**defaults, **d}
        try:
            out.append(DeviceConfig(m["id"], SelectionPolicy.from_dict(m),
                                    m.get("max_samples", DEFAULT_MAX_SAMPLES)))
        except (PayloadError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e
    if not out:
        raise ConfigError(f"{path}: no devices; add [[device]] tables with id = \"...\"")
    ids = [d.device for d in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: duplicate device ids {sorted(i for i in ids if ids.count(i) > 1)}")
    return tuple(out)


def load_coordinator_config(path: str | os.PathLike) -> CoordinatorConfig:
    p = Path(path)
    raw = _read_top(p, ("fleet", "state_dir", "spec", "fleet_file", "signing_key"))
    base = p.parent
    rounds = raw.get("rounds", {})
    check_keys(rounds, _ROUNDS, f"{p} [rounds]")
    try:
        # what the file omits takes RoundPolicy's defaults (declared there, once)
        names = {"total": "rounds_total", "seconds": "round_seconds", "quorum": "quorum",
                 "chunk_bytes": "chunk_bytes", "aggregation": "aggregation",
                 "max_update_ratio": "max_update_ratio", "min_update_rms": "min_update_rms",
                 "fetch_budget": "fetch_budget"}
        floats = ("seconds", "max_update_ratio", "min_update_rms", "fetch_budget")
        policy = RoundPolicy(**{names[k]: (float(v) if k in floats else v) for k, v in rounds.items()})
    except ValueError as e:
        raise ConfigError(f"{p} [rounds]: {e}") from e
    metrics = raw.get("metrics", {})
    check_keys(metrics, _METRICS, f"{p} [metrics]")
    _provision_from(raw, p)      # the service does not use it; a typo there is still an error
    fleet_file = _rel(base, raw["fleet_file"])
    return CoordinatorConfig(
        fleet=raw["fleet"], state_dir=_rel(base, raw["state_dir"]), spec=load_spec(_rel(base, raw["spec"])),
        devices=load_fleet_file(fleet_file), fleet_file=fleet_file, signing_key=_rel(base, raw["signing_key"]),
        policy=policy, broker=broker_from_table(raw.get("broker", {}), f"{p} [broker]", base),
        seed=raw.get("seed", 0), metrics_port=metrics.get("port", 0), metrics_host=metrics.get("host", "127.0.0.1"),
        log_level=raw.get("log_level", "INFO"))
