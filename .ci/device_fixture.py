"""Make what the inference-only device check of .ci/run needs: a one-client fleet's configs, its
windows, and a personalised ONNX model set in the device's state directory (written with the
training stack, which the device's own environment does not have).

    python3 .ci/device_fixture.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.runtime.graphs import model_set_onnx, personalised_model_onnx
from fedmfs.core.runtime.modelset import write_model_set
from fedmfs.learner.models import FusionModel, initial_globals, state_to_numpy
from fedmfs.sim.config import SimConfig
from fedmfs.sim.processes import write_fleet_configs


def main(out: Path) -> None:
    f = make_synthetic("small", 0)
    fleet = Fleet(f.spec, [f.clients[0]], f.metadata)
    files = write_fleet_configs(fleet, SimConfig(), out, "mqtt://127.0.0.1:1883", "ci")
    name, spec = fleet.clients[0].name, fleet.spec
    mods = {m: s for m, s in initial_globals(spec, 0).items() if m in fleet.clients[0].modalities}
    torch.manual_seed(0)
    fusion = state_to_numpy(FusionModel(len(spec.names), spec.num_classes, 64))
    models, fus, coal = model_set_onnx(spec, mods, fusion)
    write_model_set(out / "edge" / name / "model", spec, models, fus, coal,
                    personalised_model=personalised_model_onnx(spec, mods, fusion, 64))
    print(files["edges"][name])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
