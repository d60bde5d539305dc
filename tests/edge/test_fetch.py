"""Fetching fleet state (docs/protocol.md "Fetching fleet state"): the two round machines, sans-I/O.

Issue 10: on every reconnect the broker re-sent every retained global from the start (7.8 MB down for
one 54 KB upload on a flaky link) and a device whose retained ``round``/``config`` the broker had lost
waited forever. Now a device asks the coordinator for what it lacks: the globals by sha256, a window
of chunks at a time, again after a cut; the round and its config when it has none.
"""

from __future__ import annotations

import numpy as np

from fedmfs.coordinator.machine import (
    CoordinatorMachine,
    DeviceAhead,
    FetchArrived,
    Reconnected,
    RoundPolicy,
    Start,
    modality_shapes,
)
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.wire import (
    DeviceConfig,
    Fetch,
    GlobalWant,
    Publish,
    RoundState,
    Signer,
    Topics,
    Verifier,
    decode_message,
    encode_message,
    generate_keypair,
)
from fedmfs.edge.machine import (
    CheckGlobal,
    Connected,
    EdgeMachine,
    GlobalFrame,
    StartTraining,
    Tick,
    decode_inbound,
    verify_global,
)

FLEET, DEV = "lab", "d1"
T = Topics(FLEET)
SPEC = DatasetSpec((ModalitySpec("eye", (6,), hidden=8), ModalitySpec("emg", (9,), hidden=6)), 3, 5)
PRIV, PUB = generate_keypair()
CHUNK = 256


def state(mod, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in modality_shapes(SPEC[mod], 3).items()}


def coordinator(devices=(DEV, "d2"), budget=8.0):
    devs = tuple(DeviceConfig(d, SelectionPolicy(gamma=2)) for d in devices)
    c = CoordinatorMachine(FLEET, SPEC, devs, RoundPolicy(2, 60.0, 1, CHUNK, fetch_budget=budget), Signer(PRIV),
                           epoch=7)
    c.seed_globals({m: state(m, i) for i, m in enumerate(SPEC.names)})
    return c


class Wire:
    """Routes the two machines' publishes to each other as a broker would for this device's
    subscriptions (``round``, its ``config``, ``ack``, ``state`` and ``global/+``; not the fleet's
    retained ``global/+``), over a downlink of ``rate`` bytes a second, counting the global-chunk bytes
    the device receives. ``cut()`` drops what is on its way; the device is told when the link is back."""

    def __init__(self, c: CoordinatorMachine, e: EdgeMachine, rate: float = 1e12):
        self.c, self.e, self.v = c, e, Verifier(PUB)
        self.rate = rate
        self.down = 0          # global-chunk frame bytes delivered to the device
        self.fetches: list[Fetch] = []
        self.queue: list[tuple[float, Publish]] = []     # on its way to the device, in order
        self.busy_until = 0.0
        self.started: list[StartTraining] = []

    def send(self, actions, now):
        for a in actions:
            if isinstance(a, Publish):
                self.busy_until = max(now, self.busy_until) + len(a.payload) / self.rate
                self.queue.append((self.busy_until, a))

    def cut(self):
        self.queue.clear()
        self.busy_until = 0.0

    def deliver(self, now):
        while self.queue and self.queue[0][0] <= now:
            _, a = self.queue.pop(0)
            ev = decode_inbound(a.topic, a.payload, DEV, now, self.v)
            if ev is None or isinstance(ev, GlobalFrame):
                continue
            if "/global/" in a.topic:
                self.down += len(a.payload)
            self.from_edge(self.e.handle(ev), now)

    def from_edge(self, actions, now):
        for a in actions:
            if isinstance(a, CheckGlobal):
                self.from_edge(self.e.handle(verify_global(a.frame, self.v, FLEET, now=now)), now)
            elif isinstance(a, StartTraining):
                self.started.append(a)
            elif isinstance(a, Publish) and a.topic == T.fetch(DEV):
                self.fetches.append(decode_message(a.payload, Fetch))
                self.send(self.c.handle(FetchArrived(DEV, a.payload, now)), now)

    def tick(self, now):
        self.deliver(now)
        self.from_edge(self.e.handle(Tick(now)), now)


def frames_bytes(c: CoordinatorMachine) -> int:
    return sum(len(f) for g in c.globals.values() for f in g.chunks(CHUNK))


def test_a_fresh_device_fetches_the_round_its_config_and_every_global_once():
    c = coordinator()
    c.handle(Start(1000.0))        # published retained; the broker lost them (no persistence): not delivered
    e = EdgeMachine(DEV, FLEET, ack_timeout=5.0, download_window=3 * CHUNK, min_download_window=3 * CHUNK)
    w = Wire(c, e, rate=4 * CHUNK)
    w.from_edge(e.handle(Connected(1000.0)), 1000.0)
    t = 1000.0
    while not w.started and t < 1100.0:
        w.tick(t)
        t += 0.5
    assert w.started, "the device never got what it needed to train"
    assert e.config is not None and e.announcement is not None and e.announcement.round == 0
    assert {m: sha for m, (sha, _) in e.globals.items()} == dict(e.announcement.globals)
    assert w.down == frames_bytes(c)                     # every chunk exactly once on a clean link
    assert max(sum(len(g.chunks) for g in f.globals) for f in w.fetches) <= 2 * 3   # windows of ~3 chunks
    assert w.fetches[0].config and w.fetches[0].round == -1


