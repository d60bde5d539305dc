"""The coordinator service as a real process against real Mosquitto, devices played by raw paho."""

import json
import queue
import subprocess
import sys
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedmfs.coordinator.machine import modality_shapes
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.payload import ModelHeader, decode_model, encode_model
from fedmfs.core.records import RoundRecord
from fedmfs.core.wire import (
    Ack,
    AckReason,
    Evaluation,
    Report,
    RoundAnnouncement,
    RoundState,
    Topics,
    Verifier,
    decode_global,
    decode_message,
    encode_message,
    generate_keypair,
    split_payload,
)

pytestmark = pytest.mark.integration

SPEC = DatasetSpec((ModalitySpec("eye", (2,), hidden=3), ModalitySpec("emg", (4,), hidden=2)), 3, 5)


def write_coordinator(tmp_path, port, devices, rounds=2, seconds=60.0, chunk=300):
    priv, pub = generate_keypair()
    (tmp_path / "key").write_text(priv)
    (tmp_path / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    lines = ["[defaults]", "gamma = 1"]
    for d, cap in devices.items():
        lines += ["[[device]]", f'id = "{d}"'] + ([f"cap_bytes = {cap}"] if cap else [])
    (tmp_path / "fleet.toml").write_text("\n".join(lines) + "\n")
    (tmp_path / "coordinator.toml").write_text(f"""
fleet = "lab"
state_dir = "state"
spec = "spec.json"
fleet_file = "fleet.toml"
signing_key = "key"
seed = 3
[rounds]
total = {rounds}
seconds = {seconds}
quorum = 1
chunk_bytes = {chunk}
max_update_ratio = inf  # the devices' random states are far from the initial globals: exact means here
[broker]
host = "127.0.0.1"
port = {port}
""")
    return pub


def start(tmp_path):
    log = open(tmp_path / "coordinator.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "fedmfs.coordinator.cli", "run", "--config",
                             str(tmp_path / "coordinator.toml"), "--exit-when-done", "--connect-timeout", "20"],
                            stdout=log, stderr=log)


