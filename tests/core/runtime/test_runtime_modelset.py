"""Model-set directories: atomic writes, manifest checks that name every problem."""

import json

import numpy as np
import pytest
import torch

from fedmfs.core.errors import ManifestError, PayloadError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.runtime.graphs import model_set_onnx
from fedmfs.core.runtime.modelset import (
    MANIFEST,
    check_model_set,
    load_model_set,
    read_manifest,
    write_model_set,
)
from fedmfs.core.runtime.sessions import EdgeRuntime
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy

SPEC = DatasetSpec((ModalitySpec("eye", (2,), hidden=4), ModalitySpec("emg", (3,), hidden=4),
                    ModalitySpec("xsens", (2, 2), hidden=4)), 3, 4)


@pytest.fixture(scope="module")
def artefacts():
    torch.manual_seed(0)
    mods = {m.name: state_to_numpy(ModalityModel(m, 3)) for m in SPEC.modalities}
    return model_set_onnx(SPEC, mods, state_to_numpy(FusionModel(3, 3, 5)))


def _x(n=3):
    rng = np.random.default_rng(0)
    return {m.name: rng.standard_normal((n, 4, *m.feature_shape), dtype=np.float32) for m in SPEC.modalities}


def test_roundtrip(tmp_path, artefacts):
    m, f, c = artefacts
    d = write_model_set(tmp_path / "set", SPEC, m, f, c, versions={"eye": 3, "fusion": 2}, codecs={"emg": "fp16"})
    man = read_manifest(d)
    assert man.spec == SPEC and set(man.modalities) == {"eye", "emg", "xsens"}
    assert man.modalities["eye"].version == 3 and man.fusion.version == 2 and man.modalities["emg"].codec == "fp16"
    assert man.modalities["xsens"].bytes == len(m["xsens"])
    rt = load_model_set(d)
    assert rt.has_coalition_graph and rt.modalities == ("eye", "emg", "xsens")
    np.testing.assert_array_equal(rt.predict(_x()), EdgeRuntime(SPEC, m, f).predict(_x()))
    assert not list(d.glob("*.tmp"))


def test_rewrite_removes_stale_files(tmp_path, artefacts):
    m, f, c = artefacts
    d = write_model_set(tmp_path, SPEC, m, f, c)
    write_model_set(tmp_path, SPEC, {"eye": m["eye"]}, f)
    assert sorted(p.name for p in d.glob("*.onnx")) == ["eye.onnx", "fusion.onnx"]
    rt = load_model_set(d)
    assert rt.modalities == ("eye",) and not rt.has_coalition_graph


def test_every_problem_is_listed(tmp_path, artefacts):
    m, f, c = artefacts
    d = write_model_set(tmp_path, SPEC, m, f, c)
    (d / "emg.onnx").unlink()
    (d / "fusion.onnx").write_bytes(f + b"\0")
    data = bytearray((d / "xsens.onnx").read_bytes())
    data[-1] ^= 1
    (d / "xsens.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError) as e:
        check_model_set(d)
    msg = str(e.value)
    assert "modality emg: emg.onnx is missing" in msg
    assert f"fusion: fusion.onnx has {len(f) + 1} bytes, the manifest says {len(f)}" in msg
    assert "modality xsens: xsens.onnx sha256" in msg and "does not match" in msg
    assert "eye" not in msg and "coalitions" not in msg


def test_bad_manifests(tmp_path, artefacts):
    m, f, c = artefacts
    with pytest.raises(ManifestError, match="manifest.json is missing"):
        load_model_set(tmp_path)
    d = write_model_set(tmp_path, SPEC, m, f, c)
    doc = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(ManifestError, match="invalid JSON"):
        load_model_set(d)
    for change, pattern in [
        (lambda z: z.update(version=99), "unsupported version 99"),
        (lambda z: z.update(format="other"), "'format' must be"),
        (lambda z: z["modalities"].update(gps=z["modalities"]["eye"]), "modality 'gps' is not in the spec"),
        (lambda z: z["modalities"]["eye"].update(file="../eye.onnx"), "plain '\\*.onnx' name"),
        (lambda z: z["modalities"]["emg"].pop("sha256"), "modality 'emg': entry needs"),
        (lambda z: z.pop("spec"), "bad or missing 'spec'"),
    ]:
        z = json.loads(json.dumps(doc))
        change(z)
        (d / MANIFEST).write_text(json.dumps(z))
        with pytest.raises(ManifestError, match=pattern):
            load_model_set(d)


def test_runtime_refuses_foreign_models(artefacts):
    m, f, c = artefacts
    with pytest.raises(PayloadError, match="not a loadable ONNX model"):
        EdgeRuntime(SPEC, {"eye": b"garbage"})
    with pytest.raises(PayloadError, match="does not fit the dataset spec"):
        EdgeRuntime(SPEC, {"eye": m["emg"]})  # emg's graph under eye's name: wrong input name/shape
    with pytest.raises(PayloadError, match="fusion model does not fit"):
        EdgeRuntime(SPEC, m, m["eye"])
    with pytest.raises(ManifestError, match="unknown modalities"):
        EdgeRuntime(SPEC, {"gps": m["eye"]})
    with pytest.raises(ManifestError, match="without its fusion model"):
        write_model_set("/nonexistent-never-written", SPEC, m, None, c)
