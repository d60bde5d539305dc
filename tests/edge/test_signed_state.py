"""Fresh, signed fleet state (issue 9, point 3): a device takes a ``round``, a ``config`` or a global
only signed by its coordinator, of its fleet and fleet epoch, and never older than what it holds.

Every message here comes from the real classes: the genuine ones are what a real
:class:`~fedmfs.coordinator.machine.CoordinatorMachine` publishes, the device is a real
:class:`~fedmfs.edge.daemon.EdgeDaemon` (a stub link and trainer; its state directory in ``tmp_path``)
fed through its own ``_dispatch``, as paho's messages are. Each attack must leave the device's state
(its ``state.json``, held announcement, config and globals) as it was and log why.
"""

import json
import logging
import struct
import types
from pathlib import Path

import numpy as np
import pytest

from fedmfs.adapters.mqtt import BrokerConfig, Inbound
from fedmfs.coordinator.machine import (
    ChunkArrived,
    CoordinatorMachine,
    Publish,
    ReportArrived,
    RoundPolicy,
    Start,
    Tick,
    modality_shapes,
)
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.payload import ModelHeader, encode_model
from fedmfs.core.records import RoundRecord
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.wire import (
    DeviceConfig,
    Report,
    RoundAnnouncement,
    RoundState,
    Signer,
    Topics,
    decode_global,
    encode_message,
    generate_keypair,
    split_payload,
)
from fedmfs.edge.config import EdgeConfig
from fedmfs.edge.daemon import EdgeDaemon
from fedmfs.edge.machine import RunStage2, StartTraining

FLEET, DEV, MOD = "lab", "d1", "eye"
T = Topics(FLEET)
SPEC = DatasetSpec((ModalitySpec(MOD, (2,), hidden=3),), 3, 5)
PRIV, PUB = generate_keypair()
OTHER_PRIV, _ = generate_keypair()


def state(seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in modality_shapes(SPEC[MOD], 3).items()}


def coordinator(priv=PRIV, rounds=5):
    devs = (DeviceConfig(DEV, SelectionPolicy(gamma=1)),)
    return CoordinatorMachine(FLEET, SPEC, devs, RoundPolicy(rounds, 60.0, 1, 200), Signer(priv))


def published(actions) -> dict[str, bytes]:
    """The retained messages the actions leave on the broker (topic -> payload; the last one wins)."""
    return {a.topic: a.payload for a in actions if isinstance(a, Publish) and a.retain}


def close_round_with_an_upload(c: CoordinatorMachine, now: float) -> dict[str, bytes]:
    """DEV uploads the modality and reports: the round closes with a new global and the next opens."""
    r = c.round
    data = encode_model(state(50 + r), ModelHeader(r, MOD, 10))
    out = []
    for f in split_payload(data, c.policy.chunk_bytes):
        out += c.handle(ChunkArrived(DEV, r, MOD, f, now))
    rep = Report(RoundRecord(DEV, r, 10, {MOD: 1.0}, {MOD: len(data)}, {MOD: 1.0}, (MOD,)))
    out += c.handle(ReportArrived(DEV, encode_message(rep), now + 1))
    assert c.round == r + 1, "the round did not close"
    return published(out)


class _Link:
    protocol_used = "5"

    def __init__(self, *a, **k):
        self.sent = []

    def publish(self, topic, payload, qos=1, retain=False, timeout=None):
        self.sent.append((topic, payload, retain))

    def alive(self):
        return True


def daemon(tmp_path: Path) -> EdgeDaemon:
    cfg = EdgeConfig(device=DEV, fleet=FLEET, data=tmp_path / "none.npz", spec=tmp_path / "none.json",
                     state_dir=tmp_path / "edge", coordinator_key=PUB, broker=BrokerConfig())
    return EdgeDaemon(cfg, link_factory=_Link, trainer=types.SimpleNamespace())


def feed(d: EdgeDaemon, messages: dict[str, bytes]) -> None:
    for topic, payload in messages.items():
        d._dispatch(Inbound(topic, payload, True))


