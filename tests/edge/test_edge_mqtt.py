"""End to end over real Mosquitto: coordinator + edge daemon processes == the in-process engine."""

import json
import os
import subprocess
import sys
import time

import pytest

from fedmfs.coordinator.ledger import Ledger
from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.records import RoundRecord
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_simulation
from fedmfs.sim.processes import (
    _spawn,
    build_report,
    run_mqtt_simulation,
    write_fleet_configs,
)

pytestmark = pytest.mark.integration

TRAIN = TrainConfig(min_steps=0, epochs=1, fusion_steps=20, shapley_samples=10)


@pytest.fixture(scope="module")
def fleet():
    f = make_synthetic("small", 0)
    # three devices; S07 lacks both tactile modalities
    return Fleet(f.spec, [f.clients[0], f.clients[1], f.clients[6]], f.metadata)


def _check_same(ref, rep):
    assert rep["global_digests"] == ref["global_digests"]
    for a, b in zip(ref["rounds"], rep["rounds"], strict=True):
        assert b["uploads"] == a["uploads"]
        assert b["aggregated"] == a["aggregated"] and b["upload_bytes"] == a["upload_bytes"]
        assert b["client_accuracy"] == pytest.approx(a["client_accuracy"])


def test_simulation_over_mosquitto_equals_inproc_and_caps_hold(fleet, mosquitto, tmp_path):
    cfg = SimConfig.build(rounds=3, gamma=2, seed=1, cap_bytes=60000, train=TRAIN)
    ref = run_simulation(fleet, cfg, pooled=False)    # per device, as each daemon process trains
    rep = run_mqtt_simulation(fleet, cfg, mosquitto.url, workdir=tmp_path / "run", timeout=240)
    _check_same(ref, rep)
    assert rep["transport"] == "mqtt" and len(rep["rounds"]) == 3
    for r in rep["rounds"]:
        per_dev = {}
        for u in r["uploads"]:
            per_dev[u["device"]] = per_dev.get(u["device"], 0) + u["bytes"]
        assert max(per_dev.values()) <= 60000
        # the ledger's bytes == the payload bytes the devices chose and had accepted
        sent = sum(c["sizes"][m] for c in r["clients"].values() for m in c["chosen"])
        assert r["upload_bytes"] == sent > 0
        assert all(c["accepted"] == c["chosen"] for c in r["clients"].values())
    # the report's round records are the ones the coordinator received and keeps in its ledger
    led = Ledger(tmp_path / "run" / "coordinator", readonly=True)
    try:
        kept = {(x.round, x.device): x.record for x in led.reports()}
    finally:
        led.close()
    assert len(kept) == 3 * len(fleet.clients)
    for r in rep["rounds"]:
        for dev, c in r["clients"].items():
            assert c["shapley"] == dict(kept[(r["round"], dev)].shapley) and c["shapley"]
            assert RoundRecord.from_dict(c) == kept[(r["round"], dev)]
    assert 1.0 < rep["wire_over_payload"] <= 1.05
    # the personalised model runs without torch
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, numpy as np; from fedmfs.edge.cli import main; "
         "r = main(['predict', '--model', sys.argv[1], '--input', sys.argv[2], '--json']); "
         "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(r)",
         str(tmp_path / "run" / "edge" / "S07" / "model"), str(tmp_path / "run" / "data" / "S07.npz")],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pred = json.loads(out.stdout)["predictions"]
    assert len(pred) == len(fleet.clients[2].y)
    # Stage #2 after the last round wrote the one-graph personalised model (predict's fast path)
    man = json.loads((tmp_path / "run" / "edge" / "S07" / "model" / "manifest.json").read_text())
    assert man["personalised"]["version"] == 2 and man["fusion"]["version"] == 2
    assert (tmp_path / "run" / "edge" / "S07" / "model" / man["personalised"]["file"]).stat().st_size > 0


def _wait(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out: {what}")


def test_restarts_mid_round_and_mid_upload_lose_and_double_count_nothing(fleet, mosquitto, tmp_path):
    cfg = SimConfig.build(rounds=2, gamma=2, seed=2, train=TRAIN)
    ref = run_simulation(fleet, cfg, pooled=False)    # per device, as each daemon process trains
    work = tmp_path / "run"
    (work / "logs").mkdir(parents=True)
    files = write_fleet_configs(fleet, cfg, work, mosquitto.url, "restart", round_seconds=120, chunk_bytes=2048)
    coord_args = ["fedmfs.coordinator.cli", "run", "--config", str(files["coordinator"]), "--exit-when-done",
                  "--connect-timeout", "30"]
    edge_args = lambda n: ["fedmfs.edge.cli", "run", "--config", str(files["edges"][n]), "--exit-when-done",
                           "--connect-timeout", "30"]
    procs = {}
    try:
        procs["coordinator"] = _spawn(coord_args, work / "logs" / "coordinator.log")
        os.environ["FEDMFS_FAULT_EXIT_AFTER_FRAMES"] = "5"     # S07 dies after 5 of its chunks
        try:
            procs["S07"] = _spawn(edge_args("S07"), work / "logs" / "edge-S07.log")
        finally:
            del os.environ["FEDMFS_FAULT_EXIT_AFTER_FRAMES"]
        for n in ("S00", "S02"):
            procs[n] = _spawn(edge_args(n), work / "logs" / f"edge-{n}.log")
        assert procs["S07"].wait(120) == 17
        procs["S07"] = _spawn(edge_args("S07"), work / "logs" / "edge-S07.log")
        # kill -9 the coordinator once it has accepted something in round 0, then start it again
        def accepted():
            try:
                led = Ledger(work / "coordinator", readonly=True)
                try:
                    return len(led.uploads(0)) >= 1
                finally:
                    led.close()
            except Exception:
                return False
        _wait(accepted, 120, "a first accepted upload")
        procs["coordinator"].kill()
        procs["coordinator"].wait(10)
        procs["coordinator"] = _spawn(coord_args, work / "logs" / "coordinator.log")
        for n, p in procs.items():
            assert p.wait(240) == 0, f"{n} failed; see {work / 'logs'}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
    rep = build_report(fleet, cfg, work / "coordinator", "mqtt")
    _check_same(ref, rep)
    led = Ledger(work / "coordinator", readonly=True)
    try:
        rows = led.uploads()
        keys = [(u["round"], u["device"], u["modality"]) for u in rows]
        assert len(keys) == len(set(keys)) == sum(len(r["uploads"]) for r in ref["rounds"])
    finally:
        led.close()
    log = (work / "logs" / "edge-S07.log").read_text()
    assert "fault injection" in log