def test_cuts_cost_what_they_lost_not_the_fleet_state():
    c = coordinator()
    c.handle(Start(1000.0))
    e = EdgeMachine(DEV, FLEET, ack_timeout=5.0, download_window=4 * CHUNK, min_download_window=2 * CHUNK)
    w = Wire(c, e, rate=2 * CHUNK)        # two chunks a second: a download takes many cuts
    w.from_edge(e.handle(Connected(1000.0)), 1000.0)
    t, cuts = 1000.0, 0
    while not w.started and t < 2000.0:
        if round(t * 10) % 23 == 0:          # the link drops now and then, losing what is on its way
            w.cut()
            cuts += 1
            w.from_edge(e.handle(Connected(t)), t)  # back: the daemon tells the machine, which asks again
        w.tick(t)
        t += 0.1
    assert w.started and cuts >= 3
    assert w.down <= frames_bytes(c)      # only what arrived counts; nothing arrived twice
    assert {m: sha for m, (sha, _) in e.globals.items()} == dict(e.announcement.globals)


def test_the_coordinator_answers_only_what_differs():
    c = coordinator()
    c.handle(Start(1000.0))

    def ask(**kw):
        f = Fetch(DEV, **kw)
        return c.handle(FetchArrived(DEV, encode_message(f), 1001.0))

    held = ask(epoch=7, round=0, state=RoundState.OPEN)
    assert held == []                                      # it holds the current round: nothing to send
    [r] = ask(epoch=7, round=-1)
    assert r.topic == T.state(DEV) and decode_message(r.payload).round == 0
    out = ask(epoch=7, round=0, config=True)
    assert [decode_message(a.payload).type for a in out] == ["config"]
    g = c.globals["eye"]
    out = ask(epoch=7, round=0, globals=(GlobalWant("eye", g.sha256, (0, 1, 999)),))
    assert [a.topic for a in out] == [T.device_global(DEV, "eye")] * 2 and all(a.qos == 0 for a in out)
    assert [a.payload for a in out] == g.chunks(CHUNK)[:2]          # indices past the end are ignored
    out = ask(epoch=7, round=0, globals=(GlobalWant("eye", "0" * 64, (0,)),))
    assert [decode_message(a.payload).type for a in out] == ["round"]   # a global it no longer has: the round
    assert ask(epoch=6, round=3)[0].topic == T.state(DEV)                 # another epoch: round and config
    [bad] = c.handle(FetchArrived(DEV, encode_message(Fetch("d2")), 1001.0))[1:]
    assert decode_message(bad.payload).reason.value == "bad_message"     # names another device
    assert c.handle(FetchArrived("zz", encode_message(Fetch("zz")), 1001.0)) == []   # not in the fleet


def test_a_device_ahead_of_the_coordinator_is_reported(caplog):
    c = coordinator()
    c.handle(Start(1000.0))
    out = c.handle(FetchArrived(DEV, encode_message(Fetch(DEV, 7, 1, RoundState.OPEN)), 1001.0))
    assert [a for a in out if isinstance(a, DeviceAhead)] == [DeviceAhead(DEV, 1, 0)]
    assert "ahead of this coordinator" in caplog.text and "fedmfs-coordinator recover" in caplog.text


def test_the_fetch_budget_bounds_what_one_device_can_pull():
    c = coordinator(budget=1.0)
    c.handle(Start(1000.0))
    g = c.globals["eye"]
    n = len(g.chunks(CHUNK))
    sent = 0
    for _ in range(20):
        out = c.handle(FetchArrived(DEV, encode_message(Fetch(DEV, 7, 0, globals=(
            GlobalWant("eye", g.sha256, tuple(range(min(n, 64)))),))), 1001.0))
        sent += sum(len(a.payload) for a in out)
    assert sent <= 1.0 * sum(len(x.frame) for x in c.globals.values()) + 2 * CHUNK + max(map(len, g.chunks(CHUNK)))


def test_after_a_broker_restart_the_coordinator_publishes_the_fleet_state_again():
    c = coordinator()
    c.handle(Start(1000.0))
    out = c.handle(Reconnected(1500.0))
    topics = [a.topic for a in out if isinstance(a, Publish) and a.retain]
    assert T.round() in topics and T.config(DEV) in topics and T.config("d2") in topics
    assert {T.global_model(m) for m in SPEC.names} <= set(topics)
    assert c.round == 0 and c.state is RoundState.OPEN     # nothing else changes


def test_a_device_holding_everything_asks_now_and_then_whether_the_round_moved_on():
    c = coordinator()
    c.handle(Start(1000.0))
    e = EdgeMachine(DEV, FLEET, ack_timeout=5.0, idle_fetch_seconds=30.0)
    w = Wire(c, e)
    w.from_edge(e.handle(Connected(1000.0)), 1000.0)
    for t in np.arange(1000.0, 1040.0, 0.5):
        w.tick(float(t))
    n = len(w.fetches)
    for t in np.arange(1040.0, 1100.0, 0.5):
        w.tick(float(t))
    assert 1 <= len(w.fetches) - n <= 3          # every 30 s while idle, not every tick


def test_the_download_window_follows_the_rate_the_link_delivers():
    e = EdgeMachine(DEV, FLEET)
    assert e.window_bytes() == e.min_download_window            # nothing measured: start small
    for i in range(40):                                          # 32 KB/s: 4 KB every 1/8 s
        e._measure(i / 8, 4096)
    assert e.window_bytes() <= 80 * 1024                         # about 2 s of 32 KB/s
    for i in range(400):                                         # 10 MB/s
        e._measure(10 + i / 100, 100_000)
    assert e.window_bytes() == e.download_window                 # capped
