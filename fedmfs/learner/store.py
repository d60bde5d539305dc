"""A learner's files: local models, fusion model and upload history, written atomically.

Layout of the directory (the edge daemon's ``client/``)::

    local_<modality>.safetensors   each local modality model
    fusion.safetensors             the personalised fusion model (after Stage #2)
    client.json                    upload history, the globals each model last started from, TrainConfig

Only files this process wrote are read back, and as safetensors (never pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from safetensors.numpy import save as st_save

from fedmfs.core.fsio import atomic_write
from fedmfs.learner.learner import Learner
from fedmfs.learner.models import FusionModel, numpy_to_state, state_to_numpy

__all__ = ["save_learner", "restore_learner"]


def save_learner(learner: Learner, directory: str | os.PathLike) -> None:
    """Local models, fusion and history as safetensors + JSON (each file written atomically)."""
    d = Path(directory)
    for m in learner.present:
        atomic_write(d / f"local_{m}.safetensors", st_save(state_to_numpy(learner.models[m])))
    if learner.fusion is not None:
        atomic_write(d / "fusion.safetensors", st_save(state_to_numpy(learner.fusion)))
    atomic_write(d / "client.json", json.dumps({
        "last_upload": learner.history.last_upload, "synced": learner.history.synced,
        "scores": learner.history.scores, "idle_since": learner.history.idle_since,
        "config": asdict(learner.config)}).encode())


def restore_learner(learner: Learner, directory: str | os.PathLike,
                    globals: dict[str, dict[str, np.ndarray]] | None = None) -> None:
    """Reload what :func:`save_learner` wrote (missing files are simply not restored)."""
    d = Path(directory)
    for m in learner.present:
        p = d / f"local_{m}.safetensors"
        if p.exists():
            numpy_to_state(learner.models[m], load_file(str(p)))
    p = d / "client.json"
    if p.exists():
        saved = json.loads(p.read_text())
        learner.history.last_upload = {k: int(v) for k, v in saved["last_upload"].items()}
        learner.history.synced = {k: str(v) for k, v in saved.get("synced", {}).items()}
        learner.history.scores = {k: float(v) for k, v in saved.get("scores", {}).items()}
        learner.history.idle_since = {k: int(v) for k, v in saved.get("idle_since", {}).items()}
    p = d / "fusion.safetensors"
    if p.exists():
        f = FusionModel(len(learner.spec.names), learner.spec.num_classes, learner.config.fusion_hidden)
        numpy_to_state(f, load_file(str(p)))
        f.eval()
        learner.fusion = f
        learner.deployed = learner.deployed_models(globals or {})