class Fleet:
    """A coordinator in round 1 (one global aggregated) and a device that followed it."""

    def __init__(self, tmp_path: Path):
        self.c = coordinator()
        self.pub0 = published(self.c.seed_globals({MOD: state(1)}) + self.c.handle(Start(1000.0)))
        self.d = daemon(tmp_path)
        feed(self.d, self.pub0)
        self.pub1 = close_round_with_an_upload(self.c, 1001.0)
        feed(self.d, self.pub1)
        assert self.d.machine.announcement.round == 1 and self.d.machine.announcement.state is RoundState.OPEN

    def snapshot(self):
        m = self.d.machine
        p = self.d.dir / "state.json"
        return (p.read_bytes() if p.exists() else None, m.announcement, m.config,
                {k: v[0] for k, v in m.globals.items()}, dict(m.progress))

    def next_job_rounds(self):
        """The round of what the device would do now: Stage #2 on round 0, never round 10^6 or a replay."""
        acts = self.d.machine.handle(Tick(2000.0))
        return [a.round for a in acts if isinstance(a, (StartTraining, RunStage2))]


@pytest.fixture
def fleet(tmp_path):
    return Fleet(tmp_path)


def refused(caplog, *words):
    """The device logged a refusal at WARNING naming one of ``words``."""
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("fedmfs.edge")]
    assert any(any(w in line for w in words) for line in lines), lines
    return lines


def _unsigned_round(r, st=RoundState.OPEN, globals_=None):
    return encode_message(RoundAnnouncement(FLEET, r, st, 1e12, 5, (DEV,), globals_ or {}, 200))


@pytest.mark.parametrize("kind", ["round_1e6", "done", "current_round_unsigned"])
def test_a_forged_unsigned_round_is_refused_and_the_state_is_kept(fleet, caplog, kind):
    g = fleet.d.machine.announcement.globals
    forged = {"round_1e6": _unsigned_round(10**6, globals_=g), "done": _unsigned_round(1, RoundState.DONE, g),
              "current_round_unsigned": _unsigned_round(1, globals_=g)}[kind]
    before = fleet.snapshot()
    caplog.set_level(logging.INFO)
    fleet.d._dispatch(Inbound(T.round(), forged, True))
    assert fleet.snapshot() == before
    refused(caplog, "not signed")
    assert fleet.next_job_rounds() == [0]
    assert not fleet.d.machine.finished


def test_a_round_signed_by_another_key_is_refused(fleet, caplog):
    stranger = coordinator(OTHER_PRIV, rounds=1)
    stranger.seed_globals({MOD: state(7)})
    stranger.handle(Start(1000.0))
    done = published(stranger.handle(Tick(5000.0)))          # a "done" round, signed by the wrong key
    assert RoundState.DONE.value.encode() in done[T.round()] and T.round() in done
    before = fleet.snapshot()
    caplog.set_level(logging.INFO)
    feed(fleet.d, {T.round(): done[T.round()]})
    assert fleet.snapshot() == before
    refused(caplog, "signature")
    assert fleet.next_job_rounds() == [0]


def test_a_replayed_older_signed_round_is_refused(fleet, caplog):
    before = fleet.snapshot()
    caplog.set_level(logging.INFO)
    feed(fleet.d, {T.round(): fleet.pub0[T.round()]})       # round 0, genuinely signed, replayed
    assert fleet.snapshot() == before
    refused(caplog, "older", "replay")
    assert fleet.next_job_rounds() == [0]


def test_a_replayed_older_signed_global_is_refused(fleet, caplog):
    topic = T.global_model(MOD)
    assert fleet.pub0[topic] != fleet.pub1[topic]
    before = fleet.snapshot()
    caplog.set_level(logging.INFO)
    feed(fleet.d, {topic: fleet.pub0[topic]})               # round 0's global, genuinely signed, replayed
    assert fleet.snapshot() == before
    refused(caplog, "older", "replay")
    assert not (fleet.d.dir / "globals" / f"{MOD}.fmg").read_bytes() == fleet.pub0[topic]


