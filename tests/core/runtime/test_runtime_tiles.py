"""The split and tiled coalition engines (coalition graph terms + split + tile roles) against the
numpy reference, at many modalities (up to EXACT_MAX = 12 players), for both value functions, with absent modalities,
tiny chunks and the overflow fallback: equal to fedmfs.core.shapley.exact_shapley within 1e-6."""

import numpy as np
import pytest
import torch

from fedmfs.core import shapley as ref
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.runtime.coalitions import ShapleyMethod, SplitCoalitions, TiledCoalitions, _weights
from fedmfs.core.runtime.graphs import fusion_coalition_onnx, fusion_model_onnx
from fedmfs.core.runtime.sessions import EdgeRuntime
from fedmfs.learner.models import FusionModel, state_to_numpy

C, HID = 3, 6


def _runtime(m, scale=4.0, seed=0, chunk_elements=1 << 19, tiles=True, out_scale=1.0, split=True):
    spec = DatasetSpec(tuple(ModalitySpec(f"m{i}", (2,), hidden=4) for i in range(m)), C, 4)
    torch.manual_seed(seed)
    fus = FusionModel(m, C, HID)
    for p in fus.parameters():  # sharper fusion -> larger, more distinct Shapley values
        p.data.mul_(scale)
    fus.net[2].weight.data.mul_(out_scale)
    st = state_to_numpy(fus)
    rt = EdgeRuntime(spec, {}, fusion_model_onnx(m, C, HID, st),
                     coalition_model=fusion_coalition_onnx(m, C, HID, st, tiles=tiles, split=split),
                     chunk_elements=chunk_elements)
    return rt


def _probs(m, n, b, absent, seed):
    rng = np.random.default_rng(seed)
    px = rng.dirichlet(np.full(C, 0.5), size=(n, m)).astype(np.float32)
    pb = rng.dirichlet(np.full(C, 0.5), size=(b, m)).astype(np.float32)
    mask = np.ones(m, bool)
    mask[list(absent)] = False
    px[:, ~mask] = 0.0
    pb[:, ~mask] = 0.0
    y = rng.integers(0, C, n)
    return px, pb, mask, y


@pytest.mark.parametrize(("m", "absent"), [(1, ()), (3, (1,)), (7, (0, 5)), (10, ()), (11, (4,)), (12, ())])
@pytest.mark.parametrize("kind", ["prob", "loglik"])
def test_exact_equals_reference(m, absent, kind):
    rt = _runtime(m)
    assert rt._coalition_tiles
    px, pb, mask, y = _probs(m, 3, 2, absent, seed=m)
    res = rt.shapley_from_probs(px, pb, mask, kind=kind, y=y if kind == "loglik" else None)
    want = ref.exact_shapley(rt.fuse, px, pb, mask, kind, y if kind == "loglik" else None)
    p = int(mask.sum())
    assert res.method is ShapleyMethod.EXACT and res.coalitions == 2**p and res.stderr is None
    assert res.phi.shape == want.shape
    assert np.abs(res.phi - want).max() <= 1e-6
    assert np.abs(want).max() > 1e-3  # the comparison is not between zeros
    assert np.all(res.phi[:, ~mask] == 0)
    # efficiency: the values add up to v(all) - v(none)
    v = ref.coalition_values(rt.fuse, px, pb, np.nonzero(mask)[0], mask, kind, y if kind == "loglik" else None,
                             np.array([[False] * p, [True] * p]))
    np.testing.assert_allclose(res.phi.sum(1), v[1] - v[0], atol=2e-6)


@pytest.mark.parametrize("kind", ["prob", "loglik"])
def test_tiny_chunks_and_the_old_graph_agree(kind):
    """Chunks of 40 elements: every tile is one coalition group x one explained x one background
    row, so the table, block and accumulation bookkeeping is exercised; the old coalition graph
    (tiles=False) and the tiled one give the same values."""
    m, absent = 6, (2,)
    px, pb, mask, y = _probs(m, 5, 4, absent, seed=3)
    yy = y if kind == "loglik" else None
    tiny = _runtime(m, chunk_elements=40).shapley_from_probs(px, pb, mask, kind=kind, y=yy)
    plain = _runtime(m, tiles=False)
    assert not plain._coalition_tiles
    old = plain.shapley_from_probs(px, pb, mask, kind=kind, y=yy)
    want = ref.exact_shapley(plain.fuse, px, pb, mask, kind, yy)
    assert np.abs(tiny.phi - want).max() <= 1e-6 and np.abs(old.phi - want).max() <= 1e-6
    assert np.abs(want).max() > 1e-3


