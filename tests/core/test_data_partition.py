"""Partitioning: stratified splits, Dirichlet label skew (measurably skewed, reproducible), dropped modalities."""

from __future__ import annotations

import numpy as np
import pytest

from fedmfs.core.data import (
    by_subject,
    dirichlet_label_skew,
    drop_modalities,
    make_synthetic,
    stratified_split,
)
from fedmfs.core.errors import DataError


def _pool(n_per_class=30, classes=5, t=4):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), n_per_class)
    x = {"a": rng.normal(size=(y.size, t, 3)).astype(np.float32),
         "b": rng.normal(size=(y.size, t, 2, 2)).astype(np.float32)}
    x["a"][:, 0, 0] = np.arange(y.size)  # row id, to check rows travel with their labels
    return x, y


def _label_skew(fleet) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    glob = np.bincount(np.concatenate([c.y for c in fleet.clients]), minlength=fleet.spec.num_classes)
    glob = glob / glob.sum()
    tv = [0.5 * np.abs(np.bincount(c.y, minlength=glob.size) / len(c) - glob).sum() for c in fleet.clients]
    return float(np.mean(tv))


def test_stratified_split_counts_and_minimum():
    y = np.array([0] * 10 + [1] * 5 + [2] * 3 + [3] * 2 + [4])
    tr = stratified_split(y, 0.8, 0)
    test_counts = np.bincount(y[~tr], minlength=5)
    np.testing.assert_array_equal(test_counts, [2, 1, 1, 0, 0])
    assert tr.dtype == bool and tr.shape == y.shape
    np.testing.assert_array_equal(stratified_split(y, 0.8, 0), tr)
    assert stratified_split(np.array([0, 1]), 0.5, 0).all()  # keeps MIN_TRAIN = 2 training windows
    with pytest.raises(ValueError, match="split"):
        stratified_split(y, 0.0, 0)


def test_dirichlet_skews_and_is_reproducible():
    x, y = _pool()
    skewed = dirichlet_label_skew(x, y, num_clients=5, alpha=0.1, seed=7)
    even = dirichlet_label_skew(x, y, num_clients=5, alpha=1000.0, seed=7)
    assert _label_skew(skewed) > 0.35 and _label_skew(even) < 0.1
    again = dirichlet_label_skew(x, y, num_clients=5, alpha=0.1, seed=7)
    other = dirichlet_label_skew(x, y, num_clients=5, alpha=0.1, seed=8)
    assert [c.y.tobytes() for c in again.clients] == [c.y.tobytes() for c in skewed.clients]
    assert [c.train.tobytes() for c in again.clients] == [c.train.tobytes() for c in skewed.clients]
    assert [c.y.tobytes() for c in other.clients] != [c.y.tobytes() for c in skewed.clients]
    assert skewed.metadata["partition"] == {"kind": "dirichlet_label_skew", "alpha": 0.1, "num_clients": 5,
                                            "seed": 7}


def test_dirichlet_partitions_every_window_once_with_invariants():
    x, y = _pool()
    fleet = dirichlet_label_skew(x, y, num_clients=8, alpha=0.05, seed=3)
    assert [c.name for c in fleet.clients] == [f"client{k:02d}" for k in range(8)]
    ids = np.concatenate([c.x["a"][:, 0, 0] for c in fleet.clients]).astype(int)
    assert sorted(ids.tolist()) == list(range(y.size))  # a partition: each row exactly once
    for c in fleet.clients:
        np.testing.assert_array_equal(y[c.x["a"][:, 0, 0].astype(int)], c.y)  # rows keep their labels
        assert len(c) >= 3 and c.n_train >= 2
        assert c.x["b"].shape[1:] == (4, 2, 2)
    assert fleet.spec.names == ("a", "b") and fleet.spec.num_classes == 5 and fleet.spec.steps == 4


def test_dirichlet_refuses_impossible_requests():
    x, y = _pool(n_per_class=2, classes=2)
    with pytest.raises(DataError, match="cannot give 3 clients"):
        dirichlet_label_skew(x, y, num_clients=3, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_skew(x, y, num_clients=1, alpha=0.0, seed=0)
    with pytest.raises(DataError, match="rows of y"):
        dirichlet_label_skew({"a": x["a"][:3]}, y, num_clients=1, alpha=1.0, seed=0)


def test_drop_modalities_keeps_at_least_and_is_seeded():
    fleet = make_synthetic("small", 0)
    assert by_subject(fleet) is fleet
    all_gone = drop_modalities(fleet, prob=1.0, seed=1)
    assert all(len(c.x) == 1 for c in all_gone.clients)
    two = drop_modalities(fleet, prob=1.0, seed=1, keep_at_least=2)
    assert all(len(c.x) == 2 for c in two.clients)
    half = drop_modalities(fleet, prob=0.5, seed=5)
    again = drop_modalities(fleet, prob=0.5, seed=5)
    assert [c.modalities for c in half.clients] == [c.modalities for c in again.clients]
    lost = sum(len(v) for v in half.metadata["dropped"].values())
    had = sum(len(c.x) for c in fleet.clients)
    assert 0.3 * had < lost < 0.7 * had
    for before, after in zip(fleet.clients, half.clients):
        assert set(after.x) | set(half.metadata["dropped"][before.name]) == set(before.x)
        assert after.x.keys() <= before.x.keys() and len(after.x) >= 1
    assert drop_modalities(fleet, prob=0.0, seed=0).metadata["dropped"] == {c.name: [] for c in fleet.clients}
    assert half.metadata["informativeness_order"] == fleet.metadata["informativeness_order"]
    half.validate()
    with pytest.raises(ValueError, match="prob"):
        drop_modalities(fleet, prob=1.5, seed=0)
