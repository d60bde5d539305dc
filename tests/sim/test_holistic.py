"""The holistic FedAvg baseline: it averages what the server received (decoded, at the codec's
precision), respects the byte cap, and averages each modality's encoder only over the clients that
have the modality. Issue 8 found all three wrong: these tests failed then."""

import numpy as np
import pytest

import fedmfs.sim.holistic as holistic
from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.config import SimConfig
from fedmfs.sim.holistic import aggregate_holistic, run_holistic

TRAIN = TrainConfig(min_steps=0, epochs=1)


@pytest.fixture(scope="module")
def fleet():
    f = make_synthetic("small", 0)
    return Fleet(f.spec, [f.clients[0], f.clients[6]], f.metadata)   # S07 has no tactile modalities


def test_each_encoder_is_averaged_over_the_clients_that_have_its_modality():
    prev = {"encoders.a.w": np.zeros(2, np.float32), "encoders.b.w": np.full(2, 7.0, np.float32),
            "encoders.c.w": np.full(2, 9.0, np.float32), "head.w": np.zeros(3, np.float32)}
    one = {"encoders.a.w": np.full(2, 1.0), "encoders.b.w": np.full(2, 1.0), "encoders.c.w": np.full(2, 1.0),
           "head.w": np.full(3, 1.0)}
    two = {"encoders.a.w": np.full(2, 3.0), "encoders.b.w": np.full(2, 100.0), "encoders.c.w": np.full(2, 100.0),
           "head.w": np.full(3, 3.0)}
    out, n = aggregate_holistic(prev, [(one, 10.0, ("a", "b")), (two, 30.0, ("a",))])
    assert n == 2
    np.testing.assert_allclose(out["encoders.a.w"], 2.5)    # (10*1 + 30*3) / 40
    np.testing.assert_allclose(out["encoders.b.w"], 1.0)    # only the client that has b
    np.testing.assert_allclose(out["encoders.c.w"], 9.0)    # nobody has c: the previous global stays
    np.testing.assert_allclose(out["head.w"], 2.5)


def test_uploads_are_averaged_as_received_at_the_codecs_precision(fleet, monkeypatch):
    seen = []
    real = holistic.aggregate_holistic

    def spy(previous, uploads):
        seen.extend(uploads)
        return real(previous, uploads)

    monkeypatch.setattr(holistic, "aggregate_holistic", spy)
    rep = run_holistic(fleet, SimConfig.build("holistic", rounds=1, codec="fp16", train=TRAIN))
    assert len(seen) == 2
    for state, _, _ in seen:
        for v in state.values():
            np.testing.assert_array_equal(v, v.astype(np.float16).astype(np.float32))   # on the fp16 grid
    fp32 = run_holistic(fleet, SimConfig.build("holistic", rounds=1, train=TRAIN))
    assert 0.45 < rep["total_upload_bytes"] / fp32["total_upload_bytes"] < 0.6


def test_the_byte_cap_holds_for_the_whole_model(fleet):
    full = run_holistic(fleet, SimConfig.build("holistic", rounds=1, train=TRAIN))
    size = full["rounds"][0]["uploads"][0]["bytes"]
    capped = run_holistic(fleet, SimConfig.build("holistic", rounds=1, cap_bytes=size - 1, train=TRAIN))
    assert capped["total_upload_bytes"] == 0 and capped["rounds"][0]["uploads"] == []
    assert capped["rounds"][0]["aggregated"] == {}
