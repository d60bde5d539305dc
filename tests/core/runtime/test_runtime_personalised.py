"""The one-graph personalised model equals the separate graphs; chunked modality runs change nothing."""

import numpy as np
import pytest
import torch

from fedmfs.core.errors import ManifestError, PayloadError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.runtime.graphs import (
    model_set_onnx,
    model_set_runtime,
    personalised_model_onnx,
)
from fedmfs.core.runtime.modelset import load_model_set, read_manifest, write_model_set
from fedmfs.core.runtime.sessions import EdgeRuntime
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy

SPEC = DatasetSpec((ModalitySpec("eye", (2,), hidden=4), ModalitySpec("emg", (3,), hidden=5),
                    ModalitySpec("tactile", (2, 3), hidden=4), ModalitySpec("xsens", (4,), hidden=3)), 3, 6)


def _states(have, seed=0):
    torch.manual_seed(seed)
    mods = {k: state_to_numpy(ModalityModel(SPEC[k], 3)) for k in have}
    fus = FusionModel(len(SPEC.modalities), 3, 7)
    for p in fus.parameters():
        p.data.mul_(3.0)  # sharp enough that a wrong mask or column would show
    return mods, state_to_numpy(fus)


def _x(have, n, seed=1):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((n, SPEC.steps, *SPEC[k].feature_shape), dtype=np.float32) for k in have}


@pytest.mark.parametrize("have", [("eye", "emg", "tactile", "xsens"), ("emg", "xsens"), ("tactile",)])
def test_one_graph_equals_separate_graphs(have):
    mods, fus = _states(have)
    models, fusion, _ = model_set_onnx(SPEC, mods, fus)
    one = EdgeRuntime(SPEC, models, fusion, personalised_model=personalised_model_onnx(SPEC, mods, fus))
    sep = EdgeRuntime(SPEC, models, fusion)
    assert one.personalised_modalities == tuple(k for k in SPEC.names if k in have)
    assert sep.personalised_modalities == ()
    for n in (1, 4):
        x = _x(have, n)
        got = one._predict_one_graph(x)  # the one-graph path itself, not the fallback
        assert got is not None and got.shape == (n, 3)
        want = sep.predict(x)
        assert np.abs(got - want).max() <= 1e-5
        if n > 1:
            assert np.abs(want - want.mean(0)).max() > 1e-3  # rows differ: the comparison has teeth
        np.testing.assert_array_equal(one.predict(x), got)


def test_one_graph_matches_torch():
    have = SPEC.names
    torch.manual_seed(0)
    tm = {k: ModalityModel(SPEC[k], 3).eval() for k in have}
    tf = FusionModel(len(have), 3, 7).eval()
    mods = {k: state_to_numpy(v) for k, v in tm.items()}
    rt = EdgeRuntime(SPEC, {}, None, personalised_model=personalised_model_onnx(SPEC, mods, state_to_numpy(tf)))
    x = _x(have, 3)
    with torch.no_grad():
        p = torch.stack([tm[k](torch.from_numpy(x[k])).exp() for k in have], 1)
        want = tf(p, torch.ones(3, len(have))).exp().numpy()
    assert np.abs(rt.predict(x) - want).max() <= 1e-5


def test_large_batches_and_other_modality_sets_fall_back():
    have = SPEC.names
    mods, fus = _states(have)
    rt = model_set_runtime(SPEC, mods, fus, input_chunk_elements=200)
    sep = EdgeRuntime(SPEC, *model_set_onnx(SPEC, mods, fus)[:2], input_chunk_elements=200)
    assert rt.personalised_modalities == have
    x = _x(have, 9)  # 9 rows x 6 steps x 15 features > 200: chunked per-modality path
    assert rt._predict_one_graph(x) is None
    np.testing.assert_array_equal(rt.predict(x), sep.predict(x))
    sub = {k: x[k] for k in ("eye", "xsens")}  # a subset: mask differs, the one graph does not apply
    np.testing.assert_array_equal(rt.predict(sub), sep.predict(sub))


def test_row_chunks_do_not_change_results():
    have = SPEC.names
    mods, fus = _states(have)
    models, fusion, coal = model_set_onnx(SPEC, mods, fus)
    x, bg = _x(have, 7), _x(have, 5, seed=2)
    big = EdgeRuntime(SPEC, models, fusion, coalition_model=coal, input_chunk_elements=1 << 30)
    small = EdgeRuntime(SPEC, models, fusion, coalition_model=coal, input_chunk_elements=1)
    assert small._rows_per_call("tactile") == 1 and big._rows_per_call("tactile") >= 7
    p_big, m_big = big.modality_probs(x)
    p_small, m_small = small.modality_probs(x)
    assert np.abs(p_big - p_small).max() <= 1e-6 and (m_big == m_small).all()
    assert np.abs(big.shapley(x, bg).phi - small.shapley(x, bg).phi).max() <= 1e-6


