"""fedmfs-export end to end on a tmp saved model set and fleet; quantisation sizes and accuracy."""

import re

import numpy as np
import pytest
import torch

from fedmfs.core.data.format import ClientData, Fleet, save_fleet
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.runtime.graphs import model_set_onnx
from fedmfs.core.runtime.modelset import load_model_set, read_manifest
from fedmfs.export.cli import main
from fedmfs.export.quantize import quantization_report, quantize_model_set, to_fp16
from fedmfs.export.statedir import StateSet, save_state_set
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy

SPEC = DatasetSpec((ModalitySpec("eye", (2,), hidden=8), ModalitySpec("tactile", (6, 6), hidden=16)), 3, 5)


@pytest.fixture()
def state_set(tmp_path):
    torch.manual_seed(0)
    mods = {m.name: ModalityModel(m, 3).eval() for m in SPEC.modalities}
    fus = FusionModel(2, 3, 6).eval()
    st = StateSet(SPEC, {k: state_to_numpy(v) for k, v in mods.items()}, state_to_numpy(fus), 6, {"eye": 4})
    save_state_set(tmp_path / "models", st)
    rng = np.random.default_rng(0)
    n = 12
    client = ClientData("s01", {m.name: rng.standard_normal((n, 5, *m.feature_shape), dtype=np.float32)
                                for m in SPEC.modalities}, rng.integers(0, 3, n), np.arange(n) < 4)
    save_fleet(Fleet(SPEC, [client]), tmp_path / "fleet")
    return tmp_path, mods, fus, client


def test_cli_exports_verifies_and_writes_a_loadable_set(state_set, capsys):
    tmp, mods, fus, client = state_set
    assert main([str(tmp / "models"), "-o", str(tmp / "onnx"), "--data", str(tmp / "fleet"), "--client", "s01"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): (float(m.group(2)), m.group(3)) for m in
            re.finditer(r"^(\w+)\s+([0-9.e+-]+)\s+(\S+)$", out, re.MULTILINE) if m.group(1) != "model"}
    assert set(rows) == {"eye", "tactile", "fusion", "coalitions"}
    assert all(d <= 1e-5 for d, _ in rows.values())
    assert float(rows["tactile"][1]) <= 1e-5  # real-input diff printed for the modality models
    assert "test accuracy (8 windows)" in out
    man = read_manifest(tmp / "onnx")
    assert man.modalities["eye"].version == 4 and man.coalitions is not None
    x, _ = client.split(train=False)
    with torch.no_grad():
        tp = torch.stack([mods[m.name](torch.from_numpy(x[m.name])).exp() for m in SPEC.modalities], 1)
        want = fus(tp, torch.ones(8, 2)).exp().numpy()
    assert np.abs(load_model_set(tmp / "onnx").predict(x) - want).max() <= 1e-5


# int8 quantises the modality models only (the fusion graphs stay fp32 by policy, export/quantize.py); the
# coalition graph's Shapley roles (issue 16) add a fixed ~2 KB of fp32 that weighs on this toy set (0.616)
@pytest.mark.parametrize("how,ratio", [("fp16", 0.7), ("int8", 0.66)])
def test_cli_quantize(state_set, capsys, how, ratio):
    tmp, *_ = state_set
    assert main([str(tmp / "models"), "-o", str(tmp / how), "--quantize", how, "--data", str(tmp / "fleet"),
                 "--client", "s01"]) == 0
    out = capsys.readouterr().out
    m = re.search(rf"{how}: (\d+) -> (\d+) bytes", out)
    assert m and int(m.group(2)) < ratio * int(m.group(1))
    assert re.search(rf"fp32 [01]\.\d{{4}} -> {how} [01]\.\d{{4}} \(change [+-]\d\.\d{{4}}\)", out)
    man = read_manifest(tmp / how)
    assert man.modalities["tactile"].codec == how
    assert load_model_set(tmp / how).predict({"eye": np.zeros((1, 5, 2), np.float32)}).shape == (1, 3)


def test_cli_errors(state_set, capsys, tmp_path):
    tmp, *_ = state_set
    assert main([str(tmp / "models"), "-o", str(tmp / "x"), "--data", str(tmp / "fleet")]) == 2
    assert "--data needs --client" in capsys.readouterr().err
    assert main([str(tmp / "models"), "-o", str(tmp / "x"), "--data", str(tmp / "fleet"), "--client", "zz"]) == 2
    (tmp / "models" / "eye.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{broken}")
    assert main([str(tmp / "models"), "-o", str(tmp / "x")]) == 4
    assert "not a safetensors file" in capsys.readouterr().err
    assert main([str(tmp_path / "nothing"), "-o", str(tmp / "x")]) == 4
    assert not (tmp / "x").exists()


def test_quantization_report_values():
    torch.manual_seed(1)
    mods = {m.name: state_to_numpy(ModalityModel(m, 3)) for m in SPEC.modalities}
    fp32 = model_set_onnx(SPEC, mods, state_to_numpy(FusionModel(2, 3, 6)))
    q = quantize_model_set(*fp32, "int8")
    assert q[1] is fp32[1] and q[2] is fp32[2]  # fusion graphs stay fp32 under int8
    rng = np.random.default_rng(2)
    x = {m.name: rng.standard_normal((9, 5, *m.feature_shape), dtype=np.float32) for m in SPEC.modalities}
    rep = quantization_report(SPEC, fp32, q, "int8", x, rng.integers(0, 3, 9))
    assert rep.sizes_fp32["tactile.onnx"] == len(fp32[0]["tactile"]) and rep.sizes["tactile.onnx"] == len(q[0]["tactile"])
    assert 0 < rep.max_prob_diff < 0.05 and abs(rep.accuracy_change) <= 1.0
    assert rep.total < rep.total_fp32
    half = to_fp16(fp32[0]["tactile"])
    assert len(half) < 0.6 * len(fp32[0]["tactile"])
