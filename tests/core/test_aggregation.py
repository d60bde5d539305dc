"""Aggregation: the paper's weighted formula on hand-computable fixtures, streaming and robust rules."""

import numpy as np
import pytest

from fedmfs.core.aggregation import (
    Median,
    TrimmedMean,
    WeightedMean,
    clip_bound,
    clip_update,
    make_aggregator,
    state_norm,
    update_norm,
)


def test_weighted_mean_by_hand():
    agg = WeightedMean()
    agg.add({"w": np.array([1.0, 2.0], np.float32)}, 10)
    agg.add({"w": np.array([4.0, 8.0], np.float32)}, 30)
    # (10*[1,2] + 30*[4,8]) / 40 = [3.25, 6.5]
    np.testing.assert_allclose(agg.result()["w"], [3.25, 6.5])


def test_streaming_memory_is_per_model_and_merge_is_additive():
    rng = np.random.default_rng(0)
    states = [{"a": rng.normal(size=(3, 2)).astype(np.float32)} for _ in range(50)]
    weights = rng.integers(1, 100, 50)
    one = WeightedMean()
    for s, w in zip(states, weights):
        one.add(s, w)
    assert len(one.sums) == 1 and one.sums["a"].shape == (3, 2)  # O(model), not O(uploads)
    left, right = WeightedMean(), WeightedMean()
    for i, (s, w) in enumerate(zip(states, weights)):
        (left if i % 2 else right).add(s, w)
    left.merge(right)
    ref = sum(w * s["a"].astype(np.float64) for s, w in zip(states, weights)) / weights.sum()
    np.testing.assert_allclose(one.result()["a"], ref, rtol=1e-6)
    np.testing.assert_allclose(left.result()["a"], ref, rtol=1e-6)


def test_mismatched_uploads_refused():
    agg = WeightedMean()
    agg.add({"w": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError, match="shape"):
        agg.add({"w": np.zeros(3, np.float32)}, 1)
    with pytest.raises(ValueError, match="missing"):
        agg.add({"v": np.zeros(2, np.float32)}, 1)
    with pytest.raises(ValueError):
        agg.add({"w": np.zeros(2, np.float32)}, 0)


def test_robust_rules():
    vals = [np.array([v], np.float32) for v in (1.0, 2.0, 3.0, 100.0)]
    tm = TrimmedMean(trim=0.25)
    md = Median()
    for v in vals:
        tm.add({"w": v}, 1)
        md.add({"w": v}, 1)
    np.testing.assert_allclose(tm.result()["w"], [2.5])
    np.testing.assert_allclose(md.result()["w"], [2.5])
    clipped = clip_update({"w": np.array([3.0, 4.0])}, {"w": np.zeros(2)}, 1.0)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.8], rtol=1e-6)
    with pytest.raises(ValueError):
        make_aggregator("mode")


def test_norms_and_the_clip_bound_by_hand():
    g = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[0.0], [4.0]], np.float32)}   # ||g|| = 5, P = 4
    up = {"a": np.array([3.0, 6.0], np.float32), "b": np.array([[8.0], [4.0]], np.float32)}   # update (0,6,8,0)
    assert state_norm(g) == 5.0 and update_norm(up, g) == 10.0
    assert clip_bound(g, 1.0, 0.0) == 5.0            # ratio * ||g||
    assert clip_bound(g, 1.0, 3.0) == 6.0            # the floor: 3 * sqrt(4)
    assert clip_bound({"a": np.zeros(4, np.float32)}, 1.0, 0.5) == 1.0
    clipped = clip_update(up, g, 5.0)                # the update halved: (0,3,4,0)
    np.testing.assert_allclose(clipped["a"], [3.0, 3.0])
    np.testing.assert_allclose(clipped["b"], [[4.0], [4.0]])
    assert update_norm(clipped, g) == pytest.approx(5.0)
    assert clip_update(up, g, 10.0) is up            # within the bound: untouched
