"""Topic names of one fleet: one place builds them (:class:`Topics`), one reads them (:func:`parse_topic`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from fedmfs.core.errors import PayloadError
from fedmfs.core.fields import validate_modality, validate_name
from fedmfs.core.wire.limits import TOPIC_ROOT

__all__ = ["ParsedTopic", "TopicKind", "Topics", "parse_topic"]

_ROUND = re.compile(r"0|[1-9][0-9]{0,8}")


class TopicKind(str, Enum):
    ROUND = "round"
    GLOBAL = "global"
    CONFIG = "config"
    UPLOAD = "upload"
    REPORT = "report"
    ACK = "ack"
    STATUS = "status"
    FETCH = "fetch"            # device -> coordinator: what the device lacks
    STATE = "state"            # coordinator -> one device: the round or config frame it asked for
    DEVICE_GLOBAL = "device_global"   # coordinator -> one device: chunks of a global model it asked for


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: TopicKind
    fleet: str
    device: str | None = None
    round: int | None = None
    modality: str | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names of one fleet (one place builds them, :func:`parse_topic` reads them)."""

    fleet: str

    def __post_init__(self) -> None:
        validate_name("fleet", self.fleet)

    @property
    def base(self) -> str:
        return f"{TOPIC_ROOT}/{self.fleet}"

    def round(self) -> str:
        return f"{self.base}/round"

    def global_model(self, modality: str) -> str:
        return f"{self.base}/global/{validate_modality(modality)}"

    def global_all(self) -> str:
        return f"{self.base}/global/+"

    def _dev(self, device: str) -> str:
        return f"{self.base}/device/{validate_name('device', device)}"

    def config(self, device: str) -> str:
        return f"{self._dev(device)}/config"

    def upload(self, device: str, round_index: int, modality: str) -> str:
        return f"{self._dev(device)}/upload/{int(round_index)}/{validate_modality(modality)}"

    def report(self, device: str) -> str:
        return f"{self._dev(device)}/report"

    def ack(self, device: str) -> str:
        return f"{self._dev(device)}/ack"

    def status(self, device: str) -> str:
        return f"{self._dev(device)}/status"

    def fetch(self, device: str) -> str:
        return f"{self._dev(device)}/fetch"

    def state(self, device: str) -> str:
        return f"{self._dev(device)}/state"

    def device_global(self, device: str, modality: str) -> str:
        return f"{self._dev(device)}/global/{validate_modality(modality)}"

    def device_globals(self, device: str) -> str:
        return f"{self._dev(device)}/global/+"

    # wildcard subscriptions of the coordinator
    def all_uploads(self) -> str:
        return f"{self.base}/device/+/upload/#"

    def all_reports(self) -> str:
        return f"{self.base}/device/+/report"

    def all_status(self) -> str:
        return f"{self.base}/device/+/status"

    def all_fetch(self) -> str:
        return f"{self.base}/device/+/fetch"


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a topic of this protocol; anything else raises PayloadError."""
    if not isinstance(topic, str) or len(topic) > 512:
        raise PayloadError("topic is not a string of at most 512 characters")
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] + "/" + parts[1] != TOPIC_ROOT:
        raise PayloadError(f"topic {topic!r} is not under {TOPIC_ROOT}/<fleet>/")
    fleet = validate_name("fleet", parts[2])
    rest = parts[3:]
    if rest == ["round"]:
        return ParsedTopic(TopicKind.ROUND, fleet)
    if len(rest) == 2 and rest[0] == "global":
        return ParsedTopic(TopicKind.GLOBAL, fleet, modality=validate_modality(rest[1]))
    if len(rest) >= 3 and rest[0] == "device":
        dev = validate_name("device", rest[1])
        tail = rest[2:]
        if len(tail) == 1 and tail[0] in ("config", "report", "ack", "status", "fetch", "state"):
            return ParsedTopic(TopicKind(tail[0]), fleet, device=dev)
        if len(tail) == 2 and tail[0] == "global":
            return ParsedTopic(TopicKind.DEVICE_GLOBAL, fleet, device=dev, modality=validate_modality(tail[1]))
        if len(tail) == 3 and tail[0] == "upload":
            if not _ROUND.fullmatch(tail[1]):    # ASCII digits, no leading zero: one spelling per round
                raise PayloadError(f"topic {topic!r}: round {tail[1]!r} is not a non-negative integer")
            return ParsedTopic(TopicKind.UPLOAD, fleet, device=dev, round=int(tail[1]),
                               modality=validate_modality(tail[2]))
    raise PayloadError(f"topic {topic!r} is not a fedmfs topic")