def _global_parts(frame: bytes):
    magic, n = struct.unpack_from(">4sH", frame)
    return magic, json.loads(frame[6:6 + n]), frame[6 + n:]


def _global_frame(magic, head: dict, payload: bytes) -> bytes:
    h = json.dumps(head).encode()
    return struct.pack(">4sH", magic, len(h)) + h + payload


@pytest.mark.parametrize("kind", ["tampered_payload", "unsigned", "zero_signature", "huge_round"])
def test_a_tampered_or_unsigned_global_is_refused(fleet, caplog, kind):
    topic = T.global_model(MOD)
    frame = fleet.pub1[topic]
    magic, head, payload = _global_parts(frame)
    if kind == "tampered_payload":
        bad = bytearray(frame)
        bad[-5] ^= 0x01
        bad = bytes(bad)
    elif kind == "unsigned":
        bad = _global_frame(magic, {k: v for k, v in head.items() if k != "signature"}, payload)
    elif kind == "zero_signature":
        bad = _global_frame(magic, {**head, "signature": "0" * 128}, payload)
    else:   # json.loads raised ValueError on a 5000-digit integer: it escaped the daemon's refusal
        h = json.dumps(head).replace(f'"round": {head["round"]}', '"round": ' + "9" * 5000).encode()
        bad = struct.pack(">4sH", magic, len(h)) + h + payload
    before = fleet.snapshot()
    caplog.set_level(logging.INFO)
    fleet.d._dispatch(Inbound(topic, bad, True))
    assert fleet.snapshot() == before
    refused(caplog, "sha256", "signature", "digits")
    assert (fleet.d.dir / "globals" / f"{MOD}.fmg").read_bytes() == frame


def test_a_forged_unsigned_config_is_refused(fleet, caplog):
    held = fleet.d.machine.config
    forged = encode_message(DeviceConfig(DEV, SelectionPolicy(gamma=0, cap_bytes=1)))
    before = fleet.snapshot()
    caplog.set_level(logging.INFO)
    feed(fleet.d, {T.config(DEV): forged})
    assert fleet.snapshot() == before and fleet.d.machine.config == held
    refused(caplog, "not signed")


def test_after_a_restart_a_replayed_round_is_still_refused(fleet, tmp_path, caplog):
    """The device's own record of the round it has seen survives a restart (state.json): a replayed
    retained round 0 that greets the restarted device does not take it back to round 0."""
    fleet.d.machine.handle(Tick(2000.0))          # the device persists what it does
    d2 = daemon(tmp_path)
    caplog.set_level(logging.INFO)
    feed(d2, {T.config(DEV): fleet.pub0[T.config(DEV)], T.round(): fleet.pub0[T.round()]})
    assert d2.machine.announcement is None
    refused(caplog, "older", "replay")
    feed(d2, {T.round(): fleet.pub1[T.round()]})
    assert d2.machine.announcement.round == 1


# ------------------------------------------------------------------ the acceptance rules, machine level

def _machine(progress=None):
    from fedmfs.edge.machine import EdgeMachine
    return EdgeMachine(DEV, FLEET, progress=progress) if progress else EdgeMachine(DEV, FLEET)


def _ann(r, st=RoundState.OPEN, epoch=5, now=0.0):
    from fedmfs.edge.machine import Announced
    return Announced(RoundAnnouncement(FLEET, r, st, 1e12, 5, (DEV,), {}, 200), now, epoch)


