"""The edge runtime runs in a process where `import torch` (and `import onnx`) fail."""

import subprocess
import sys
import textwrap

import numpy as np
import torch

from fedmfs.core import shapley as ref
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.runtime.graphs import model_set_onnx
from fedmfs.core.runtime.modelset import write_model_set
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy

CHILD = textwrap.dedent("""
    import sys

    class Blocker:
        # refuse the training stack: the device install has neither torch nor onnx
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "onnx"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    try:
        import torch  # noqa: F401
        raise SystemExit("torch import was not blocked")
    except ImportError:
        pass
    import numpy as np
    from fedmfs.core.runtime.modelset import load_model_set

    d = sys.argv[1]
    with np.load(d + "/inputs.npz", allow_pickle=False) as z:
        arrays = dict(z.items())
    x = {k[2:]: v for k, v in arrays.items() if k.startswith("x_")}
    bg = {k[3:]: v for k, v in arrays.items() if k.startswith("bg_")}
    rt = load_model_set(d + "/set", threads=1)
    pred = rt.predict(x)
    px, mask = rt.modality_probs(x)
    pb, _ = rt.modality_probs(bg)
    prob = rt.shapley(x, bg)
    ll = rt.shapley(x, bg, kind="loglik", y=arrays["y"])
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))
    np.savez(d + "/out.npz", pred=pred, px=px, pb=pb, mask=mask, phi=prob.phi, scores=prob.scores, phi_ll=ll.phi)
    print("LOADED", ",".join(bad) or "none")
""")


def test_runtime_without_torch(tmp_path):
    spec = DatasetSpec((ModalitySpec("eye", (2,), hidden=6), ModalitySpec("emg", (3, 2), hidden=5),
                        ModalitySpec("tactile", (4,), hidden=4)), 4, 5)
    have = ["eye", "emg"]
    torch.manual_seed(0)
    mods = {k: ModalityModel(spec[k], 4).eval() for k in have}
    fus = FusionModel(3, 4, 8).eval()
    for p in fus.parameters():
        p.data.mul_(3.0)
    m, f, c = model_set_onnx(spec, {k: state_to_numpy(v) for k, v in mods.items()}, state_to_numpy(fus))
    write_model_set(tmp_path / "set", spec, m, f, c)
    rng = np.random.default_rng(0)
    x = {k: rng.standard_normal((6, 5, *spec[k].feature_shape), dtype=np.float32) for k in have}
    bg = {k: rng.standard_normal((4, 5, *spec[k].feature_shape), dtype=np.float32) for k in have}
    y = np.array([0, 1, 2, 3, 0, 1])
    np.savez(tmp_path / "inputs.npz", y=y, **{f"x_{k}": v for k, v in x.items()},
             **{f"bg_{k}": v for k, v in bg.items()})
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED none" in proc.stdout
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
        out = dict(z.items())
    # predictions: the PyTorch pipeline
    with torch.no_grad():
        tp = torch.zeros(6, 3, 4)
        for k in have:
            tp[:, spec.index(k)] = mods[k](torch.from_numpy(x[k])).exp()
        want = fus(tp, torch.tensor([[1.0, 1.0, 0.0]]).expand(6, 3)).exp().numpy()
    assert out["mask"].tolist() == [True, True, False]
    assert np.abs(out["pred"] - want).max() <= 1e-5
    # Shapley values: the numpy reference with the PyTorch fusion model as value function
    def fuse(p, mk):
        with torch.no_grad():
            return fus(torch.tensor(p), torch.tensor(mk)).exp().numpy()

    for kind, key in (("prob", "phi"), ("loglik", "phi_ll")):
        phi = ref.exact_shapley(fuse, out["px"], out["pb"], out["mask"], kind, y if kind == "loglik" else None)
        assert np.abs(out[key] - phi).max() <= 1e-5
        assert np.abs(phi[:, :2]).max() > 1e-3
    np.testing.assert_allclose(out["scores"], ref.modality_scores(out["phi"]))
