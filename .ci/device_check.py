"""Run inside the inference-only environment (the base install, no torch): the Shapley engine on
the model set .ci/device_fixture.py made, with the ONNX Runtime alone.

    python .ci/device_check.py MODEL_DIR WINDOWS_NPZ
"""

import sys

import numpy as np

try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("torch is importable in the device environment: the check would prove nothing")

from fedmfs.core.runtime.modelset import load_model_set

rt = load_model_set(sys.argv[1])
with np.load(sys.argv[2], allow_pickle=False) as z:
    x = {k[2:]: z[k] for k in z.files if k.startswith("x_") and k[2:] in rt.modalities}
    y = z["y"]
xs = {k: v[:8] for k, v in x.items()}
res = rt.shapley(xs, xs, kind="loglik", y=y[:8])
assert res.scores.shape == (len(rt.spec.names),) and np.isfinite(res.scores).all()
assert "torch" not in sys.modules
print("device Shapley engine without torch:", {m: round(float(s), 4) for m, s in zip(rt.spec.names, res.scores)})
