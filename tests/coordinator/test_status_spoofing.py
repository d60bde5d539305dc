"""Status messages through the real service and ledger: only fleet devices speaking for themselves
are recorded (issue 9, point 5: unknown ids published on device/<id>/status showed up online in
`fedmfs-coordinator status`, because the service read the raw bytes before the machine checked them)."""

from __future__ import annotations

import time

from fedmfs.adapters.loopback import LoopbackBus
from fedmfs.coordinator.config import load_coordinator_config
from fedmfs.coordinator.machine import StatusArrived
from fedmfs.coordinator.service import CoordinatorService
from fedmfs.core.data import make_synthetic
from fedmfs.core.wire import DeviceState, DeviceStatus, encode_message
from fedmfs.sim.config import SimConfig
from fedmfs.sim.processes import write_fleet_configs


def _service(tmp_path):
    f = make_synthetic("small", 0)
    fleet = type(f)(f.spec, f.clients[:2], f.metadata)
    files = write_fleet_configs(fleet, SimConfig(rounds=1), tmp_path, "mqtt://127.0.0.1:1", "lab")
    return CoordinatorService(load_coordinator_config(files["coordinator"]), link_factory=LoopbackBus().link), fleet


def test_only_fleet_devices_speaking_for_themselves_are_recorded_online(tmp_path):
    svc, fleet = _service(tmp_path)
    real = fleet.clients[0].name
    now = time.time()
    svc.handle_batch([
        # an id outside the fleet, well-formed
        StatusArrived("ghost", encode_message(DeviceStatus("ghost", DeviceState.ONLINE)), now),
        # garbage that merely contains the text "online"
        StatusArrived("ghost2", b'{"online"', now),
        # a fleet device's topic, but the message names another device
        StatusArrived(real, encode_message(DeviceStatus("ghost", DeviceState.ONLINE)), now),
    ])
    rows = {d["device"]: d["online"] for d in svc.ledger.devices()}
    assert set(rows) == {c.name for c in fleet.clients}          # no ghost rows
    assert not any(rows.values())
    svc.handle_batch([StatusArrived(real, encode_message(DeviceStatus(real, DeviceState.ONLINE)), now)])
    assert {d["device"]: d["online"] for d in svc.ledger.devices()}[real] is True
    svc.ledger.close()
