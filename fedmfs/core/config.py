"""TOML configs, parsed once into typed objects: unknown keys and wrong types refused by name, with the fix."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedmfs.core.errors import ConfigError
from fedmfs.core.settings import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["check_keys", "load_toml", "train_config_from"]


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config file {p} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e


def check_keys(table: dict, allowed: dict[str, type], where: str) -> None:
    for k, v in table.items():
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {k!r}; allowed keys: {', '.join(sorted(allowed))}")
        t = allowed[k]
        ok = isinstance(v, t) and not (t is int and isinstance(v, bool))
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{where}: key {k!r} must be a {t.__name__}, got {type(v).__name__} {v!r}; "
                              f"fix it as e.g. {k} = {t(1) if t is not str else chr(34) + 'value' + chr(34)}")


def train_config_from(table: dict, where: str = "[train]") -> TrainConfig:
    if "codec" in table:
        raise ConfigError(f"{where}: 'codec' is part of the selection policy the coordinator sends; set it in "
                          "the fleet file ([defaults] codec = \"fp16\") or with `fedmfs simulate --codec`")
    allowed = {f.name: (type(f.default) if f.default is not None else str) for f in fields(TrainConfig)}
    check_keys(table, allowed, where)
    return TrainConfig(**table)
