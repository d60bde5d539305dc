"""The torch-free ONNX builder against PyTorch (fedmfs.learner.models), 1e-5 in fp32."""

import numpy as np
import pytest
import torch

from fedmfs.core.errors import PayloadError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.runtime.graphs import (
    fusion_coalition_onnx,
    fusion_model_onnx,
    modality_model_onnx,
    model_set_onnx,
    model_set_runtime,
)
from fedmfs.export.verify import (
    TOLERANCE,
    verify_coalitions,
    verify_fusion,
    verify_modality,
)
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy

SPECS = [
    ModalitySpec("eye", (2,), hidden=8),
    ModalitySpec("tactile", (4, 5), hidden=6),
    ModalitySpec("grid", (2, 3, 2), hidden=3),
    ModalitySpec("wide", (33,), hidden=16),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_modality_model_matches_torch(spec):
    torch.manual_seed(1)
    model = ModalityModel(spec, 5)
    for p in model.parameters():  # larger than init so the gates saturate differently
        p.data.mul_(2.0)
    state = state_to_numpy(model)
    onnx_bytes = modality_model_onnx(spec, 5, state)
    check = verify_modality(spec, 5, 9, state, onnx_bytes, real=np.zeros((3, 9, *spec.feature_shape), np.float32),
                            batches=(1, 7))
    assert check.random_diff <= TOLERANCE and check.real_diff <= TOLERANCE


def test_modality_gate_order_matters():
    """A builder that forgot the i,f,g,o -> i,o,f,c reorder would be far off: prove the check bites."""
    spec = SPECS[0]
    torch.manual_seed(2)
    state = state_to_numpy(ModalityModel(spec, 4))
    bad = dict(state)
    h = spec.hidden
    w = state["lstm.weight_ih_l0"]
    bad["lstm.weight_ih_l0"] = np.concatenate([w[h:2 * h], w[:h], w[2 * h:]])  # swap i and f
    check = verify_modality(spec, 4, 6, state, modality_model_onnx(spec, 4, bad))
    assert check.random_diff > 1e-3


@pytest.mark.parametrize("m,c,hidden", [(1, 2, 3), (3, 4, 16), (6, 20, 64)])
def test_fusion_model_matches_torch(m, c, hidden):
    torch.manual_seed(m)
    state = state_to_numpy(FusionModel(m, c, hidden))
    fusion = fusion_model_onnx(m, c, hidden, state)
    check = verify_fusion(m, c, hidden, state, fusion, batches=(1, 7))
    assert check.random_diff <= TOLERANCE
    coal = verify_coalitions(fusion, fusion_coalition_onnx(m, c, hidden, state), m, c)
    assert coal.random_diff <= 1e-6


def test_bad_state_lists_every_problem():
    spec = SPECS[1]
    state = state_to_numpy(ModalityModel(spec, 3))
    state.pop("head.bias")
    state["lstm.weight_hh_l0"] = state["lstm.weight_hh_l0"][:, :2]
    state["extra"] = np.zeros(2, np.float32)
    with pytest.raises(PayloadError) as e:
        modality_model_onnx(spec, 3, state)
    msg = str(e.value)
    assert "missing ['head.bias']" in msg and "unexpected ['extra']" in msg and "lstm.weight_hh_l0 has shape" in msg
    nan = state_to_numpy(FusionModel(2, 3, 4))
    nan["net.0.bias"][0] = np.nan
    with pytest.raises(PayloadError, match="NaN"):
        fusion_model_onnx(2, 3, 4, nan)


def test_model_set_runtime_predicts_like_torch_and_refuses_unknown():
    spec = DatasetSpec((SPECS[0], SPECS[1], SPECS[3]), 4, 6)
    torch.manual_seed(3)
    mods = {m.name: ModalityModel(m, 4).eval() for m in spec.modalities}
    fus = FusionModel(3, 4, 10).eval()
    have = ["eye", "wide"]  # the client lacks "tactile"
    rt = model_set_runtime(spec, {k: state_to_numpy(mods[k]) for k in have}, state_to_numpy(fus), 10)
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal((7, 6, *spec[k].feature_shape), dtype=np.float32) for k in have}
    probs, mask = rt.modality_probs(x)
    assert mask.tolist() == [True, False, True]
    assert np.all(probs[:, 1] == 0)
    with torch.no_grad():
        tp = torch.zeros(7, 3, 4)
        for k in have:
            tp[:, spec.index(k)] = mods[k](torch.from_numpy(x[k])).exp()
        want = fus(tp, torch.tensor(mask, dtype=torch.float32).expand(7, 3)).exp().numpy()
    got = rt.predict(x)
    assert got.shape == (7, 4)
    assert np.abs(got - want).max() <= TOLERANCE
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
    with pytest.raises(PayloadError, match="unknown modalities"):
        model_set_onnx(spec, {"nope": {}}, None)