def test_announcements_move_forward_only_within_an_epoch(caplog):
    from fedmfs.edge.machine import SaveProgress
    m = _machine()
    caplog.set_level(logging.INFO)
    saved = [a.progress for a in m.handle(_ann(2)) if isinstance(a, SaveProgress)]
    assert saved[-1]["epoch"] == 5 and saved[-1]["announced"] == 2            # persisted at once
    assert m.handle(_ann(2)) == []                                             # the retained one again
    m.handle(_ann(2, RoundState.DONE))
    for replay in (_ann(2), _ann(1, RoundState.DONE), _ann(0)):               # back in state or in round
        assert m.handle(replay) == [] and m.announcement.state is RoundState.DONE
    assert m.handle(_ann(3, epoch=4)) == [] and m.announcement.round == 2     # an earlier fleet's
    lines = refused(caplog, "replay")
    assert any("epoch 4 is older" in x for x in lines)


def test_a_later_epoch_is_a_new_fleet_and_resets_the_round_bookkeeping(caplog):
    from fedmfs.edge.machine import DropPending, JobKind, Stage2Done, _Job
    prog = {"reported": 7, "stage2": 6, "evaluated": 6, "pending": None, "epoch": 5, "announced": 8,
            "announced_state": "open"}
    m = _machine(dict(prog))
    m.job = _Job(JobKind.STAGE2, 7)                                            # a job of the old fleet runs
    caplog.set_level(logging.INFO)
    acts = m.handle(_ann(0, epoch=9))
    assert any(isinstance(a, DropPending) for a in acts)
    assert m.progress == {"reported": -1, "stage2": -1, "evaluated": -1, "pending": None, "epoch": 9,
                          "announced": 0, "announced_state": "open"}
    refused(caplog, "re-created")
    assert m.handle(Stage2Done(7, 0.5)) == [] and m.job is None and m.progress["stage2"] == -1
    assert m.handle(_ann(8, epoch=5)) == [] and m.announcement.round == 0     # the old fleet: refused now


def test_a_state_file_before_protocol_2_takes_the_first_signed_epoch_without_a_reset():
    from fedmfs.edge.machine import check_progress
    old = check_progress({"reported": 3, "stage2": 2, "evaluated": 2, "pending": None})
    assert (old["epoch"], old["announced"], old["announced_state"]) == (-1, -1, "open")
    m = _machine(old)
    m.handle(_ann(4, epoch=5))
    assert (m.progress["reported"], m.progress["epoch"], m.progress["announced"]) == (3, 5, 4)
    for bad in ({**old, "epoch": "5"}, {**old, "announced_state": "later"}, {**old, "announced": True}):
        with pytest.raises(Exception, match="afresh"):
            check_progress(bad)


def test_configs_are_this_devices_and_never_older_than_the_one_held(caplog):
    from fedmfs.edge.machine import ConfigArrived
    m = _machine()
    m.handle(_ann(3))
    c2, c3 = (DeviceConfig(DEV, SelectionPolicy(gamma=g)) for g in (2, 3))
    caplog.set_level(logging.INFO)
    m.handle(ConfigArrived(c3, 0.0, 5, 3))
    m.handle(ConfigArrived(c2, 0.0, 5, 1))                                     # an older config replayed
    m.handle(ConfigArrived(c2, 0.0, 4, 9))                                     # an earlier fleet's
    m.handle(ConfigArrived(DeviceConfig("d2", SelectionPolicy(gamma=2)), 0.0, 5, 4))   # another device's
    assert m.config == c3
    refused(caplog, "replay")
    refused(caplog, "naming device 'd2'")
    m.handle(ConfigArrived(c2, 0.0, 5, 4))                                     # a newer one: taken
    assert m.config == c2