class Peer:
    """A raw paho client playing devices (and watching what the coordinator publishes)."""

    def __init__(self, port):
        self.q = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="peer", protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self.q.put((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("fedmfs/v1/lab/#", 1)
        self.c.loop_start()
        self.t = Topics("lab")
        self.globals = {}
        self.round = None

    def wait(self, pred, timeout=60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                topic, p = self.q.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if "/global/" in topic:
                self.globals[topic.rsplit("/", 1)[1]] = p
            if topic.endswith("/round") and p:
                self.round = decode_message(p, RoundAnnouncement)
            res = pred(topic, p)
            if res:
                return res
        raise AssertionError("timed out waiting")

    def ack(self, dev, timeout=60.0):
        return self.wait(lambda t, p: decode_message(p, Ack) if t == self.t.ack(dev) else None, timeout)

    def round_open(self, r):
        return self.wait(lambda t, p: self.round if self.round and self.round.round == r
                         and self.round.state is RoundState.OPEN else None)

    def send(self, dev, r, mod, payload, chunk=300, only=None):
        frames = split_payload(payload, chunk)
        for i in (only if only is not None else range(len(frames))):
            self.c.publish(self.t.upload(dev, r, mod), frames[i], 1).wait_for_publish(10)

    def report(self, dev, r):
        rep = Report(RoundRecord(dev, r, 10, {"eye": 1.0}, {"eye": 1}, {"eye": 1.0}, ("eye",)))
        self.c.publish(self.t.report(dev), encode_message(rep), 1).wait_for_publish(10)

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def state(mod, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in modality_shapes(SPEC[mod], 3).items()}


def test_rounds_caps_restart_and_ledger(tmp_path, mosquitto):
    p_eye = lambda r, seed, n: encode_model(state("eye", seed), ModelHeader(r, "eye", n))
    cap_b = len(p_eye(0, 2, 20)) - 1
    pub = write_coordinator(tmp_path, mosquitto.port, {"a": None, "b": cap_b, "c": None})
    peer = Peer(mosquitto.port)
    proc = start(tmp_path)
    try:
        peer.round_open(0)
        assert set(peer.round.globals) == {"eye", "emg"}
        if len(peer.globals) < 2:
            peer.wait(lambda t, p: len(peer.globals) == 2 or None)
        for m, frame in peer.globals.items():
            h, payload = decode_global(frame, Verifier(pub))
            assert h.sha256 == peer.round.globals[m]
        sent = 0
        pa = p_eye(0, 1, 10)
        peer.send("a", 0, "eye", pa)
        assert peer.ack("a").reason is AckReason.ACCEPTED
        sent += len(pa)
        peer.send("b", 0, "eye", p_eye(0, 2, 20))
        assert peer.ack("b").reason is AckReason.OVER_CAP
        # c sends half an upload, then the coordinator is killed mid-round
        pc = encode_model(state("emg", 3), ModelHeader(0, "emg", 30))
        n = len(split_payload(pc, 300))
        peer.send("c", 0, "emg", pc, only=range(n // 2))
        peer.report("a", 0)
        assert peer.ack("a").reason is AckReason.REPORT_ACCEPTED
        proc.kill()
        proc.wait(10)
        proc = start(tmp_path)
        peer.round_open(0)                       # the resumed round is re-announced
        # c probes with its last chunk: the restarted coordinator lists what it lacks
        peer.send("c", 0, "emg", pc, only=[n - 1])
        a = peer.ack("c")
        assert a.reason is AckReason.MISSING_CHUNKS and a.missing == tuple(range(n - 1))
        peer.send("c", 0, "emg", pc, only=a.missing)
        assert peer.ack("c").reason is AckReason.ACCEPTED
        sent += len(pc)
        peer.send("a", 0, "eye", pa, only=[len(split_payload(pa, 300)) - 1])   # a re-sent probe
        assert peer.ack("a").reason is AckReason.ACCEPTED
        for d in "bc":
            peer.report(d, 0)
        peer.round_open(1)
        # round 1: globals are the weighted means of round 0
        h, payload = decode_global(peer.globals["eye"], Verifier(pub))
        assert h.round == 1 and peer.round.globals["eye"] == h.sha256
        np.testing.assert_array_equal(decode_model(payload)[1]["head.bias"], state("eye", 1)["head.bias"])
        for d in "abc":
            peer.report(d, 1)
        peer.wait(lambda t, p: peer.round.state is RoundState.DONE or None)
        time.sleep(0.5)
        assert proc.poll() is None          # --exit-when-done waits for the devices' last evaluations
        for i, d in enumerate("abc"):
            ev = Evaluation(d, 1, 0.5 + i / 10, 40)
            peer.c.publish(peer.t.report(d), encode_message(ev), 1).wait_for_publish(10)
            a = peer.wait(lambda t, p, d=d: decode_message(p, Ack) if t == peer.t.ack(d) and decode_message(
                p, Ack).reason is AckReason.EVALUATION_ACCEPTED else None)
            assert a.round == 1
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        peer.close()
    st = subprocess.run([sys.executable, "-m", "fedmfs.coordinator.cli", "status", "--state-dir",
                         str(tmp_path / "state"), "--json"], capture_output=True, text=True, timeout=60)
    status = json.loads(st.stdout)
    assert status["uploads_total"] == 2 and sum(status["bytes_total"].values()) == sent
    assert status["bytes_total"] == {"a": len(pa), "c": len(pc)}
    assert status["rounds_closed"] == 2 and status["globals"]["emg"]["version"] == 1
    assert status["refusals_total"] >= 1
    # the round records and evaluations the coordinator received, as they were sent
    assert status["records"]["a"] == {"device": "a", "round": 1, "samples": 10, "shapley": {"eye": 1.0},
                                      "sizes": {"eye": 1}, "priorities": {"eye": 1.0}, "chosen": ["eye"],
                                      "stage1_accuracy": None}
    assert status["accuracy"] == {"a": {"round": 1, "accuracy": 0.5}, "b": {"round": 1, "accuracy": 0.6},
                                  "c": {"round": 1, "accuracy": 0.7}}
