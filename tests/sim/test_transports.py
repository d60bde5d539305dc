"""One round driver, two transports: the same fleet over the in-memory loopback and over a real
Mosquitto gives the same global models, whatever the aggregation rule or selection method; the
selection policy (codec included) the coordinator sends is what the devices apply.

Issue 7 found `--aggregation median` over MQTT aggregating with the weighted mean, and the codec of a
device's config never read on the device: these tests failed then.
"""

import logging

import numpy as np
import pytest

from fedmfs.coordinator.ledger import Ledger
from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.payload import Codec, decode_model
from fedmfs.core.settings import TrainConfig
from fedmfs.core.wire.signing import decode_global
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_simulation

TRAIN = TrainConfig(min_steps=0, epochs=1, fusion_steps=20, shapley_samples=10)


@pytest.fixture(scope="module")
def fleet():
    f = make_synthetic("small", 0)
    return Fleet(f.spec, [f.clients[0], f.clients[1], f.clients[6]], f.metadata)


@pytest.fixture(autouse=True)
def _quiet(caplog):
    caplog.set_level(logging.WARNING)


def _globals(coordinator_dir) -> dict:
    """The final global model of every modality, decoded from the coordinator's ledger and files."""
    led = Ledger(coordinator_dir, readonly=True)
    try:
        out = {}
        for row in led.latest_globals():
            _, payload = decode_global(led.global_frame(row), None)
            out[row["modality"]] = decode_model(payload)[1]
        return out
    finally:
        led.close()


@pytest.mark.integration
@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
@pytest.mark.parametrize("method", ["fedmfs", "all", "random"])
def test_inproc_and_mosquitto_give_the_same_globals(fleet, mosquitto, tmp_path, method, rule):
    """Per device (``--per-device``: each device trains alone, as each MQTT process does) the two
    transports give the same globals bit for bit. Pooled (the default in process: every device's round
    in the same batched steps, issue 16) the same uploads and the same globals to float tolerance."""
    cfg = SimConfig.build(method, rounds=2, gamma=2, seed=5, aggregation=rule, train=TRAIN)
    a = run_simulation(fleet, cfg, "inproc", workdir=tmp_path / "inproc", pooled=False)
    b = run_simulation(fleet, cfg, "mqtt", mosquitto.url, workdir=tmp_path / "mqtt")
    assert (a["transport"], b["transport"]) == ("inproc", "mqtt")
    assert a["config"]["aggregation"] == b["config"]["aggregation"] == rule
    assert a["global_digests"] == b["global_digests"]
    for x, y in zip(a["rounds"], b["rounds"], strict=True):
        assert x["uploads"] == y["uploads"] and x["aggregated"] == y["aggregated"]
        assert x["client_accuracy"] == pytest.approx(y["client_accuracy"])
        assert x["clients"] == y["clients"]
    p = run_simulation(fleet, cfg, "inproc", workdir=tmp_path / "pooled")
    for x, y in zip(p["rounds"], b["rounds"], strict=True):
        assert [(u["device"], u["modality"]) for u in x["uploads"]] == [(u["device"], u["modality"]) for u in y["uploads"]]
        assert x["aggregated"] == y["aggregated"]
    pg, bg = _globals(tmp_path / "pooled" / "coordinator"), _globals(tmp_path / "mqtt" / "coordinator")
    assert pg.keys() == bg.keys()
    for m in pg:
        for k in pg[m]:
            np.testing.assert_allclose(pg[m][k], bg[m][k], atol=1e-5, rtol=0)
    if method == "all":   # several uploads per modality: the rule decides the global
        w = run_simulation(fleet, SimConfig.build(method, rounds=2, gamma=2, seed=5, train=TRAIN), "inproc",
                           pooled=False)
        assert w["global_digests"] != a["global_digests"]


def test_the_codec_the_coordinator_sends_is_what_devices_upload(fleet, tmp_path):
    """The fleet file's codec reaches the devices in their config; nothing on the device overrides it."""
    runs = {}
    for codec in ("fp32", "fp16"):
        cfg = SimConfig.build("all", rounds=1, seed=0, codec=codec, train=TRAIN)
        runs[codec] = run_simulation(fleet, cfg, "inproc", workdir=tmp_path / codec)
        led = Ledger(tmp_path / codec / "coordinator", readonly=True)
        try:
            rows = led.uploads()
            assert rows and {decode_model(led.upload_payload(u))[0].codec for u in rows} == {Codec(codec)}
        finally:
            led.close()
    ratio = runs["fp16"]["total_upload_bytes"] / runs["fp32"]["total_upload_bytes"]
    assert 0.45 < ratio < 0.6, ratio
    assert runs["fp16"]["config"]["codec"] == "fp16"
