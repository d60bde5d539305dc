"""The worker thread and the daemon adapter: heavy work off the network loop, health-gated watchdog."""

import json
import queue
import socket
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedmfs.adapters.mqtt import BrokerConfig
from fedmfs.adapters.sdnotify import Notifier, Watchdog
from fedmfs.core.errors import ConfigError
from fedmfs.core.records import RoundRecord
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.wire import (
    Ack,
    AckReason,
    DeviceConfig,
    RoundAnnouncement,
    RoundState,
    Signer,
    Topics,
    decode_chunk,
    encode_message,
    generate_keypair,
    sign_message,
)
from fedmfs.edge.config import EdgeConfig
from fedmfs.edge.daemon import EdgeDaemon
from fedmfs.edge.machine import JobFailed, JobKind, RunStage2, StartTraining, Trained
from fedmfs.edge.worker import Worker

PRIV, PUB = generate_keypair()


def _wait(pred, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out: {what}")


def test_worker_runs_one_job_at_a_time_and_posts_its_result():
    release, out = threading.Event(), queue.Queue()
    job = RunStage2(3, {})

    def run(j):
        assert release.wait(10)
        return ("done", j.round)

    clock = [100.0]
    w = Worker(run, out.put, clock=lambda: clock[0])
    try:
        w.submit(job)
        assert w.busy
        clock[0] = 130.0
        assert w.running_for() == 30.0
        with pytest.raises(RuntimeError, match="busy"):
            w.submit(job)
        release.set()
        assert out.get(timeout=10) == ("done", 3)
        _wait(lambda: not w.busy, what="worker idle")
        assert w.running_for() == 0.0
    finally:
        release.set()
        assert w.stop(10)


@pytest.mark.parametrize("exc, retryable, code", [(OSError("disk full"), True, 1), (ValueError("x"), True, 1),
                                                   (ConfigError("bad lr"), False, ConfigError.exit_code),
                                                   (RuntimeError("bug"), False, 1)])
def test_worker_turns_exceptions_into_job_failures(exc, retryable, code):
    out = queue.Queue()

    def run(j):
        raise exc

    w = Worker(run, out.put)
    try:
        w.submit(StartTraining(2, {}, {}, DeviceConfig("d", SelectionPolicy(gamma=1))))
        ev = out.get(timeout=10)
        assert isinstance(ev, JobFailed) and ev.kind is JobKind.TRAIN and ev.round == 2
        assert (ev.retryable, ev.exit_code) == (retryable, code) and str(exc) in ev.error
    finally:
        assert w.stop(10)


@pytest.fixture
def notify(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.05)
    yield path, s
    s.close()


def _drain(s) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except (TimeoutError, BlockingIOError):
            return out


def _config(tmp_path, port=1883, **kw) -> EdgeConfig:
    return EdgeConfig(device="d1", fleet="f", data=tmp_path / "none.npz", spec=tmp_path / "none.json",
                      state_dir=tmp_path / "state", coordinator_key=PUB,
                      broker=BrokerConfig(port=port, protocol="5"), ack_timeout=5.0, **kw)


def test_watchdog_pings_only_while_the_job_is_within_its_deadline(tmp_path, notify):
    path, sock = notify
    d = EdgeDaemon(_config(tmp_path, job_timeout=60.0),
                   notifier=Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}))
    clock, wclock = [1000.0], [0.0]
    d.watchdog = Watchdog(d.notifier, clock=lambda: clock[0])
    release = threading.Event()
    d.worker = Worker(lambda j: release.wait(10), lambda ev: None, clock=lambda: wclock[0])
    try:
        d._beat()
        assert _drain(sock) == ["WATCHDOG=1"]
        d.worker.submit(RunStage2(0, {}))
        wclock[0] = 59.0                   # a long job, within job_timeout: still healthy
        clock[0] += 1.5
        d._beat()
        assert _drain(sock) == ["WATCHDOG=1"]
        wclock[0] = 61.0                   # over job_timeout: the worker's heartbeat goes stale
        clock[0] += 1.5
        d._beat()
        clock[0] += 1.5
        d._beat()
        assert _drain(sock) == []
    finally:
        release.set()
        assert d.worker.stop(10)


