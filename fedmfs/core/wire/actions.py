"""What both round machines ask of their adapters and are told by them: publish a message, time passed."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Publish", "Tick"]


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``payload`` on ``topic``. ``chunk`` marks an upload chunk frame (the edge adapter
    counts them for fault injection)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    chunk: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: check deadlines, advance retries."""

    now: float
