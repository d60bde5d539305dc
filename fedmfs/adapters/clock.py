"""The services' clock: wall time at start, advanced by ``time.monotonic``.

Round deadlines, ack timeouts and retry delays run on it, so a wall clock stepped by NTP, an operator
or a board without a real-time clock (stepped at boot once the network is up) changes none of them:
a step of an hour mid-round moves no deadline. Timestamps it returns still read as unix seconds
(the ledger's and the announcements' deadlines), close to the wall clock at start.
"""

from __future__ import annotations

import time

__all__ = ["MonotonicClock"]


class MonotonicClock:
    """Callable: unix-like seconds that never jump (anchored at construction, or at ``wall``)."""

    def __init__(self, wall: float | None = None):
        self._wall0 = time.time() if wall is None else wall
        self._mono0 = time.monotonic()

    def __call__(self) -> float:
        return self._wall0 + (time.monotonic() - self._mono0)