def test_acks_and_configs_flow_while_the_round_trains(tmp_path, mosquitto, notify):
    """Over real Mosquitto: a training job that blocks does not block the loop; its result is uploaded."""
    path, sock = notify
    d = EdgeDaemon(_config(tmp_path, port=mosquitto.port),
                   notifier=Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}))
    started, release = threading.Event(), threading.Event()
    payload = b"P" * 10

    def fake_run(job):
        started.set()
        assert release.wait(30)
        rec = RoundRecord("d1", job.round, 5, sizes={"a": 10}, chosen=("a",))
        return Trained(job.round, ("a",), {"a": payload}, rec, time.time())

    d.trainer.run = fake_run
    t = Topics("f")
    got: queue.Queue = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-coordinator")
    c.on_message = lambda cl, u, m: got.put((m.topic, bytes(m.payload)))
    c.connect("127.0.0.1", mosquitto.port)
    c.subscribe(t.upload("d1", 0, "a"), 1)
    c.subscribe(t.report("d1"), 1)
    c.loop_start()
    runner = threading.Thread(target=lambda: d.run(connect_timeout=10))
    try:
        # the coordinator's messages, signed with the key the device holds (fleet epoch 1)
        c.publish(t.config("d1"), sign_message(DeviceConfig("d1", SelectionPolicy(gamma=1)), "f", 1, 0, Signer(PRIV)),
                  1, True).wait_for_publish(5)
        ann = RoundAnnouncement("f", 0, RoundState.OPEN, time.time() + 600, 1, ("d1",), {}, 4)
        c.publish(t.round(), sign_message(ann, "f", 1, 0, Signer(PRIV)), 1, True).wait_for_publish(5)
        runner.start()
        assert started.wait(20)
        _drain(sock)
        # while the job blocks: a new config reaches the machine, the watchdog keeps being pinged
        c.publish(t.config("d1"), sign_message(DeviceConfig("d1", SelectionPolicy(gamma=1, cap_bytes=99)), "f", 1, 0,
                                               Signer(PRIV)), 1, True)
        _wait(lambda: d.machine.config is not None and d.machine.config.policy.cap_bytes == 99, what="config applied")
        _wait(lambda: "WATCHDOG=1" in _drain(sock), what="a watchdog ping during training")
        assert d.machine.busy
        release.set()
        frames = [_wait(lambda: got.get(timeout=10), what=f"chunk {i}") for i in range(3)]
        assert sorted(decode_chunk(f[1])[0].index for f in frames) == [0, 1, 2]
        c.publish(t.ack("d1"), encode_message(Ack("d1", 0, AckReason.ACCEPTED, "a",
                                                  decode_chunk(frames[0][1])[0].sha256)), 1)
        topic, rep = got.get(timeout=10)
        assert topic == t.report("d1") and b'"accepted":["a"]' in rep
        c.publish(t.ack("d1"), encode_message(Ack("d1", 0, AckReason.REPORT_ACCEPTED)), 1)
        state = tmp_path / "state" / "state.json"
        _wait(lambda: json.loads(state.read_text())["pending"] is None, what="round finished on disk")
        assert json.loads(state.read_text()) == {"reported": 0, "stage2": -1, "evaluated": -1, "pending": None,
                                                 "epoch": 1, "announced": 0, "announced_state": "open"}
        assert json.loads((tmp_path / "state" / "history.json").read_text())["0"]["acks"] == {"a": "accepted"}
    finally:
        release.set()
        d.stop_event.set()
        runner.join(20)
        c.loop_stop()
        c.disconnect()
    assert not runner.is_alive()


