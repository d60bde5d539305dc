"""Derived seeds: every random stream of a run is seeded from the run seed and integers naming it."""

from __future__ import annotations

import numpy as np

__all__ = ["seed_for"]


def seed_for(*parts: int) -> int:
    """A 32-bit seed derived from integers (stable across runs and processes)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])
