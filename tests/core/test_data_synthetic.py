"""The synthetic ActionSense-shaped generator: shapes, missing tactile, determinism, ground truth."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from fedmfs.core.data import PRESETS, load_fleet, make_synthetic, save_fleet
from fedmfs.core.data.synthetic import FAMILIES, SUBJECTS, TACTILE_MISSING
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


# --- the headroom preset: overlapping modalities, noise modalities, a per-client Shapley ground truth ---

NOISE_WIDTHS = {"noise3": 3, "noise16": 16, "noise64": 64, "noise256": 256}


@pytest.fixture(scope="module")
def headroom():
    return make_synthetic("headroom", 0)


def _encoded(fleet) -> dict[str, set[int]]:
    return {m: set(v) for m, v in fleet.metadata["encoded_classes"].items()}


def test_headroom_deterministic_and_seed_dependent(headroom):
    again, other = make_synthetic("headroom", 0), make_synthetic("headroom", 1)
    for ca, cb in zip(headroom.clients, again.clients):
        assert ca.y.tobytes() == cb.y.tobytes() and ca.train.tobytes() == cb.train.tobytes()
        assert set(ca.x) == set(cb.x)
        for k in ca.x:
            assert ca.x[k].tobytes() == cb.x[k].tobytes()
    assert headroom.metadata == again.metadata
    assert headroom.clients[0].x["eye"].tobytes() != other.clients[0].x["eye"].tobytes()
    assert headroom.metadata["encoded_classes"] != other.metadata["encoded_classes"]
    # JSON-ready (fleet.json): floats, lists and dicts only
    assert json.loads(json.dumps(headroom.metadata)) == headroom.metadata


def test_headroom_spec_and_shapes(headroom):
    p = PRESETS["headroom"]
    assert headroom.spec == p.spec()
    assert headroom.metadata["preset"] == "headroom"
    for c in headroom.clients:
        assert len(c) >= 20 * 3
        assert np.bincount(c.y[c.train], minlength=20).min() >= 2
        for name, x in c.x.items():
            assert x.dtype == np.float32 and x.shape == (len(c), p.steps, *headroom.spec[name].feature_shape)
            assert -1.0 <= x.min() and x.max() <= 1.0
        has_tactile = {"tactile_left", "tactile_right"} <= set(c.x)
        assert has_tactile == (c.name not in TACTILE_MISSING)
        assert len(c.x) == (10 if has_tactile else 8)


@pytest.mark.parametrize("seed", [0, 1])
def test_headroom_cover_overlaps_and_resolves_every_class_everywhere(seed):
    enc = _encoded(make_synthetic("headroom", seed))
    informative = [m for m in enc if enc[m]]
    assert sorted(informative) == sorted(m.name for m in ACTIONSENSE_MODALITIES)
    # no modality alone suffices
    assert max(len(enc[m]) for m in informative) <= 8
    # every class is encoded by a non-tactile modality (so by something at every client), by 1..3 in all
    plain = set().union(*(enc[m] for m in informative if not m.startswith("tactile")))
    assert plain == set(range(20))
    per_class = [sum(c in enc[m] for m in informative) for c in range(20)]
    assert min(per_class) >= 1 and max(per_class) <= 3 and sum(k >= 2 for k in per_class) >= 10
    # at least one redundant pair: two modalities encoding exactly the same classes
    pairs = [(a, b) for i, a in enumerate(informative) for b in informative[i + 1:] if enc[a] == enc[b]]
    assert ("emg_right", "emg_left") in pairs or ("emg_left", "emg_right") in pairs


def test_headroom_noise_modalities_get_zero_truth_everywhere(headroom):
    md = headroom.metadata
    assert md["noise_modalities"] == list(NOISE_WIDTHS)
    assert {m: headroom.spec[m].features for m in NOISE_WIDTHS} == NOISE_WIDTHS
    assert md["informativeness_order"][-4:] == list(NOISE_WIDTHS)
    truth = md["shapley_truth"]
    assert set(truth) == set(SUBJECTS)
    for c in headroom.clients:
        phi = truth[c.name]
        assert set(phi) == set(c.x)
        informative = [v for m, v in phi.items() if m not in NOISE_WIDTHS]
        assert all(phi[m] == 0.0 for m in NOISE_WIDTHS)
        assert min(informative) > 0.01  # every informative modality ranks above every noise one
    for m in NOISE_WIDTHS:
        assert md["informativeness"][m] == pytest.approx(0.05) and md["encoded_classes"][m] == []


def test_headroom_shapley_truth_is_efficient_and_follows_the_order(headroom):
    md = headroom.metadata
    gain = {m: np.asarray(v) for m, v in md["class_gain"].items()}
    for c in headroom.clients:
        phi = md["shapley_truth"][c.name]
        v_all = float(np.max(np.stack([gain[m] for m in c.x]), axis=0).mean())  # v(all present)
        assert abs(sum(phi.values()) - v_all) < 1e-9
        assert md["shapley_truth_value_all"][c.name] == pytest.approx(v_all, abs=1e-12)
        assert 0.6 < v_all < 0.95  # clearly informative, but no modality set is certain of every class
    fleet_truth = md["shapley_truth_fleet"]
    order = md["informativeness_order"]
    assert sorted(order) == sorted(headroom.spec.names)
    vals = [fleet_truth[m] for m in order]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # the redundant pair splits its classes: the weaker arm gets less than the stronger
    assert fleet_truth["emg_left"] < fleet_truth["emg_right"]


def test_headroom_truth_is_not_the_size_order(headroom):
    feats = {m.name: m.features for m in headroom.spec.modalities}
    order = headroom.metadata["informativeness_order"]
    by_size = sorted(feats, key=lambda m: -feats[m])
    assert order != by_size
    informative = [m for m in order if m not in NOISE_WIDTHS]
    assert informative[0] == "eye"  # the smallest modality is the most informative
    truth = headroom.metadata["shapley_truth_fleet"]
    rho = spearmanr([truth[m] for m in informative], [feats[m] for m in informative]).statistic
    assert rho < 0, rho


def test_headroom_data_has_headroom(headroom):
    """On the data (no torch): no modality alone suffices, all of them together do far better, and a
    nearest-class-centroid classifier on every modality stays well below 100%."""
    single = _ncc_accuracy(headroom)
    assert max(single.values()) < 0.6, single
    assert all(single[m] < 0.12 for m in NOISE_WIDTHS), single
    together = np.mean([_ncc_concat(c, list(c.x)) for c in headroom.clients])
    assert max(single.values()) + 0.15 < together < 0.9, (together, single)
    # the clients without gloves still resolve every class (their non-tactile modalities cover all)
    bare = [c for c in headroom.clients if c.name in TACTILE_MISSING]
    assert np.mean([_ncc_concat(c, list(c.x)) for c in bare]) > 0.55


def _ncc_concat(c, mods) -> float:
    f = np.concatenate([c.x[m].reshape(len(c), c.x[m].shape[1], -1).mean(axis=1) for m in mods], axis=1)
    ytr = c.y[c.train]
    cent = np.stack([f[c.train][ytr == k].mean(0) for k in range(20)])
    d = ((f[~c.train][:, None, :] - cent[None]) ** 2).sum(-1)
    return float((d.argmin(1) == c.y[~c.train]).mean())


def test_max_game_shapley_is_exact():
    """The truth's Shapley values against the definition (average marginal contribution over orders)."""
    from itertools import permutations

    from fedmfs.core.data.synthetic import _max_game_shapley

    gain = np.random.default_rng(0).uniform(0, 1, (4, 6)) * (np.random.default_rng(1).uniform(size=(4, 6)) > 0.4)

    def v(s: list[int]) -> float:
        return float(gain[s].max(axis=0).mean()) if s else 0.0

    brute = np.zeros(4)
    orders = list(permutations(range(4)))
    for order in orders:
        for k, i in enumerate(order):
            brute[i] += v(list(order[:k + 1])) - v(list(order[:k]))
    phi, v_all = _max_game_shapley(gain)
    np.testing.assert_allclose(phi, brute / len(orders), atol=1e-12)
    assert v_all == pytest.approx(v([0, 1, 2, 3]))


