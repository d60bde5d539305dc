"""fedmfs.adapters.loopback: the in-memory broker of the in-process simulation."""

from __future__ import annotations

import queue

import pytest

from fedmfs.adapters.loopback import LoopbackBus, LoopbackLink, topic_matches
from fedmfs.adapters.mqtt import Inbound


def drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


# ------------------------------------------------------------------------------- topic_matches

@pytest.mark.parametrize("pattern, topic, expected", [
    # exact
    ("a/b/c", "a/b/c", True),
    ("a/b/c", "a/b/d", False),
    ("fedmfs/fleet/round", "fedmfs/fleet/round", True),
    # + is exactly one level
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/xyz/c", True),
    ("a/+/c", "a/b/d", False),
    ("a/+", "a/b/c", False),
    ("a/+", "a", False),
    ("+/+", "a/b", True),
    ("+", "a", True),
    ("+", "a/b", False),
    ("a/+/+", "a/b", False),
    ("a/+", "a/", True),          # an empty level is a level
    # # is the rest (including the parent level itself, as MQTT says)
    ("a/#", "a/b", True),
    ("a/#", "a/b/c/d", True),
    ("a/#", "a", True),
    ("#", "anything/at/all", True),
    ("a/#", "b/c", False),
    ("a/+/#", "a/b/c/d", True),
    ("a/+/#", "x/b/c", False),
    # length mismatch without wildcards
    ("a/b", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("a", "a/b", False),
    ("a/b", "a", False),
])
def test_topic_matches(pattern, topic, expected):
    assert topic_matches(pattern, topic) is expected


# ------------------------------------------------------------------------------- links and bus

def make_link(bus, cid, subs, on_connected=None):
    q: queue.Queue = queue.Queue()
    link = bus.link(None, cid, [(s, 1) for s in subs], q, on_connected=on_connected)
    return link, q


def test_link_is_a_loopback_link_with_mqtt_link_constructor_arguments():
    bus = LoopbackBus()
    q: queue.Queue = queue.Queue()
    will = ("dev/x/status", b"offline", 1, True)
    link = bus.link(None, "cid-1", [("a/#", 1)], q, will=will, persistent=True)
    assert isinstance(link, LoopbackLink)
    assert link.client_id == "cid-1"
    assert link.subscriptions == [("a/#", 1)]
    assert link.inbox is q
    assert link.will == will
    assert link.protocol_used == "5"
    # not attached to the bus before start()
    assert link.alive() is False
    assert bus.links == []


def test_publish_reaches_every_matching_subscriber_in_order():
    bus = LoopbackBus()
    a, qa = make_link(bus, "a", ["dev/+/up"])
    b, qb = make_link(bus, "b", ["dev/#"])
    c, qc = make_link(bus, "c", ["other/#"])
    for link in (a, b, c):
        link.start()
    msgs = [("dev/1/up", b"one"), ("dev/2/up", b"two"), ("dev/1/down", b"three"), ("dev/3/up", b"four")]
    for t, p in msgs:
        a.publish(t, p)
    assert drain(qa) == [Inbound("dev/1/up", b"one", False), Inbound("dev/2/up", b"two", False),
                         Inbound("dev/3/up", b"four", False)]
    assert drain(qb) == [Inbound(t, p, False) for t, p in msgs]
    assert drain(qc) == []
    assert bus.messages == 4
    assert bus.payload_bytes == sum(len(p) for _, p in msgs)


def test_inbound_items_are_inbound_instances_with_bytes_payload():
    bus = LoopbackBus()
    link, q = make_link(bus, "x", ["t"])
    link.start()
    link.publish("t", bytearray(b"abc"))
    (item,) = drain(q)
    assert type(item) is Inbound
    assert type(item.payload) is bytes and item.payload == b"abc"
    assert item.retain is False


def test_overlapping_filters_deliver_once_per_link():
    bus = LoopbackBus()
    link, q = make_link(bus, "x", ["a/#", "a/+", "a/b"])
    link.start()
    link.publish("a/b", b"1")
    assert drain(q) == [Inbound("a/b", b"1", False)]


def test_publisher_receives_its_own_message_when_subscribed():
    bus = LoopbackBus()
    link, q = make_link(bus, "self", ["loop/#"])
    link.start()
    link.publish("loop/x", b"echo")
    assert drain(q) == [Inbound("loop/x", b"echo", False)]


def test_retained_messages_are_replayed_on_start_with_the_retain_flag():
    bus = LoopbackBus()
    pub, _ = make_link(bus, "pub", [])
    pub.start()
    pub.publish("cfg/a", b"A", retain=True)
    pub.publish("cfg/b", b"B", retain=True)
    pub.publish("cfg/a", b"A2", retain=True)          # the newest replaces the older
    pub.publish("cfg/c", b"not retained", retain=False)
    pub.publish("else/x", b"X", retain=True)
    assert bus.retained == {"cfg/a": b"A2", "cfg/b": b"B", "else/x": b"X"}

    late, q = make_link(bus, "late", ["cfg/+"])
    late.start()
    got = drain(q)
    assert sorted(got, key=lambda i: i.topic) == [Inbound("cfg/a", b"A2", True), Inbound("cfg/b", b"B", True)]
    # live messages after start carry retain=False
    pub.publish("cfg/b", b"B3", retain=True)
    assert drain(q) == [Inbound("cfg/b", b"B3", False)]


def test_empty_retained_payload_clears_the_topic():
    bus = LoopbackBus()
    pub, _ = make_link(bus, "pub", [])
    pub.start()
    pub.publish("state/dev", b"online", retain=True)
    sub, q = make_link(bus, "sub", ["state/#"])
    sub.start()
    assert drain(q) == [Inbound("state/dev", b"online", True)]

    pub.publish("state/dev", b"", retain=True)
    assert "state/dev" not in bus.retained
    # the clearing publish itself is still delivered to live subscribers
    assert drain(q) == [Inbound("state/dev", b"", False)]
    # a new subscriber gets nothing replayed
    later, q2 = make_link(bus, "later", ["state/#"])
    later.start()
    assert drain(q2) == []
    # clearing a topic that was never retained is harmless
    pub.publish("state/none", b"", retain=True)
    assert bus.retained == {}


def test_stop_stops_delivery_and_alive_follows():
    bus = LoopbackBus()
    a, qa = make_link(bus, "a", ["t/#"])
    b, qb = make_link(bus, "b", ["t/#"])
    a.start()
    b.start()
    assert a.alive() and b.alive()
    a.publish("t/1", b"1")
    a.stop()
    assert a.alive() is False and b.alive() is True
    b.publish("t/2", b"2")
    assert drain(qa) == [Inbound("t/1", b"1", False)]
    assert drain(qb) == [Inbound("t/1", b"1", False), Inbound("t/2", b"2", False)]
    a.stop()   # idempotent
    assert bus.links == [b]


def test_restart_replays_retained_again_and_counts_connects():
    bus = LoopbackBus()
    link, q = make_link(bus, "r", ["k"])
    link.publish("k", b"v", retain=True)     # a link may publish before start (the bus holds it)
    link.start()
    assert link.connects == 1
    assert drain(q) == [Inbound("k", b"v", True)]
    link.stop()
    link.start()
    assert link.connects == 2
    assert drain(q) == [Inbound("k", b"v", True)]


def test_on_connected_is_called_on_each_start_after_the_replay():
    bus = LoopbackBus()
    bus.publish("r/1", b"x", retain=True)
    calls = []
    q: queue.Queue = queue.Queue()

    def on_connected():
        # called after the retained replay, so the inbox already holds it
        calls.append(q.qsize())

    link = bus.link(None, "c", [("r/#", 1)], q, on_connected=on_connected)
    link.start()
    assert calls == [1]
    link.stop()
    link.start()
    assert calls == [1, 2]


def test_non_callable_on_connected_is_ignored():
    bus = LoopbackBus()
    bus.publish("x", b"r", retain=True)
    link, q = make_link(bus, "c", ["x"], on_connected=object())
    link.start()
    assert link.alive()
    assert drain(q) == [Inbound("x", b"r", True)]
