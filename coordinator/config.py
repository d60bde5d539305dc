"""coordinator.toml and the fleet file, parsed once into typed objects; errors name the key and the fix.

Precedence: command line > environment (``FEDMFS_BROKER`` = mqtt://HOST:PORT) > file > defaults.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedmfs.config import check_keys, load_toml
from fedmfs.errors import ConfigError, PayloadError
from fedmfs.modality import DatasetSpec
from fedmfs.mqtt import BrokerConfig, parse_broker_url
from fedmfs.protocol import DEFAULT_CHUNK_BYTES, DeviceConfig, validate_name
from fedmfs.rounds import RoundPolicy

__all__ = ["CoordinatorConfig", "load_coordinator_config", "load_fleet_file", "load_spec", "broker_from_table"]

_TOP = {"fleet": str, "state_dir": str, "spec": str, "fleet_file": str, "signing_key": str, "seed": int,
        "rounds": dict, "broker": dict, "metrics": dict, "log_level": str}
_ROUNDS = {"total": int, "seconds": float, "quorum": int, "chunk_bytes": int}
_BROKER = {"host": str, "port": int, "username": str, "password_file": str, "tls_ca": str, "tls_cert": str,
           "tls_key": str, "protocol": str, "keepalive": int, "url": str}
_METRICS = {"port": int, "host": str}
_DEVICE = {"id": str, "gamma": int, "alpha_s": float, "alpha_c": float, "alpha_r": float, "cap_bytes": int,
           "codec": str, "method": str}


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


def load_spec(path: Path) -> DatasetSpec:
    """A dataset spec from a fleet.json (docs/data.md) or a bare spec JSON."""
    try:
        d = json.loads(Path(path).read_text())
        return DatasetSpec.from_dict(d["spec"] if "spec" in d else d)
    except FileNotFoundError as e:
        raise ConfigError(f"spec file {path} does not exist; point 'spec' at a fleet.json or spec JSON") from e
    except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"spec file {path} is not a dataset spec: {e}") from e


def broker_from_table(t: dict, where: str, base: Path) -> BrokerConfig:
    check_keys(t, _BROKER, where)
    url = os.environ.get("FEDMFS_BROKER") or t.get("url")
    if url:
        from dataclasses import replace
        return replace(parse_broker_url(url), protocol=t.get("protocol", "auto"))
    password = None
    if "password_file" in t:
        try:
            password = _rel(base, t["password_file"]).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{where}: password_file {t['password_file']!r} unreadable: {e}") from e
    return BrokerConfig(host=t.get("host", "127.0.0.1"), port=t.get("port", 1883), username=t.get("username"),
                        password=password,
                        tls_ca=str(_rel(base, t["tls_ca"])) if "tls_ca" in t else None,
                        tls_cert=str(_rel(base, t["tls_cert"])) if "tls_cert" in t else None,
                        tls_key=str(_rel(base, t["tls_key"])) if "tls_key" in t else None,
                        protocol=t.get("protocol", "auto"), keepalive=t.get("keepalive", 30))


def load_fleet_file(path: Path) -> tuple[DeviceConfig, ...]:
    """Devices with their cap, gamma, alphas, codec and method; ``[defaults]`` fills what a device omits."""
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
            out.append(DeviceConfig(device=m["id"], gamma=m.get("gamma", 1), alpha_s=float(m.get("alpha_s", 1 / 3)),
                                    alpha_c=float(m.get("alpha_c", 1 / 3)), alpha_r=float(m.get("alpha_r", 1 / 3)),
                                    cap_bytes=m.get("cap_bytes"), codec=m.get("codec", "fp32"),
                                    method=m.get("method", "fedmfs")))
        except PayloadError as e:
            raise ConfigError(f"{where}: {e}") from e
    if not out:
        raise ConfigError(f"{path}: no devices; add [[device]] tables with id = \"...\"")
    ids = [d.device for d in out]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: duplicate device ids {sorted(i for i in ids if ids.count(i) > 1)}")
    return tuple(out)


def load_coordinator_config(path: str | os.PathLike) -> CoordinatorConfig:
    p = Path(path)
    raw = load_toml(p)
    check_keys(raw, _TOP, str(p))
    base = p.parent
    for key in ("fleet", "state_dir", "spec", "fleet_file", "signing_key"):
        if key not in raw:
            raise ConfigError(f"{p}: missing key {key!r}; see examples/coordinator.toml")
    try:
        validate_name("fleet", raw["fleet"])
    except PayloadError as e:
        raise ConfigError(f"{p}: key 'fleet': {e}") from e
    rounds = raw.get("rounds", {})
    check_keys(rounds, _ROUNDS, f"{p} [rounds]")
    try:
        policy = RoundPolicy(rounds.get("total", 10), float(rounds.get("seconds", 600.0)), rounds.get("quorum", 1),
                             rounds.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
    except ValueError as e:
        raise ConfigError(f"{p} [rounds]: {e}") from e
    metrics = raw.get("metrics", {})
    check_keys(metrics, _METRICS, f"{p} [metrics]")
    fleet_file = _rel(base, raw["fleet_file"])
    return CoordinatorConfig(
        fleet=raw["fleet"], state_dir=_rel(base, raw["state_dir"]), spec=load_spec(_rel(base, raw["spec"])),
        devices=load_fleet_file(fleet_file), fleet_file=fleet_file, signing_key=_rel(base, raw["signing_key"]),
        policy=policy, broker=broker_from_table(raw.get("broker", {}), f"{p} [broker]", base),
        seed=raw.get("seed", 0), metrics_port=metrics.get("port", 0), metrics_host=metrics.get("host", "127.0.0.1"),
        log_level=raw.get("log_level", "INFO"))
