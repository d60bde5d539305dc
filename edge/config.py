"""edge.toml, parsed once into a typed object; errors name the key and the fix.

Precedence: command line > environment (``FEDMFS_BROKER``) > file > defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fedmfs.adapters.mqtt import BrokerConfig, broker_from_table
from fedmfs.core.config import check_keys, load_toml, train_config_from
from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.settings import TrainConfig
from fedmfs.core.wire import validate_name

__all__ = ["EdgeConfig", "load_edge_config"]

_TOP = {"device": str, "fleet": str, "data": str, "spec": str, "state_dir": str, "spool": str,
        "coordinator_key": str, "coordinator_key_file": str, "seed": int, "index": int, "ack_timeout": float,
        "max_attempts": int, "job_timeout": float, "train": dict, "broker": dict, "log_level": str}


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    device: str
    fleet: str
    data: Path                 # the client's .npz (docs/data.md)
    spec: Path                 # fleet.json or spec JSON
    state_dir: Path
    coordinator_key: str       # hex Ed25519 public key that signs global models
    broker: BrokerConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    spool: Path | None = None
    seed: int = 0
    index: int = 0
    ack_timeout: float = 10.0
    max_attempts: int = 30
    job_timeout: float = 3600.0   # seconds a training or Stage #2 job may run before the watchdog stops
    log_level: str = "INFO"


def load_edge_config(path: str | os.PathLike) -> EdgeConfig:
    p = Path(path)
    raw = load_toml(p)
    check_keys(raw, _TOP, str(p))
    base = p.parent
    rel = lambda s: (Path(s).expanduser() if Path(s).expanduser().is_absolute() else base / s)
    for key in ("device", "fleet", "data", "spec", "state_dir"):
        if key not in raw:
            raise ConfigError(f"{p}: missing key {key!r}; see examples/edge.toml")
    try:
        validate_name("device", raw["device"])
        validate_name("fleet", raw["fleet"])
    except PayloadError as e:
        raise ConfigError(f"{p}: {e}") from e
    if "coordinator_key" in raw:
        key = raw["coordinator_key"]
    elif "coordinator_key_file" in raw:
        try:
            key = rel(raw["coordinator_key_file"]).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{p}: coordinator_key_file unreadable: {e}") from e
    else:
        raise ConfigError(f"{p}: missing key 'coordinator_key' (the hex public key printed by "
                          "`fedmfs-coordinator keygen`) or 'coordinator_key_file'")
    if len(key) != 64 or any(ch not in "0123456789abcdef" for ch in key):
        raise ConfigError(f"{p}: coordinator_key must be 64 lower-case hex digits, got {key[:16]!r}...")
    if "ack_timeout" in raw and not raw["ack_timeout"] > 0:
        raise ConfigError(f"{p}: ack_timeout must be > 0 (seconds to wait for the coordinator's answer)")
    if "max_attempts" in raw and raw["max_attempts"] < 1:
        raise ConfigError(f"{p}: max_attempts must be >= 1")
    if "job_timeout" in raw and not raw["job_timeout"] > 0:
        raise ConfigError(f"{p}: job_timeout must be > 0 (seconds a local round may take)")
    # what the file omits takes EdgeConfig's defaults (declared there, once)
    optional = {k: raw[k] for k in ("seed", "index", "max_attempts", "log_level") if k in raw}
    optional.update({k: float(raw[k]) for k in ("ack_timeout", "job_timeout") if k in raw})
    return EdgeConfig(
        device=raw["device"], fleet=raw["fleet"], data=rel(raw["data"]), spec=rel(raw["spec"]),
        state_dir=rel(raw["state_dir"]), coordinator_key=key,
        broker=broker_from_table(raw.get("broker", {}), f"{p} [broker]", base),
        train=train_config_from(raw.get("train", {}), f"{p} [train]"),
        spool=rel(raw["spool"]) if "spool" in raw else None, **optional)