def test_a_cover_must_leave_no_class_to_the_gloves_alone():
    import dataclasses

    from fedmfs.core.data.synthetic import _check_cover

    p = PRESETS["headroom"]
    assert p.cover is not None
    cover = dict(p.cover, emg_left=(14, 15, 16, 17, 18), emg_right=(14, 15, 16, 17, 18))
    truth = dict(p.truth, emg_left=dataclasses.replace(p.truth["emg_left"], classes=5),
                 emg_right=dataclasses.replace(p.truth["emg_right"], classes=5))
    with pytest.raises(ValueError, match=r"slots \[19\] are encoded by no non-tactile modality"):
        _check_cover(dataclasses.replace(p, cover=cover, truth=truth))
    with pytest.raises(ValueError, match="covers 5 classes, truth says 6"):
        _check_cover(dataclasses.replace(p, cover=cover))


# --- the fleet families (issue 17): noisy, redundant, largeweak ---

TRUTH_KEYS = ("informativeness", "informativeness_order", "shapley_truth", "class_gain", "shapley_truth_fleet",
              "shapley_truth_value_all", "encoded_classes")


@pytest.fixture(scope="module")
def families():
    return {name: make_synthetic(name, 0) for name in FAMILIES}


def _arrays_digest(fleet) -> str:
    h = hashlib.sha256()
    for c in fleet.clients:
        h.update(c.name.encode())
        h.update(c.y.tobytes())
        h.update(c.train.tobytes())
        for k in sorted(c.x):
            h.update(k.encode())
            h.update(c.x[k].tobytes())
    return h.hexdigest()


