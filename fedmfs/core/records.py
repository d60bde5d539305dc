"""The record of one device's round: produced once by the learner, carried unchanged to the report.

A :class:`RoundRecord` holds what a device computed in round ``r`` before uploading: its Shapley
value per modality, the encoded size of each modality model, the priorities, the choice, its sample
count and the Stage #1 accuracy. The edge machine carries it in the wire :class:`~fedmfs.core.wire.Report`,
the coordinator's ledger stores that report, and ``fedmfs-coordinator status``, the metrics and the
simulator's report.json read it back through :meth:`RoundRecord.from_dict`; nobody re-shapes it by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedmfs.core.errors import PayloadError
from fedmfs.core.fields import (
    finite,
    float_map,
    int_map,
    modality_list,
    nonneg_int,
    validate_name,
)

__all__ = ["RoundRecord"]


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One device's account of round ``round`` (modality-keyed maps cover the modalities it has)."""

    device: str
    round: int
    samples: int
    shapley: Mapping[str, float] = field(default_factory=dict)
    sizes: Mapping[str, int] = field(default_factory=dict)
    priorities: Mapping[str, float] = field(default_factory=dict)
    chosen: tuple[str, ...] = ()
    stage1_accuracy: float | None = None
    # the modalities the device did not train this round (idle: TrainConfig.idle_every)
    skipped: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {"device": self.device, "round": self.round, "samples": self.samples,
             "shapley": dict(self.shapley), "sizes": dict(self.sizes), "priorities": dict(self.priorities),
             "chosen": list(self.chosen), "stage1_accuracy": self.stage1_accuracy}
        if self.skipped:
            d["skipped"] = list(self.skipped)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        """Validate and build (raises PayloadError naming the bad field)."""
        if not isinstance(d, Mapping):
            raise PayloadError("a round record must be a JSON object")
        rec = cls(device=validate_name("device", d.get("device")), round=nonneg_int(d, "round"),
                  samples=nonneg_int(d, "samples"), shapley=float_map(d, "shapley"), sizes=int_map(d, "sizes"),
                  priorities=float_map(d, "priorities"), chosen=modality_list(d, "chosen"),
                  stage1_accuracy=finite(d, "stage1_accuracy", optional=True),
                  skipped=modality_list(d, "skipped") if "skipped" in d else ())
        unknown = [m for m in rec.chosen if m not in rec.sizes]
        if unknown:
            raise PayloadError(f"round record chooses {unknown}, which have no size")
        unknown = [m for m in rec.skipped if m not in rec.sizes]
        if unknown:
            raise PayloadError(f"round record skipped {unknown}, which have no size")
        return rec
