"""Fleet.validation_view: the tuning split is carved out of the training windows; test windows never appear."""

from __future__ import annotations

import numpy as np
import pytest

from fedmfs.core.data import dirichlet_label_skew, make_synthetic
from fedmfs.core.data.format import ClientData, Fleet


def _fleet() -> Fleet:
    """Two clients whose windows carry their row id in x[:, 0, 0]; some classes are tiny on purpose."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 30)
    x = {"a": rng.normal(size=(y.size, 4, 3)).astype(np.float32)}
    x["a"][:, 0, 0] = np.arange(y.size)
    fleet = dirichlet_label_skew(x, y, num_clients=3, alpha=0.5, seed=3)
    # a hand-made client: class 0 has 1 training window, class 1 has 2, class 2 has 8 (+ test windows)
    yh = np.array([0, 0, 1, 1, 1] + [2] * 10)
    tr = np.array([True, False, True, True, False] + [True] * 8 + [False] * 2)
    xh = rng.normal(size=(yh.size, 4, 3)).astype(np.float32)
    xh[:, 0, 0] = 1000 + np.arange(yh.size)
    fleet.clients.append(ClientData("hand", {"a": xh}, yh, tr))
    fleet.validate()
    return fleet


def _ids(c: ClientData, train: bool) -> set[int]:
    x, _ = c.split(train)
    return set(x["a"][:, 0, 0].astype(int).tolist())


def test_view_uses_only_training_windows():
    fleet = _fleet()
    view = fleet.validation_view(0.25, seed=0)
    assert [c.name for c in view.clients] == [c.name for c in fleet.clients]
    assert view.metadata["split"] == "validation"
    assert view.metadata["partition"] == fleet.metadata["partition"]   # the rest of the metadata stays
    view.check_runnable()
    for orig, v in zip(fleet.clients, view.clients, strict=True):
        orig_train, orig_test = _ids(orig, True), _ids(orig, False)
        all_v = _ids(v, True) | _ids(v, False)
        assert len(v) == orig.n_train and all_v == orig_train      # exactly the training windows
        assert not all_v & orig_test                                # no original test window
        assert _ids(v, False) <= orig_train and _ids(v, False)      # validation rows: training rows
        # labels travel with their rows
        xo, yo = orig.split(True)
        lab = dict(zip(xo["a"][:, 0, 0].astype(int).tolist(), yo.tolist()))
        assert all(lab[int(i)] == int(yy) for i, yy in zip(v.x["a"][:, 0, 0], v.y))


def test_every_class_keeps_a_training_window_and_the_fraction_is_stratified():
    fleet = _fleet()
    view = fleet.validation_view(0.25, seed=1)
    for orig, v in zip(fleet.clients, view.clients, strict=True):
        _, yo = orig.split(True)
        counts = np.bincount(yo, minlength=5)
        kept = np.bincount(v.y[v.train], minlength=5)
        for cls in np.flatnonzero(counts >= 2):
            assert kept[cls] >= 1
        val = np.bincount(v.y[~v.train], minlength=5)
        # per class: round(n * 0.25), at most n - 1
        expect = np.minimum(np.floor(counts * 0.25 + 0.5).astype(int), np.maximum(counts - 1, 0))
        np.testing.assert_array_equal(val, expect)
    hand = view.clients[-1]     # class 0: 1 window (trains), class 1: 2 windows (1 validates), class 2: 8 (2)
    np.testing.assert_array_equal(np.bincount(hand.y[~hand.train], minlength=3), [0, 1, 2])
    np.testing.assert_array_equal(np.bincount(hand.y[hand.train], minlength=3), [1, 1, 6])


def test_deterministic_in_seed():
    fleet = _fleet()
    a, b, c = fleet.validation_view(0.25, 5), fleet.validation_view(0.25, 5), fleet.validation_view(0.25, 6)
    assert [x.train.tobytes() for x in a.clients] == [x.train.tobytes() for x in b.clients]
    assert [x.train.tobytes() for x in a.clients] != [x.train.tobytes() for x in c.clients]
    assert a.metadata["validation"] == {"fraction": 0.25, "seed": 5}


def test_bad_fraction_and_synthetic_fleet():
    with pytest.raises(ValueError, match="fraction"):
        _fleet().validation_view(1.0)
    fleet = make_synthetic("small", seed=0)
    view = fleet.validation_view()
    view.check_runnable()
    assert sum(len(c) for c in view.clients) == sum(c.n_train for c in fleet.clients)
