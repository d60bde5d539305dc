"""The ONNX Shapley engine against the numpy reference (fedmfs.core.shapley), within 1e-6."""

import numpy as np
import pytest
import torch

from fedmfs.core import shapley as ref
from fedmfs.core.errors import ConfigError, DataError, ManifestError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.runtime.coalitions import ShapleyMethod, engine_shapley
from fedmfs.core.runtime.graphs import model_set_onnx
from fedmfs.core.runtime.sessions import EdgeRuntime
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy

SPEC = DatasetSpec(tuple(ModalitySpec(f"m{i}", (i + 1,) if i % 2 else (2, 2), hidden=4) for i in range(5)), 3, 4)


def _sets(spec, have, seed=0):
    torch.manual_seed(seed)
    mods = {k: state_to_numpy(ModalityModel(spec[k], spec.num_classes)) for k in have}
    fus = FusionModel(len(spec.modalities), spec.num_classes, 12)
    for p in fus.parameters():  # sharper fusion -> larger, more distinct Shapley values
        p.data.mul_(4.0)
    return model_set_onnx(spec, mods, state_to_numpy(fus))


def _data(spec, have, n, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((n, spec.steps, *spec[k].feature_shape), dtype=np.float32) for k in have}


@pytest.fixture(scope="module", params=["graph", "generic"])
def case(request):
    have = ["m0", "m1", "m3", "m4"]  # m2 missing on this client
    mods, fusion, coal = _sets(SPEC, have)
    rt = EdgeRuntime(SPEC, mods, fusion, coalition_model=coal if request.param == "graph" else None,
                     chunk_elements=500)  # tiny chunks: many batched calls, same values
    x, bg = _data(SPEC, have, 5, 1), _data(SPEC, have, 4, 2)
    px, mask = rt.modality_probs(x)
    pb, _ = rt.modality_probs(bg)
    return rt, x, bg, px, pb, mask


@pytest.mark.parametrize("kind", ["prob", "loglik"])
def test_exact_matches_reference(case, kind):
    rt, x, bg, px, pb, mask = case
    y = np.array([0, 2, 1, 1, 0]) if kind == "loglik" else None
    res = rt.shapley(x, bg, kind=kind, y=y)
    want = ref.exact_shapley(rt.fuse, px, pb, mask, kind, y)
    assert res.method is ShapleyMethod.EXACT and res.stderr is None and res.coalitions == 16
    assert res.phi.shape == want.shape == ((5, 5, 3) if kind == "prob" else (5, 5))
    assert np.abs(res.phi - want).max() <= 1e-6
    assert np.abs(want).max() > 1e-3  # the comparison is not between zeros
    assert np.all(res.phi[:, 2] == 0) and res.scores[2] == 0
    np.testing.assert_allclose(res.scores, ref.modality_scores(res.phi))
    # efficiency: the values add up to v(all) - v(none)
    v = ref.coalition_values(rt.fuse, px, pb, np.nonzero(mask)[0], mask, kind, y)
    np.testing.assert_allclose(res.phi.sum(1), v[-1] - v[0], atol=1e-6)


def test_permutation_matches_reference_draws_and_exact(case):
    rt, x, bg, px, pb, mask = case
    res = rt.shapley(x, bg, method="permutation", permutations=10, seed=7)
    want, se = ref.permutation_shapley(rt.fuse, px, pb, mask, permutations=10, seed=7)
    assert res.method is ShapleyMethod.PERMUTATION
    assert np.abs(res.phi - want).max() <= 1e-6 and np.abs(res.stderr - se).max() <= 1e-6
    many = rt.shapley(x, bg, method="permutation", permutations=400, seed=1)
    exact = rt.shapley(x, bg).phi
    assert np.all(np.abs(many.phi - exact) <= 5 * many.stderr + 1e-7)
    assert many.stderr[:, [0, 1, 3, 4]].max() > 0  # a real error estimate, not a degenerate one


def test_engine_auto_switches_to_permutation_beyond_exact_max():
    calls = []

    def additive(coalitions):  # v(S) = sum of the players' weights -> phi_j = weight_j exactly
        calls.append(len(coalitions))
        return (coalitions @ np.arange(1.0, 15.0))[:, None]  # (S, N=1)

    players = np.arange(14)
    res = engine_shapley(additive, players, 15, method="auto", permutations=8, seed=0)
    assert res.method is ShapleyMethod.PERMUTATION
    np.testing.assert_allclose(res.phi[0, :14], np.arange(1, 15), atol=1e-9)
    assert res.phi[0, 14] == 0 and len(calls) == 1  # every coalition in one batched call
    with pytest.raises(ConfigError, match="exact Shapley over 14"):
        engine_shapley(additive, players, 15, method="exact")
    with pytest.raises(ConfigError, match="unknown Shapley method"):
        engine_shapley(additive, players, 15, method="fast")


def test_bad_inputs_are_refused_with_reasons(case):
    rt, x, bg, *_ = case
    with pytest.raises(DataError, match="needs the true labels"):
        rt.shapley(x, bg, kind="loglik")
    with pytest.raises(DataError, match=r"y must be \(5,\)"):
        rt.shapley(x, bg, kind="loglik", y=np.array([0, 1, 2, 3, 9]))
    with pytest.raises(ConfigError, match="value function"):
        rt.shapley(x, bg, kind="margin")
    with pytest.raises(DataError, match="must match"):
        rt.shapley(x, {k: v for k, v in bg.items() if k != "m0"})
    with pytest.raises(DataError, match="no model for modality 'm2'"):
        rt.predict({**x, "m2": np.zeros((5, 4, 3), np.float32)})
    with pytest.raises(DataError, match=r"m1 must have shape \(N, 4, 2\)"):
        rt.predict({**x, "m1": np.zeros((5, 3, 2), np.float32)})
    with pytest.raises(DataError, match="NaN"):
        rt.predict({**x, "m0": np.full((5, 4, 2, 2), np.nan, np.float32)})
    with pytest.raises(DataError, match="samples"):
        rt.predict({**x, "m0": x["m0"][:2]})


def test_no_fusion_model():
    mods, _, _ = _sets(SPEC, ["m0"])
    rt = EdgeRuntime(SPEC, mods)
    p, mask = rt.modality_probs(_data(SPEC, ["m0"], 2, 0))
    np.testing.assert_allclose(p[:, 0].sum(1), 1.0, atol=1e-6)
    with pytest.raises(ManifestError, match="no fusion model"):
        rt.predict(_data(SPEC, ["m0"], 2, 0))