def test_existing_presets_are_unchanged_bit_for_bit(small, headroom):
    """The arrays of `small` and `headroom` (seed 0) as generated before the families were added. If a
    numpy upgrade changes its random streams this fails too: check the generator did not change before
    writing new digests."""
    assert _arrays_digest(small) == "f4754c17a1521558fc1d468a2412da25c57e341da3d862bf978f89efa9795b4c"
    assert _arrays_digest(headroom) == "352e0f4bf11d2d46dc083cabf907751448c3c46a6be349883b9c0402fdcf405c"
    assert "redundant_pairs" not in small.metadata and "redundant_pairs" not in headroom.metadata
    assert small.spec.names == tuple(m.name for m in ACTIONSENSE_MODALITIES)


def test_families_are_presets():
    assert set(FAMILIES) <= set(PRESETS)
    for name in FAMILIES:
        p = PRESETS[name]
        spec = p.spec()
        assert p.name == name and spec.steps == 12 and all(m.hidden == 16 for m in spec.modalities)
        assert p.windows_per_class == 15 and len(spec.modalities) <= 10


@pytest.mark.parametrize("name", FAMILIES)
def test_family_deterministic_and_seed_dependent(name, families):
    fleet, again, other = families[name], make_synthetic(name, 0), make_synthetic(name, 1)
    assert _arrays_digest(fleet) == _arrays_digest(again)
    assert fleet.metadata == again.metadata
    assert _arrays_digest(fleet) != _arrays_digest(other)
    assert fleet.metadata["encoded_classes"] != other.metadata["encoded_classes"]  # the seed's class permutation
    assert json.loads(json.dumps(fleet.metadata)) == fleet.metadata


@pytest.mark.parametrize("name", FAMILIES)
def test_family_has_the_ground_truth_headroom_has(name, families):
    fleet = families[name]
    md = fleet.metadata
    assert fleet.spec == PRESETS[name].spec() and md["preset"] == name
    assert all(k in md for k in TRUTH_KEYS)
    assert sorted(md["informativeness_order"]) == sorted(fleet.spec.names)
    whole = md["shapley_truth_fleet"]
    vals = [whole[m] for m in md["informativeness_order"]]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    gain = {m: np.asarray(v) for m, v in md["class_gain"].items()}
    assert set(md["shapley_truth"]) == set(SUBJECTS)
    for c in fleet.clients:
        assert set(md["shapley_truth"][c.name]) == set(c.x)
        assert {m for m in c.x if m.startswith("tactile")} == (
            set() if c.name in TACTILE_MISSING else {m for m in fleet.spec.names if m.startswith("tactile")})
        v_all = float(np.max(np.stack([gain[m] for m in c.x]), axis=0).mean())
        assert abs(sum(md["shapley_truth"][c.name].values()) - v_all) < 1e-9
        assert 0.6 < v_all < 0.95  # informative, but no modality set is certain of every class
        for m, x in c.x.items():
            assert x.dtype == np.float32 and x.shape == (len(c), 12, *fleet.spec[m].feature_shape)
            assert -1.0 <= x.min() and x.max() <= 1.0
    # every class is encoded by a modality every client has; no modality alone suffices
    enc = _encoded(fleet)
    assert set().union(*(enc[m] for m in enc if not m.startswith("tactile"))) == set(range(20))
    assert max(len(v) for v in enc.values()) <= 8


