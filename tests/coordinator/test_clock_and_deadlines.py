"""Deadlines run on the monotonic clock (issue 10, point 4).

Seen: the coordinator's wall clock stepped forward by an hour mid-round (NTP, an operator, a board
without a real-time clock) and the round closed at once below quorum, dropping uploads already
acknowledged ``accepted``. The service's clock now is wall time at start advanced by
``time.monotonic``; a restart reads the deadline back as the time that was left.
"""

from __future__ import annotations

import time

import pytest

from fedmfs.adapters.loopback import LoopbackBus
from fedmfs.coordinator.config import load_coordinator_config
from fedmfs.coordinator.service import CoordinatorService
from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.wire import RoundState
from fedmfs.sim.config import SimConfig
from fedmfs.sim.processes import write_fleet_configs


@pytest.fixture(scope="module")
def fleet():
    f = make_synthetic("small", 0)
    return Fleet(f.spec, [f.clients[0], f.clients[1]], f.metadata)


def _service(fleet, work, round_seconds=600.0):
    files = write_fleet_configs(fleet, SimConfig.build(rounds=2, seed=0), work, "mqtt://127.0.0.1:1", "clock",
                                round_seconds=round_seconds)
    return CoordinatorService(load_coordinator_config(files["coordinator"]), link_factory=LoopbackBus().link)


def test_a_wall_clock_step_of_an_hour_mid_round_changes_nothing(fleet, tmp_path, monkeypatch):
    svc = _service(fleet, tmp_path / "run")
    try:
        svc.start(writer_thread=False)
        m = svc.machine
        assert m.state is RoundState.OPEN and m.round == 0
        deadline = m.deadline
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600.0)    # the clock steps an hour forward
        svc.pump()
        assert m.state is RoundState.OPEN and m.round == 0 and m.deadline == deadline
        assert not [r for r in svc.ledger.rounds() if r.closed_at is not None]
        monkeypatch.setattr(time, "time", lambda: real() - 3600.0)    # and back, past the round's opening
        svc.pump()
        assert m.state is RoundState.OPEN and m.round == 0
    finally:
        svc.close()


def test_a_restart_reads_the_deadline_back_as_the_time_left(fleet, tmp_path, monkeypatch):
    work = tmp_path / "run"
    svc = _service(fleet, work, round_seconds=600.0)
    svc.start(writer_thread=False)
    svc.pump()          # the service's loop records the time left (every 30 s)
    left = svc.machine.deadline - svc.clock()
    svc.close()
    real = time.time
    # the coordinator was down while the clock stepped two hours forward: the round does not close
    # the moment it comes back; it keeps the time it had left (recorded on the monotonic clock)
    monkeypatch.setattr(time, "time", lambda: real() + 7200.0)
    svc = CoordinatorService(load_coordinator_config(work / "coordinator.toml"), link_factory=LoopbackBus().link)
    try:
        svc.start(writer_thread=False)
        m = svc.machine
        assert m.state is RoundState.OPEN and m.round == 0
        assert left - 5.0 <= m.deadline - svc.clock() <= left + 1.0
        svc.pump()
        assert m.state is RoundState.OPEN
    finally:
        svc.close()
