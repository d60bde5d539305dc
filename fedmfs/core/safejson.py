"""JSON from a peer, parsed within bounds: nesting depth and integer length are checked, every
failure is a :class:`fedmfs.core.errors.PayloadError`.

Why: ``json.loads`` raises ``ValueError`` (not ``JSONDecodeError``) on an integer of more than 4300
digits (Python's int max str digits) and ``RecursionError`` on deep nesting; both escaped decoders that
caught only ``JSONDecodeError`` (issue 9). The depth is measured on the bytes before parsing, in O(n)
numpy, so a deeply nested document costs no recursion at all.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fedmfs.core.errors import PayloadError

__all__ = ["MAX_INT_DIGITS", "MAX_JSON_DEPTH", "json_depth", "loads"]

MAX_JSON_DEPTH = 16     # our deepest document (a report, a safetensors header) nests 3 or 4 levels
MAX_INT_DIGITS = 32     # our largest integer (a safetensors data offset) is below 2^64: 20 digits

_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data`` (brackets inside strings ignored).

    Exact for valid JSON; for invalid JSON some number that the parser's own error then supersedes.
    A quote opens or closes a string unless an odd run of backslashes precedes it.
    """
    a = np.frombuffer(data, np.uint8)
    if not a.size:
        return 0
    idx = np.arange(a.size, dtype=np.int64)
    bs = a == _BACKSLASH
    last_other = np.maximum.accumulate(np.where(bs, -1, idx))        # last non-backslash at or before i
    run_before = np.empty(a.size, np.int64)                          # backslashes right before i
    run_before[0] = 0
    run_before[1:] = idx[:-1] - last_other[:-1]
    quote = (a == _QUOTE) & (run_before % 2 == 0)
    inside = (np.cumsum(quote, dtype=np.int64) % 2 == 1) & ~quote    # within a string (its quotes excluded)
    step = (a == _OPEN[0]) | (a == _OPEN[1])
    step = step.astype(np.int8) - ((a == _CLOSE[0]) | (a == _CLOSE[1])).astype(np.int8)
    step[inside] = 0
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise PayloadError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def loads(data: bytes, what: str = "message", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON from a peer: at most ``max_depth`` levels of nesting, integers of at most
    :data:`MAX_INT_DIGITS` digits; anything else raises :class:`PayloadError` naming ``what``."""
    raw = bytes(data)
    opened = raw.count(b"[") + raw.count(b"{")      # a cheap upper bound first
    depth = json_depth(raw) if opened > max_depth else opened
    if depth > max_depth:
        raise PayloadError(f"{what} nests {depth} levels deep (at most {max_depth})")
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_bounded_int)
    except PayloadError as e:
        raise PayloadError(f"{what}: {e}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError
        raise PayloadError(f"{what} is not UTF-8 JSON: {e}") from e