def test_noisy_noise_modalities_get_zero_truth(families):
    fleet = families["noisy"]
    md, feats = fleet.metadata, {m.name: m.features for m in fleet.spec.modalities}
    noise = md["noise_modalities"]
    widths = sorted(feats[m] for m in noise)
    assert len(noise) >= 4 and widths[0] <= 4 and widths[-1] >= 256  # spread over 3..256 features
    informative = [m for m in fleet.spec.names if m not in noise]
    assert len(informative) >= 4 and max(feats[m] for m in informative) >= 50 * min(feats[m] for m in informative)
    assert md["informativeness_order"][-len(noise):] == noise
    for c in fleet.clients:
        phi = md["shapley_truth"][c.name]
        assert all(phi[m] == 0.0 for m in noise)
        assert min(phi[m] for m in informative if m in phi) > 0.01
    assert all(md["class_gain"][m] == [0.0] * 20 and md["encoded_classes"][m] == [] for m in noise)


def test_noisy_noise_is_noise_on_the_data(families):
    single = _ncc_accuracy(families["noisy"])
    noise = families["noisy"].metadata["noise_modalities"]
    assert max(single[m] for m in noise) < 0.12 < min(single[m] for m in single if m not in noise), single


def test_redundant_pairs_share_their_classes_and_differ_in_size(families):
    fleet = families["redundant"]
    md, feats, enc = fleet.metadata, {m.name: m.features for m in fleet.spec.modalities}, _encoded(fleet)
    pairs = [tuple(p) for p in md["redundant_pairs"]]
    assert len(pairs) >= 2
    gain = {m: np.asarray(v) for m, v in md["class_gain"].items()}
    for small_m, large_m in pairs:
        assert enc[small_m] == enc[large_m] and len(enc[small_m]) >= 5  # the same classes
        assert feats[large_m] >= 8 * feats[small_m]  # one much larger
        classes = sorted(enc[small_m])
        assert gain[small_m][classes].min() > 0 and gain[large_m][classes].min() > 0  # both informative
        for c in fleet.clients:
            phi = md["shapley_truth"][c.name]
            if large_m in phi:
                assert phi[small_m] > 0.01 and phi[large_m] > 0.01
    paired = {m for p in pairs for m in p}
    own = [m for m in fleet.spec.names if m not in paired]
    assert own and all(enc[m] != enc[o] for m in own for o in fleet.spec.names if o != m)
    assert any(sorted(enc[m] - set().union(*(enc[o] for o in enc if o != m))) for m in own)  # classes of its own
    assert "noise_modalities" not in md


def test_largeweak_largest_is_the_weakest_informative(families):
    fleet = families["largeweak"]
    md, feats = fleet.metadata, {m.name: m.features for m in fleet.spec.modalities}
    largest, smallest = max(feats, key=feats.get), min(feats, key=feats.get)
    assert md["informativeness_order"][-1] == largest and md["informativeness_order"][0] == smallest
    assert "noise_modalities" not in md
    assert max(md["class_gain"][largest]) > 0.05 and md["informativeness"][largest] > 0.05  # not pure noise
    for c in fleet.clients:
        phi = md["shapley_truth"][c.name]
        assert 0 < phi[largest] == min(phi.values())
    truth = md["shapley_truth_fleet"]
    rho = spearmanr([truth[m] for m in feats], [feats[m] for m in feats]).statistic
    assert rho < -0.9, rho