def test_model_set_with_personalised_graph(tmp_path):
    have = ("eye", "tactile")
    mods, fus = _states(have)
    m, f, c = model_set_onnx(SPEC, mods, fus)
    pers = personalised_model_onnx(SPEC, mods, fus)
    d = write_model_set(tmp_path / "set", SPEC, m, f, c, personalised_model=pers, versions={"personalised": 4})
    man = read_manifest(d)
    assert man.personalised.file == "personalised.onnx" and man.personalised.version == 4
    rt = load_model_set(d)
    assert rt.personalised_modalities == have
    x = _x(have, 2)
    assert np.abs(rt.predict(x) - EdgeRuntime(SPEC, m, f).predict(x)).max() <= 1e-5
    # rewritten without it: the file goes, the runtime falls back
    write_model_set(d, SPEC, m, f, c)
    assert not (d / "personalised.onnx").exists() and load_model_set(d).personalised_modalities == ()
    # a tampered file is named
    write_model_set(d, SPEC, m, f, c, personalised_model=pers)
    (d / "personalised.onnx").write_bytes(pers[:-1] + bytes([pers[-1] ^ 1]))
    with pytest.raises(ManifestError, match="personalised: personalised.onnx sha256"):
        load_model_set(d)
    with pytest.raises(ManifestError, match="without its fusion model"):
        write_model_set(tmp_path / "bad", SPEC, m, None, None, personalised_model=pers)


def test_foreign_graph_as_personalised_is_refused():
    mods, fus = _states(SPEC.names)
    m, f, c = model_set_onnx(SPEC, mods, fus)
    with pytest.raises(PayloadError, match="personalised model"):
        EdgeRuntime(SPEC, m, f, personalised_model=f)  # the fusion graph: inputs probs/mask
    with pytest.raises(PayloadError, match="unknown modalities"):
        personalised_model_onnx(SPEC, {"gps": mods["eye"]}, fus)
    with pytest.raises(PayloadError, match="at least one"):
        personalised_model_onnx(SPEC, {}, fus)


def test_one_graph_fast_path_checks_what_the_slow_path_checks():
    from fedmfs.core.errors import DataError
    have = SPEC.names
    mods, fus = _states(have)
    rt = model_set_runtime(SPEC, mods, fus, 7)
    x = _x(have, 2)
    want = rt.predict(x)
    # float64 and non-contiguous inputs take the checked path and give the same function
    x64 = {k: v.astype(np.float64) for k, v in x.items()}
    np.testing.assert_allclose(rt.predict(x64), want, atol=1e-6)
    xf = {k: np.asfortranarray(v) for k, v in x.items()}
    np.testing.assert_array_equal(rt.predict(xf), want)
    bad = dict(x, tactile=x["tactile"].copy())
    bad["tactile"][1, 2, 0, 1] = np.nan
    with pytest.raises(DataError, match="tactile has NaN"):
        rt.predict(bad)
    with pytest.raises(DataError, match="emg has 3 samples"):
        rt.predict(dict(x, emg=_x(("emg",), 3)["emg"]))
    with pytest.raises(DataError, match="xsens must have shape"):
        rt.predict(dict(x, xsens=x["xsens"][:, :, :2]))


@pytest.mark.parametrize("mode", ["r", "c"])
def test_memory_mapped_inputs_give_the_same_values(tmp_path, mode):
    """Windows spooled on disk and mapped (np.load mmap_mode): read chunk by chunk, the used pages
    of a read-only map dropped; a copy-on-write map keeps its private edits."""
    have = SPEC.names
    mods, fus = _states(have)
    models, fusion, coalition = model_set_onnx(SPEC, mods, fus)
    # tiny chunks: many calls per modality, so pages are dropped between calls
    rt = EdgeRuntime(SPEC, models, fusion, coalition_model=coalition, input_chunk_elements=64,
                     personalised_model=personalised_model_onnx(SPEC, mods, fus))
    x, bg = _x(have, 9), _x(have, 7, seed=2)
    for k in have:
        np.save(tmp_path / f"x_{k}.npy", x[k])
        np.save(tmp_path / f"bg_{k}.npy", bg[k])
    xm = {k: np.load(tmp_path / f"x_{k}.npy", mmap_mode=mode, allow_pickle=False) for k in have}
    bm = {k: np.load(tmp_path / f"bg_{k}.npy", mmap_mode=mode, allow_pickle=False) for k in have}
    if mode == "c":  # private edits, not in the file: dropping pages would lose them
        xm["tactile"][0] += 1.0
        x["tactile"][0] += 1.0
    assert isinstance(xm["tactile"], np.memmap)
    np.testing.assert_array_equal(rt.predict(xm), rt.predict(x))
    got, want = rt.shapley(xm, bm), rt.shapley(x, bg)
    np.testing.assert_array_equal(got.phi, want.phi)
    assert np.abs(want.phi).max() > 1e-4
    np.testing.assert_array_equal(xm["tactile"], x["tactile"])  # still readable after the drops