def test_globals_never_go_back_in_round_and_stored_ones_of_an_earlier_fleet_are_ignored(caplog):
    from fedmfs.edge.machine import GlobalArrived, SaveGlobal
    m = _machine()
    m.handle(_ann(3))
    caplog.set_level(logging.INFO)
    assert m.handle(GlobalArrived(MOD, "1" * 64, "s3", b"f3", False, 3, 5)) == [SaveGlobal(MOD, b"f3")]
    assert m.handle(GlobalArrived(MOD, "2" * 64, "s2", b"f2", False, 2, 5)) == []      # replay
    assert m.handle(GlobalArrived(MOD, "4" * 64, "s9", b"f9", True, 9, 4)) == []       # an earlier fleet's
    assert m.globals[MOD] == ("1" * 64, "s3")
    refused(caplog, "replay")
    assert m.handle(GlobalArrived(MOD, "1" * 64, "s3", b"f3", False, 3, 5)) == [SaveGlobal(MOD, b"f3")]
    assert m.handle(GlobalArrived(MOD, "5" * 64, "s4", b"f4", False, 4, 5)) == [SaveGlobal(MOD, b"f4")]


def test_repeated_refusals_are_logged_once_a_minute_with_a_count(tmp_path, caplog):
    d = daemon(tmp_path)
    caplog.set_level(logging.WARNING)
    for i in range(50):
        d._dispatch(Inbound(T.round(), _unsigned_round(10**6 + i), True))
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and "not signed" in lines[0]
    d.machine.refusals.last = {k: v - 61 for k, v in d.machine.refusals.last.items()}   # a minute later
    d._dispatch(Inbound(T.round(), _unsigned_round(1), True))
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2 and "49 more like it held back" in lines[1]
    assert d.machine.announcement is None


# ------------------------------------------------------------------------ over real Mosquitto, processes

@pytest.mark.integration
def test_a_hostile_client_cannot_stop_or_rewind_a_running_fleet(mosquitto, tmp_path):
    """A client with write access to the fleet's topics (the ACL is the only other guard) publishes a
    forged retained ``round`` (round 10^6, unsigned), a forged ``done`` and replays round 0's genuinely
    signed global while the edge daemons run round 1: the run still completes and each device's log
    says why it refused them."""
    import queue
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedmfs.coordinator.ledger import Ledger
    from fedmfs.core.data.format import Fleet as DataFleet
    from fedmfs.core.data.synthetic import make_synthetic
    from fedmfs.core.settings import TrainConfig
    from fedmfs.sim.config import SimConfig
    from fedmfs.sim.processes import _spawn, write_fleet_configs

    f = make_synthetic("small", 0)
    fleet = DataFleet(f.spec, [f.clients[0], f.clients[6]], f.metadata)
    cfg = SimConfig.build(rounds=2, gamma=2, seed=3,
                          train=TrainConfig(min_steps=0, epochs=1, fusion_steps=20, shapley_samples=10))
    work = tmp_path / "run"
    (work / "logs").mkdir(parents=True)
    name = "hostile"
    files = write_fleet_configs(fleet, cfg, work, mosquitto.url, name, round_seconds=300)
    t = Topics(name)
    globals_seen: queue.Queue = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv311)
    c.on_message = lambda cl, u, msg: globals_seen.put((msg.topic, bytes(msg.payload)))
    c.connect(mosquitto.host, mosquitto.port)
    c.subscribe(t.global_all(), 1)
    c.loop_start()
    procs = {}
    t0 = time.monotonic()
    try:
        run = lambda mod, conf: [mod, "run", "--config", str(conf), "--exit-when-done", "--connect-timeout", "30"]
        procs["coordinator"] = _spawn(run("fedmfs.coordinator.cli", files["coordinator"]),
                                      work / "logs" / "coordinator.log")
        first = {}
        while len(first) < len(fleet.spec.names):         # round 0's globals, as published
            topic, frame = globals_seen.get(timeout=60)
            first.setdefault(topic, frame)
        for n in files["edges"]:
            procs[n] = _spawn(run("fedmfs.edge.cli", files["edges"][n]), work / "logs" / f"edge-{n}.log")
        states = [work / "edge" / n / "state.json" for n in files["edges"]]

        def in_round_1():
            try:
                return all(json.loads(p.read_text()).get("announced") == 1 for p in states)
            except (OSError, ValueError):
                return False
        end = time.monotonic() + 240
        while not in_round_1():
            assert time.monotonic() < end, "round 1 never reached the devices"
            assert all(p.poll() is None for p in procs.values()), "a process ended early"
            time.sleep(0.05)
        # the attack, while round 1 runs
        forged = _unsigned_round(10**6).replace(f'"fleet":"{FLEET}"'.encode(), f'"fleet":"{name}"'.encode())
        done = _unsigned_round(1, RoundState.DONE).replace(f'"fleet":"{FLEET}"'.encode(), f'"fleet":"{name}"'.encode())
        infos = [c.publish(t.round(), done, 1, True), c.publish(t.round(), forged, 1, True)]
        infos += [c.publish(topic, frame, 1, True) for topic, frame in first.items()]     # replayed globals
        for i in infos:
            i.wait_for_publish(10)
        for n, p in procs.items():
            assert p.wait(300) == 0, f"{n} failed; see {work / 'logs'}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        c.loop_stop()
        c.disconnect()
    elapsed = time.monotonic() - t0
    led = Ledger(work / "coordinator", readonly=True)
    try:
        rounds = led.rounds()
        assert [r.closed_at is not None for r in rounds] == [True, True]
        assert all(r.aggregated for r in rounds)
        epoch = int(led.get_meta("epoch"))
        latest = {g["modality"]: g["sha256"] for g in led.latest_globals()}
    finally:
        led.close()
    for n in files["edges"]:
        st = json.loads((work / "edge" / n / "state.json").read_text())
        assert (st["reported"], st["evaluated"], st["epoch"], st["announced"]) == (1, 1, epoch, 1)
        assert st["announced_state"] == "done"
        log = (work / "logs" / f"edge-{n}.log").read_text()
        assert "round message not signed" in log, log[-2000:]
        # the replayed globals went to the fleet's retained topics, which devices no longer read (they
        # fetch the globals the signed round names): each holds exactly the coordinator's last globals
        held = {p.stem: decode_global(p.read_bytes(), None)[0].sha256
                for p in (work / "edge" / n / "globals").glob("*.fmg")}
        assert held == latest, n
    print(f"hostile-client run: {elapsed:.1f} s")


