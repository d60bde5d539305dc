"""Modality specs: one declaration per modality; shapes, ONNX names and wire names derive from it."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedmfs.core.errors import ConfigError

__all__ = ["ACTIONSENSE_MODALITIES", "UCIHAR_MODALITIES", "DatasetSpec", "ModalitySpec", "load_spec"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True, slots=True)
class ModalitySpec:
    """One sensor modality: its name, the shape of one time step, and its model's config."""

    name: str
    feature_shape: tuple[int, ...]
    hidden: int = 64

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(
                f"modality name {self.name!r} must match {_NAME.pattern} (lower case, digits, '_'),"
                " because it is used in MQTT topics, file names and ONNX tensor names"
            )
        if not self.feature_shape or any(int(d) <= 0 for d in self.feature_shape):
            raise ValueError(f"modality {self.name!r}: feature_shape must be positive, got {self.feature_shape}")
        if self.hidden <= 0:
            raise ValueError(f"modality {self.name!r}: hidden must be positive, got {self.hidden}")

    @property
    def features(self) -> int:
        """Features per time step once the step is flattened."""
        return math.prod(self.feature_shape)

    @property
    def onnx_input(self) -> str:
        return f"{self.name}_x"

    @property
    def onnx_output(self) -> str:
        return f"{self.name}_logp"

    def with_hidden(self, hidden: int) -> ModalitySpec:
        return ModalitySpec(self.name, self.feature_shape, hidden)

    def to_dict(self) -> dict:
        return {"name": self.name, "feature_shape": list(self.feature_shape), "hidden": self.hidden}

    @classmethod
    def from_dict(cls, d: dict) -> ModalitySpec:
        try:
            return cls(str(d["name"]), tuple(int(x) for x in d["feature_shape"]), int(d.get("hidden", 64)))
        except KeyError as e:
            raise ValueError(f"modality spec is missing key {e.args[0]!r}: {d!r}") from e


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    """The modalities of a fleet, in their canonical order, the number of classes and time steps."""

    modalities: tuple[ModalitySpec, ...]
    num_classes: int
    steps: int
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate modality names: {names}")
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError("class_names must have num_classes entries")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def __getitem__(self, name: str) -> ModalitySpec:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"unknown modality {name!r}; known: {', '.join(self.names)}")

    def index(self, name: str) -> int:
        return self.names.index(name)

    def with_hidden(self, hidden: int) -> DatasetSpec:
        return DatasetSpec(tuple(m.with_hidden(hidden) for m in self.modalities), self.num_classes,
                           self.steps, self.class_names)

    def to_dict(self) -> dict:
        return {
            "modalities": [m.to_dict() for m in self.modalities],
            "num_classes": self.num_classes,
            "steps": self.steps,
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, d: dict) -> DatasetSpec:
        try:
            return cls(
                tuple(ModalitySpec.from_dict(m) for m in d["modalities"]),
                int(d["num_classes"]),
                int(d["steps"]),
                tuple(d.get("class_names", ())),
            )
        except KeyError as e:
            raise ValueError(f"dataset spec is missing key {e.args[0]!r}") from e


# ActionSense as processed in the paper: 10 s windows at 10 Hz.
ACTIONSENSE_MODALITIES = (
    ModalitySpec("eye", (2,)),
    ModalitySpec("emg_left", (8,)),
    ModalitySpec("emg_right", (8,)),
    ModalitySpec("tactile_left", (32, 32)),
    ModalitySpec("tactile_right", (32, 32)),
    ModalitySpec("xsens", (66,)),
)

# UCI HAR raw inertial signals: three 3-axis sensors, 128 steps at 50 Hz.
UCIHAR_MODALITIES = (
    ModalitySpec("body_acc", (3,)),
    ModalitySpec("body_gyro", (3,)),
    ModalitySpec("total_acc", (3,)),
)


def load_spec(path: str | Path) -> DatasetSpec:
    """A dataset spec from a fleet.json (docs/data.md) or a bare spec JSON."""
    try:
        d = json.loads(Path(path).read_text())
        return DatasetSpec.from_dict(d["spec"] if "spec" in d else d)
    except FileNotFoundError as e:
        raise ConfigError(f"spec file {path} does not exist; point 'spec' at a fleet.json or spec JSON") from e
    except (json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"spec file {path} is not a dataset spec: {e}") from e