def test_a_finished_training_job_is_taken_again_after_a_restart_not_retrained(tmp_path):
    # found by tests/faults (a device SIGTERMed while it trained round 1): the job finished and saved
    # its learner, the daemon stopped before the result reached the machine, and the restarted device
    # trained round 1 again from a learner that had already trained it, choosing something else
    import hashlib

    from fedmfs.core.settings import TrainConfig
    from fedmfs.edge.worker import RESULT, Trainer

    def no_training():
        raise AssertionError("trained again")

    t = Trainer("d1", tmp_path, TrainConfig(), 0, 0, no_training)
    rec = RoundRecord("d1", 1, 40, {"a": 0.5}, {"a": 3}, {"a": 1.0}, ("a",), 0.5)
    (tmp_path / "pending").mkdir()
    (tmp_path / "pending" / "a.bin").write_bytes(b"AAA")
    (tmp_path / "pending" / RESULT).write_text(json.dumps(
        {"round": 1, "chosen": ["a"], "record": rec.to_dict(), "sha256": {"a": hashlib.sha256(b"AAA").hexdigest()}}))
    job = StartTraining(1, {}, {}, DeviceConfig("d1", SelectionPolicy(gamma=1)))
    got = t.train(job)
    assert (got.round, got.chosen, dict(got.payloads), got.record) == (1, ("a",), {"a": b"AAA"}, rec)
    (tmp_path / "pending" / "a.bin").write_bytes(b"AAB")        # damaged: the result is not taken
    with pytest.raises(AssertionError, match="trained again"):
        t.train(job)
    with pytest.raises(AssertionError, match="trained again"):  # another round's result is not taken
        t.train(StartTraining(2, {}, {}, DeviceConfig("d1", SelectionPolicy(gamma=1))))


def test_spool_windows_merged_before_a_restart_are_read_back_with_the_data(tmp_path, caplog):
    from fedmfs.core.data.format import Fleet, save_fleet
    from fedmfs.core.data.synthetic import make_synthetic
    from fedmfs.core.settings import TrainConfig
    from fedmfs.edge.worker import Trainer

    f = make_synthetic("small", 0)
    c0, c1 = f.clients[0], f.clients[1]        # S00 and S02 have the same modalities
    save_fleet(Fleet(f.spec, [c1], f.metadata), tmp_path / "extra")
    merged = tmp_path / "spool" / "merged"
    merged.mkdir(parents=True)
    (tmp_path / "extra" / f"{c1.name}.npz").rename(merged / "a.npz")
    (merged / "b.npz").write_bytes(b"not an npz")
    t = Trainer(c0.name, tmp_path / "state", TrainConfig(), 0, 0, lambda: (f.spec, c0), spool=tmp_path / "spool")
    data = t._with_merged_spool(f.spec, c0)
    assert len(data) == len(c0) + len(c1) and data.name == c0.name
    assert (data.y[len(c0):] == c1.y).all()
    assert "merged spool file" in caplog.text and "b.npz" in caplog.text      # left out, said so


_FREEZE_CHECK = """
import gc, sys
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.settings import TrainConfig
from fedmfs.edge.worker import Trainer

fleet = make_synthetic("small", 0)
client = fleet.clients[0]
own = sys.argv[1] == "own"
t = Trainer(client.name, sys.argv[2], TrainConfig(), 0, 0, lambda: (fleet.spec, client))
t.own_process = own
t.client({})
print(gc.get_freeze_count())
"""


@pytest.mark.parametrize("own", ["own", "shared"])
def test_a_daemon_freezes_what_lives_once_its_learner_is_made(tmp_path, own):
    # the modules torch and ONNX bring (~170,000 objects) live as long as the daemon; a full collection
    # (once a round, and Python's own during training) walked them every time: ~0.07 s of CPU each.
    # A process that is not the device's own (a simulator, a test) keeps its collector as it is.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FREEZE_CHECK, own, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    frozen = int(out[-1])
    if own == "own":
        assert frozen > 50_000
    else:
        assert frozen == 0
