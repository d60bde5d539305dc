"""Saved model sets (the exporter's input): PyTorch state_dict arrays as safetensors + the spec.

Layout::

    spec.json                 {"format": "fedmfs-state-set", "version": 1, "spec": {...DatasetSpec...},
                               "fusion_hidden": 64 | null, "versions": {"eye": 3, ...}}
    <modality>.safetensors    ModalityModel state_dict (lstm.weight_ih_l0, ..., head.bias), float32
    fusion.safetensors        FusionModel state_dict (net.0.weight, ..., net.2.bias), optional

Names follow :mod:`fedmfs.learner.models` so ``state_to_numpy(model)`` can be saved as is. numpy +
safetensors only (never pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedmfs.core.errors import PayloadError
from fedmfs.core.fsio import atomic_write, read_spec_document
from fedmfs.core.modality import DatasetSpec

__all__ = ["StateSet", "save_state_set", "load_state_set", "STATESET_FORMAT", "STATESET_VERSION"]

STATESET_FORMAT = "fedmfs-state-set"
STATESET_VERSION = 1
SPEC_FILE = "spec.json"
FUSION_FILE = "fusion.safetensors"


@dataclass(frozen=True, slots=True)
class StateSet:
    """A device's (or the coordinator's) model weights with the spec they belong to."""

    spec: DatasetSpec
    modality_states: dict[str, dict[str, np.ndarray]]
    fusion_state: dict[str, np.ndarray] | None = None
    fusion_hidden: int | None = None
    versions: dict[str, int] = field(default_factory=dict)


def save_state_set(directory: str | os.PathLike, states: StateSet) -> Path:
    """Write a :class:`StateSet` (each file atomically, spec.json last)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(states.modality_states) - set(states.spec.names))
    if unknown:
        raise PayloadError(f"states for unknown modalities {unknown}")
    for name, st in states.modality_states.items():
        atomic_write(d / f"{name}.safetensors",
                      st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in st.items()}))
    hidden = states.fusion_hidden
    if states.fusion_state is not None:
        atomic_write(d / FUSION_FILE,
                      st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in states.fusion_state.items()}))
        hidden = hidden or int(np.shape(states.fusion_state["net.0.weight"])[0])
    doc = {"format": STATESET_FORMAT, "version": STATESET_VERSION, "spec": states.spec.to_dict(),
           "fusion_hidden": hidden, "versions": dict(states.versions)}
    atomic_write(d / SPEC_FILE, (json.dumps(doc, indent=2) + "\n").encode())
    return d


def _load_st(p: Path) -> dict[str, np.ndarray]:
    try:
        return dict(st_load(p.read_bytes()))
    except OSError as e:
        raise PayloadError(f"{p}: unreadable: {e}") from e
    except Exception as e:  # safetensors raises SafetensorError on malformed bytes
        raise PayloadError(f"{p}: not a safetensors file: {e}") from e


def load_state_set(directory: str | os.PathLike) -> StateSet:
    """Read a state set; modality files present define which modalities the set has."""
    d = Path(directory)
    doc, spec = read_spec_document(d / SPEC_FILE, STATESET_FORMAT, STATESET_VERSION, PayloadError,
                                   "a saved model set")
    mods = {m: _load_st(d / f"{m}.safetensors") for m in spec.names if (d / f"{m}.safetensors").is_file()}
    if not mods:
        raise PayloadError(f"{d}: no <modality>.safetensors file for any of {list(spec.names)}")
    fusion = _load_st(d / FUSION_FILE) if (d / FUSION_FILE).is_file() else None
    hidden = doc.get("fusion_hidden")
    versions = doc.get("versions") or {}
    if not isinstance(versions, dict):
        raise PayloadError(f"{d / SPEC_FILE}: 'versions' must be an object")
    return StateSet(spec, mods, fusion, int(hidden) if hidden is not None else None,
                    {str(k): int(v) for k, v in versions.items()})
