"""Fixtures of the fault-injection tests: a restartable Mosquitto (without or with persistence), a run
of the real coordinator and edge daemons behind per-device fault proxies, and the fault-free
in-process reference run of the same fleet and seed (computed once per session)."""

from __future__ import annotations

import pytest
from faults.harness import CFG, FleetRun, Mosquitto, small_fleet

from fedmfs.sim.driver import run_simulation

_REFERENCES: dict = {}


@pytest.fixture(scope="session")
def reference():
    """``reference(indices)``: the in-process report of :data:`CFG` on those clients (cached)."""
    def get(indices=(0, 1, 6)):
        key = tuple(indices)
        if key not in _REFERENCES:
            # per device, as each daemon process trains: the pooled in-process run equals it only to 1e-5
            _REFERENCES[key] = run_simulation(small_fleet(key), CFG, pooled=False)
        return _REFERENCES[key]
    return get


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto without persistence (restarting it loses retained messages and sessions)."""
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.close()


@pytest.fixture
def persistent_broker(tmp_path):
    """A Mosquitto with persistence (DB saved on SIGTERM and every 2 s)."""
    b = Mosquitto(tmp_path / "broker", persistence=True, autosave_interval=2).start()
    yield b
    b.close()


@pytest.fixture
def make_run(tmp_path):
    """``make_run(broker, indices=..., **FleetRun options)``: a FleetRun, cleaned up after the test."""
    runs: list[FleetRun] = []

    def make(broker, indices=(0, 1, 6), **kw) -> FleetRun:
        r = FleetRun(tmp_path / f"run{len(runs)}", small_fleet(indices), CFG, broker, **kw)
        runs.append(r)
        return r

    yield make
    for r in runs:
        r.close()
