"""The synthetic ActionSense-shaped generator: shapes, missing tactile, determinism, ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from fedmfs.core.data import PRESETS, load_fleet, make_synthetic, save_fleet
from fedmfs.core.data.synthetic import SUBJECTS, TACTILE_MISSING
from fedmfs.core.modality import ACTIONSENSE_MODALITIES


@pytest.fixture(scope="module")
def small():
    return make_synthetic("small", 0)


def test_clients_and_missing_tactile(small):
    assert [c.name for c in small.clients] == ["S00", "S02", "S03", "S04", "S05", "S06", "S07", "S08", "S09"]
    for c in small.clients:
        tactile = {"tactile_left", "tactile_right"} & set(c.x)
        if c.name in ("S06", "S07", "S08", "S09"):
            assert tactile == set()
            assert set(c.x) == {"eye", "emg_left", "emg_right", "xsens"}
        else:
            assert set(c.x) == set(small.spec.names)
    assert list(TACTILE_MISSING) == small.metadata["tactile_missing"]
    assert len(SUBJECTS) == 9


def test_shapes_dtype_range_match_spec(small):
    spec = small.spec
    assert spec.names == tuple(m.name for m in ACTIONSENSE_MODALITIES)
    assert spec.num_classes == 20 and spec.steps == PRESETS["small"].steps
    assert all(m.hidden == PRESETS["small"].hidden for m in spec.modalities)
    feats = {m.name: m.features for m in spec.modalities}
    assert feats["eye"] == 2 and feats["emg_left"] == feats["emg_right"] == 8 and feats["xsens"] == 66
    # Tactile stays the largest modality, eye the smallest.
    assert min(feats["tactile_left"], feats["tactile_right"]) > max(feats["xsens"], feats["emg_right"])
    assert min(feats, key=feats.get) == "eye"
    for c in small.clients:
        for name, x in c.x.items():
            assert x.dtype == np.float32
            assert x.shape == (len(c), spec.steps, *spec[name].feature_shape)
            assert -1.0 <= x.min() and x.max() <= 1.0
            assert 0.05 < float(np.abs(x).mean()) < 0.6  # not collapsed to 0, not saturated
    small.validate()


def test_every_class_at_every_client_with_stratified_80_20(small):
    for c in small.clients:
        counts = np.bincount(c.y, minlength=20)
        assert counts.min() >= 3
        train_counts = np.bincount(c.y[c.train], minlength=20)
        assert train_counts.min() >= 2  # every class trains
        assert np.all(np.bincount(c.y[~c.train], minlength=20) >= 1)
        assert 0.75 <= c.n_train / len(c) <= 0.85
    # Per-client label skew: class counts differ between clients.
    per_client = np.stack([np.bincount(c.y, minlength=20) for c in small.clients])
    assert (per_client.std(axis=0) > 0).sum() >= 10


def test_deterministic_and_seed_dependent():
    a, b, c = make_synthetic("small", 3), make_synthetic("small", 3), make_synthetic("small", 4)
    for ca, cb in zip(a.clients, b.clients):
        assert ca.y.tobytes() == cb.y.tobytes() and ca.train.tobytes() == cb.train.tobytes()
        for k in ca.x:
            assert ca.x[k].tobytes() == cb.x[k].tobytes()
    assert a.metadata == b.metadata
    assert a.clients[0].x["xsens"].tobytes() != c.clients[0].x["xsens"].tobytes()


def test_metadata_ground_truth(small):
    md = small.metadata
    assert md["generator"].startswith("fedmfs.synthetic") and md["preset"] == "small" and md["seed"] == 0
    order = md["informativeness_order"]
    assert sorted(order) == sorted(small.spec.names)
    assert order[0] == "xsens" and order[-1] == "emg_left"
    inf = md["informativeness"]
    assert set(inf) == set(small.spec.names)
    # The recorded scores agree with the recorded order, tiers well apart, and emg_left is near chance.
    vals = [inf[m] for m in order]
    assert all(a > b + 0.01 for a, b in zip(vals, vals[1:])), vals
    assert inf["emg_left"] < 0.12
    assert md["score_order"] == order


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'.*small"):
        make_synthetic("huge")


def test_presets_describe_sizes():
    assert set(PRESETS) >= {"small", "actionsense"}
    big = PRESETS["actionsense"].spec()
    assert big.steps == 100 and big["tactile_left"].feature_shape == (32, 32) and big["xsens"].hidden == 64
    assert PRESETS["actionsense"].windows_per_class == 20
    assert PRESETS["small"].steps < big.steps


def test_round_trip_save_load(small, tmp_path):
    save_fleet(small, tmp_path / "fleet")
    back = load_fleet(tmp_path / "fleet")
    assert back.spec == small.spec
    assert back.metadata == small.metadata
    for a, b in zip(small.clients, back.clients):
        assert a.name == b.name and set(a.x) == set(b.x)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.train, b.train)
        for k in a.x:
            np.testing.assert_array_equal(a.x[k], b.x[k])


def _ncc_accuracy(fleet) -> dict[str, float]:
    """Per-client nearest-class-centroid accuracy on time-averaged features, averaged over clients."""
    acc: dict[str, list[float]] = {}
    for c in fleet.clients:
        for m, x in c.x.items():
            f = x.reshape(len(c), x.shape[1], -1).mean(axis=1)
            ytr = c.y[c.train]
            classes = np.unique(ytr)
            cent = np.stack([f[c.train][ytr == k].mean(0) for k in classes])
            d = ((f[~c.train][:, None, :] - cent[None]) ** 2).sum(-1)
            acc.setdefault(m, []).append(float((classes[d.argmin(1)] == c.y[~c.train]).mean()))
    return {m: float(np.mean(v)) for m, v in acc.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_informativeness_is_real_without_torch(seed):
    fleet = make_synthetic("small", seed)
    acc = _ncc_accuracy(fleet)
    order = fleet.metadata["informativeness_order"]
    rho = spearmanr([acc[m] for m in order], np.arange(len(order))[::-1]).statistic
    assert rho >= 0.8, (rho, acc)
    # xsens alone identifies its 8-class block (40% of the classes) and guesses among the rest
    assert acc[order[0]] > 0.35
    assert acc["emg_left"] < 0.15  # the near-useless one is near the 5% chance rate
