"""Field validators shared by every decoder of peer input: names, modality names, typed JSON fields.

Each raises :class:`fedmfs.core.errors.PayloadError` with the field's name on anything malformed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from fedmfs.core.errors import PayloadError

__all__ = [
    "HEX64",
    "NAME",
    "finite",
    "float_map",
    "get_field",
    "int_map",
    "modality_list",
    "nonneg_int",
    "validate_modality",
    "validate_name",
]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODALITY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def validate_name(kind: str, value: Any) -> str:
    """Fleet and device ids: 1-64 of [A-Za-z0-9_.-], not starting with a punctuation mark, so they
    are safe as MQTT topic levels (no '/', '+', '#') and as file names."""
    if not isinstance(value, str) or not NAME.match(value):
        raise PayloadError(f"{kind} {value!r} must match {NAME.pattern}")
    return value


def validate_modality(value: Any) -> str:
    if not isinstance(value, str) or not MODALITY.match(value):
        raise PayloadError(f"modality {value!r} must match {MODALITY.pattern}")
    return value



def get_field(d: Mapping, key: str, kind: type | tuple, *, optional: bool = False, default: Any = None) -> Any:
    if key not in d:
        if optional:
            return default
        raise PayloadError(f"message lacks field {key!r}")
    v = d[key]
    if optional and v is None:
        return default
    # bool is an int in Python: refuse it where a number is wanted
    if isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise PayloadError(f"field {key!r} must be {kind}, got a bool")
    if not isinstance(v, kind):
        raise PayloadError(f"field {key!r} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


def nonneg_int(d: Mapping, key: str, *, optional: bool = False, default: Any = None) -> Any:
    v = get_field(d, key, int, optional=optional, default=default)
    if v is not None and not 0 <= v < 2**53:
        raise PayloadError(f"field {key!r} must be a non-negative integer, got {v}")
    return v


def finite(d: Mapping, key: str, *, optional: bool = False, default: Any = None) -> Any:
    v = get_field(d, key, (int, float), optional=optional, default=default)
    if v is not None:
        v = float(v)
        if not math.isfinite(v):
            raise PayloadError(f"field {key!r} must be finite")
    return v


def float_map(d: Mapping, key: str) -> dict[str, float]:
    m = get_field(d, key, dict)
    out = {}
    for k, v in m.items():
        validate_modality(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise PayloadError(f"field {key!r}: value for {k!r} must be a finite number")
        out[k] = float(v)
    return out


def int_map(d: Mapping, key: str) -> dict[str, int]:
    m = get_field(d, key, dict)
    out = {}
    for k, v in m.items():
        validate_modality(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise PayloadError(f"field {key!r}: value for {k!r} must be a non-negative integer")
        out[k] = int(v)
    return out


def modality_list(d: Mapping, key: str) -> tuple[str, ...]:
    lst = get_field(d, key, list)
    return tuple(validate_modality(x) for x in lst)