@pytest.mark.parametrize("engine", [TiledCoalitions, SplitCoalitions])
@pytest.mark.parametrize("kind", ["prob", "loglik"])
def test_overflowing_logits_take_the_stable_way(kind, engine):
    """Second layer x 40: logits in the hundreds, so exp overflows (and, for other rows, every class
    underflows); those tiles are redone from their logits, shifted by the row maximum."""
    m = 5
    rt = _runtime(m, out_scale=40.0)
    px, pb, mask, y = _probs(m, 4, 3, (), seed=5)
    yy = y if kind == "loglik" else None
    calls = []
    run = rt._coalitions.run

    def counting(names, feeds):
        calls.append(tuple(names))
        return run(names, feeds)

    ev = engine(lambda f, n: counting(n, f), px, pb, np.arange(m), mask, HID, kind, yy)
    phi = np.moveaxis(ev.exact_phi(_weights(m)), 0, 1)
    fallback = ("tile_logits",) if engine is TiledCoalitions else ("split_logits",)
    assert fallback in calls  # the fallback did run
    want = ref.exact_shapley(rt.fuse, px, pb, mask, kind, yy)
    assert np.abs(phi - want).max() <= 1e-6 * max(1.0, np.abs(want).max())
    assert np.abs(want).max() > 1e-3
    res = rt.shapley_from_probs(px, pb, mask, kind=kind, y=yy)
    assert np.abs(res.phi - want).max() <= 1e-6 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("kind", ["prob", "loglik"])
@pytest.mark.parametrize("spread", [0.02, 1.0])
def test_split_engine_both_ways_and_the_tiled_engine_agree(kind, spread):
    """The split engine takes its split role where few hidden units are mixed (modality outputs
    close to one another: ``spread`` 0.02) and the dense tile role where many are (spread 1); both
    equal the reference and the tiled engine (graph without the split role) within 1e-6, at M = 12."""
    m = 12
    px, pb, mask, y = _probs(m, 4, 3, (), seed=12)
    px = (1 - spread) / C + spread * px
    pb = (1 - spread) / C + spread * pb
    yy = y if kind == "loglik" else None
    rt = _runtime(m, scale=2.0)
    assert rt._coalition_split
    sess = rt._coalitions
    ev = SplitCoalitions(lambda f, n: sess.run(n, f), px, pb, np.arange(m), mask, HID, kind, yy)
    phi = np.moveaxis(ev.exact_phi(_weights(m)), 0, 1)
    if spread < 0.1:
        assert ev.split_groups > 0
    else:
        assert ev.dense_groups > 0
    tiled = _runtime(m, scale=2.0, split=False)
    assert tiled._coalition_tiles and not tiled._coalition_split
    want = ref.exact_shapley(rt.fuse, px, pb, mask, kind, yy)
    old = tiled.shapley_from_probs(px, pb, mask, kind=kind, y=yy).phi
    assert np.abs(want).max() > 1e-4
    assert np.abs(phi - want).max() <= 1e-6 and np.abs(old - want).max() <= 1e-6
    # chunks of 40 elements: one coalition, one explained and one background row per call
    tiny = _runtime(m, scale=2.0, chunk_elements=40).shapley_from_probs(px, pb, mask, kind=kind, y=yy).phi
    assert np.abs(tiny - want).max() <= 1e-6


def test_permutation_through_tiles_matches_reference_draws():
    m = 8
    rt = _runtime(m)
    px, pb, mask, y = _probs(m, 3, 2, (6,), seed=8)
    res = rt.shapley_from_probs(px, pb, mask, method="permutation", permutations=12, seed=4)
    want, se = ref.permutation_shapley(rt.fuse, px, pb, mask, permutations=12, seed=4)
    assert res.method is ShapleyMethod.PERMUTATION
    assert np.abs(res.phi - want).max() <= 1e-6 and np.abs(res.stderr - se).max() <= 1e-6
    assert np.abs(want).max() > 1e-3 and res.stderr[:, mask].max() > 0
