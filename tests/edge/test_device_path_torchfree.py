"""The device's path needs no torch: its config loaders and CLIs import, and `fedmfs-edge predict
--config edge.toml` runs, in a process where `import torch` fails (an inference-only install).

Issue 7 found `fedmfs.edge.config` -> `fedmfs.config` -> the learner -> torch: this test failed then.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.runtime.graphs import model_set_onnx
from fedmfs.core.runtime.modelset import write_model_set
from fedmfs.learner.models import FusionModel, ModalityModel, state_to_numpy
from fedmfs.sim.config import SimConfig
from fedmfs.sim.processes import write_fleet_configs

DEVICE_PATH = [
    "fedmfs.core.config", "fedmfs.core.settings", "fedmfs.core.selection", "fedmfs.core.wire",
    "fedmfs.core.runtime.sessions", "fedmfs.core.runtime.modelset", "fedmfs.core.runtime.coalitions",
    "fedmfs.core.runtime.scoring", "fedmfs.core.runtime.memory",
    "fedmfs.adapters.mqtt", "fedmfs.adapters.sdnotify",
    "fedmfs.edge.config", "fedmfs.edge.cli", "fedmfs.edge.machine", "fedmfs.edge.uploads", "fedmfs.edge.worker",
    "fedmfs.edge.daemon",
    "fedmfs.coordinator.config", "fedmfs.coordinator.cli", "fedmfs.coordinator.machine",
    "fedmfs.coordinator.ledger", "fedmfs.coordinator.writer", "fedmfs.coordinator.service",
]

CHILD = textwrap.dedent("""
    import importlib, json, sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
    modules, edge_toml, coord_toml, windows = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    for m in modules:
        importlib.import_module(m)
    from fedmfs.edge.cli import main
    rc = main(["predict", "--config", edge_toml, "--input", windows, "--json"])
    assert rc == 0, rc
    # the coordinator's torch-less fallback: no initial globals, devices start from their own
    from fedmfs.coordinator.config import load_coordinator_config
    from fedmfs.coordinator.service import CoordinatorService
    svc = CoordinatorService(load_coordinator_config(coord_toml))
    assert svc.machine.globals == {}, svc.machine.globals
    svc.ledger.close()
    print("TORCH", "torch" in sys.modules, file=sys.stderr)
""")


def test_device_path_imports_and_predicts_without_torch(tmp_path):
    f = make_synthetic("small", 0)
    fleet = type(f)(f.spec, [f.clients[6]], f.metadata)     # S07: no tactile modalities
    files = write_fleet_configs(fleet, SimConfig(), tmp_path, "mqtt://127.0.0.1:1", "lab")
    name = fleet.clients[0].name
    spec, have = fleet.spec, fleet.clients[0].modalities
    torch.manual_seed(0)
    mods = {k: state_to_numpy(ModalityModel(spec[k], spec.num_classes)) for k in have}
    fusion = state_to_numpy(FusionModel(len(spec.names), spec.num_classes, 64))
    write_model_set(tmp_path / "edge" / name / "model", spec, *model_set_onnx(spec, mods, fusion))
    windows = tmp_path / "data" / f"{name}.npz"
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(DEVICE_PATH), str(files["edges"][name]),
                           str(files["coordinator"]), str(windows)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH False" in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(windows) as z:
        n = len(z["y"])
    assert len(out["predictions"]) == n and np.allclose(np.sum(out["probabilities"], 1), 1.0, atol=1e-4)