def test_the_fleet_epoch_is_made_once_per_ledger_and_signed_into_what_the_coordinator_publishes(tmp_path):
    """coordinator.service: the epoch is kept in the ledger (a restart keeps it; a new state_dir, a
    re-created fleet, gets a larger one) and the machine signs with it."""
    from fedmfs.adapters.loopback import LoopbackBus
    from fedmfs.coordinator.config import load_coordinator_config
    from fedmfs.coordinator.service import CoordinatorService
    from fedmfs.core.data.format import Fleet as DataFleet
    from fedmfs.core.data.synthetic import make_synthetic
    from fedmfs.core.wire import Verifier, decode_global, verify_message
    from fedmfs.sim.config import SimConfig
    from fedmfs.sim.processes import write_fleet_configs

    f = make_synthetic("small", 0)
    files = write_fleet_configs(DataFleet(f.spec, [f.clients[0]], f.metadata), SimConfig.build(rounds=1), tmp_path,
                                "mqtt://127.0.0.1:1", "ep")
    cfg = load_coordinator_config(files["coordinator"])

    def epoch_of_a_service(cfg):
        s = CoordinatorService(cfg, link_factory=LoopbackBus().link)
        try:
            m = s.machine
            head, _ = verify_message(m.round_message(), Verifier(files["public_key"]), "ep", RoundAnnouncement)
            assert head.epoch == m.epoch == int(s.ledger.get_meta("epoch"))
            assert all(decode_global(g.frame, Verifier(files["public_key"]))[0].epoch == m.epoch
                       for g in m.globals.values()) and m.globals
            return m.epoch
        finally:
            s.close()

    first = epoch_of_a_service(cfg)
    assert epoch_of_a_service(cfg) == first                       # a restart keeps it
    from dataclasses import replace
    assert epoch_of_a_service(replace(cfg, state_dir=tmp_path / "again")) > first   # a new fleet: larger
