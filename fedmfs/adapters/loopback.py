"""An in-memory broker for ``fedmfs simulate --transport inproc``: the services' MQTT link, without a socket.

:class:`LoopbackBus` keeps retained messages and subscriptions (``+`` and ``#`` filters, as MQTT);
:meth:`LoopbackBus.link` makes a :class:`LoopbackLink`, a drop-in for
:class:`fedmfs.adapters.mqtt.MqttLink` that the coordinator service and the edge daemon take as their
link. A publish is delivered at once, in order, to every subscriber's inbox (an
:class:`~fedmfs.adapters.mqtt.Inbound` per message, as paho's callbacks would enqueue it); retained
messages are replayed on subscribe; an empty retained payload clears the topic. Nothing is lost,
duplicated or reordered, so a run is deterministic; faults are for the MQTT tests.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

from fedmfs.adapters.mqtt import BrokerConfig, Inbound

__all__ = ["LoopbackBus", "LoopbackLink", "topic_matches"]


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(p) == len(t)


@dataclass
class LoopbackBus:
    """Retained messages and the links subscribed to what."""

    retained: dict[str, bytes] = field(default_factory=dict)
    links: list[LoopbackLink] = field(default_factory=list)
    messages: int = 0
    payload_bytes: int = 0

    def link(self, cfg: BrokerConfig | None, client_id: str, subscriptions: list[tuple[str, int]],
             inbox: queue.Queue, will: tuple[str, bytes, int, bool] | None = None, persistent: bool = False,
             on_connected=None) -> LoopbackLink:
        """A link with :class:`~fedmfs.adapters.mqtt.MqttLink`'s constructor (``cfg`` is ignored)."""
        return LoopbackLink(self, client_id, list(subscriptions), inbox, will, on_connected)

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.messages += 1
        self.payload_bytes += len(payload)
        if retain:
            if payload:
                self.retained[topic] = bytes(payload)
            else:
                self.retained.pop(topic, None)
        for link in self.links:
            if any(topic_matches(f, topic) for f, _ in link.subscriptions):
                link.inbox.put(Inbound(topic, bytes(payload), False))


@dataclass
class LoopbackLink:
    bus: LoopbackBus
    client_id: str
    subscriptions: list[tuple[str, int]]
    inbox: queue.Queue
    will: tuple[str, bytes, int, bool] | None = None
    on_connected: object = None
    protocol_used: str = "5"     # the wire-byte count assumes MQTT 5 framing
    connects: int = 0

    def start(self, timeout: float = 0.0) -> None:
        self.bus.links.append(self)
        self.connects += 1
        for topic, payload in list(self.bus.retained.items()):
            if any(topic_matches(f, topic) for f, _ in self.subscriptions):
                self.inbox.put(Inbound(topic, payload, True))
        if callable(self.on_connected):
            self.on_connected()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                timeout: float | None = None) -> None:
        self.bus.publish(topic, payload, retain)

    def alive(self) -> bool:
        return self in self.bus.links

    def stop(self) -> None:
        if self in self.bus.links:
            self.bus.links.remove(self)
