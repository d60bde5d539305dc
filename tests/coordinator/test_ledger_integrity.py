"""Ledger integrity (issue 10, A): lost ledger writes are refused, never resumed silently.

The report: after ``kill -9`` and a WAL cut in half the coordinator "resumed open round 0" with no
warning, while the devices held ``accepted`` acks and had moved on to round 1; every later upload was
refused ``round_closed`` until the deadline. The ledger now counts its commits (meta ``seq``) and,
after each one and before any ack goes out, writes the count to ``ledger.hwm`` outside the WAL; a
ledger behind its mark refuses to open until ``fedmfs-coordinator recover`` starts a new fleet epoch.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedmfs.coordinator import ledger as ledger_mod
from fedmfs.coordinator.cli import main
from fedmfs.coordinator.ledger import Ledger
from fedmfs.coordinator.machine import PersistUpload, Publish, modality_shapes
from fedmfs.coordinator.metrics import Metrics
from fedmfs.coordinator.writer import Batch, LedgerWriter
from fedmfs.core.errors import ConfigError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.payload import ModelHeader, encode_model
from fedmfs.core.records import RoundRecord
from fedmfs.core.wire import (
    Ack,
    AckReason,
    Report,
    RoundState,
    Topics,
    decode_control,
    decode_message,
    encode_message,
    generate_keypair,
    split_payload,
)

# A child that writes through Ledger.batch() (as the ledger writer thread does) and is killed with
# SIGKILL before it can close the ledger: the WAL keeps the commits, nothing is checkpointed.
CRASH = r"""
import os, signal, sys
from fedmfs.coordinator.ledger import Ledger
from fedmfs.core.wire import RoundState
led = Ledger(sys.argv[1])
led.put_meta("fleet", "lab")
led.put_meta("epoch", sys.argv[3])
for r in range(int(sys.argv[2])):
    with led.batch():
        led.put_round(r, RoundState.OPEN, 1e10, 1.0, ["a"], {})
        led.put_upload(r, "a", "eye", os.urandom(3000), f"{r:064x}", 10)
os.kill(os.getpid(), signal.SIGKILL)
"""


def crash(state: Path, batches: int = 40, epoch: int = 1000) -> None:
    p = subprocess.run([sys.executable, "-c", CRASH, str(state), str(batches), str(epoch)], timeout=120)
    assert p.returncode == -signal.SIGKILL


def cut_wal(state: Path, keep: Path) -> int:
    """Copy the -wal away (to ``keep``), then truncate it to half its size; returns the cut size."""
    wal = state / "ledger.sqlite-wal"
    keep.write_bytes(wal.read_bytes())
    half = wal.stat().st_size // 2
    os.truncate(wal, half)
    return half


def ledger_seq(state: Path) -> int:
    """The commit count the ledger holds (read like SQLite reads it after a crash: WAL recovered)."""
    db = sqlite3.connect(state / "ledger.sqlite")
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        return int(row[0]) if row else 0
    finally:
        db.close()


def write_config(tmp_path: Path) -> Path:
    """A coordinator.toml whose state_dir is tmp_path/state (recover reads it)."""
    spec = DatasetSpec((ModalitySpec("eye", (2,), hidden=3),), 3, 5)
    priv, _ = generate_keypair()
    (tmp_path / "key").write_text(priv)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    (tmp_path / "fleet.toml").write_text('[[device]]\nid = "a"\n')
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text('fleet = "lab"\nstate_dir = "state"\nspec = "spec.json"\nfleet_file = "fleet.toml"\n'
                   'signing_key = "key"\n[broker]\nhost = "127.0.0.1"\nport = 1\n')
    return cfg


def refused(state: Path) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        Ledger(state)
    err = e.value
    assert isinstance(err, ledger_mod.LostWritesError), repr(err)
    assert err.exit_code == 2
    assert "\n" not in str(err)
    return err


# ------------------------------------------------------------------------------ the reported case

def test_a_wal_cut_in_half_after_kill_9_is_refused_and_recover_starts_a_later_epoch(tmp_path, capsys):
    cfg = write_config(tmp_path)
    state = tmp_path / "state"
    crash(state, batches=40, epoch=1000)
    marked = 42                                      # two put_meta commits + 40 batches
    cut_wal(state, tmp_path / "ledger.sqlite-wal.copy")
    err = refused(state)
    have = ledger_seq(state)
    assert 0 < have < marked
    msg = str(err)
    assert str(state / "ledger.hwm") in msg and str(state / "ledger.sqlite") in msg
    assert f"holds {have} commit" in msg and f"recorded {marked}" in msg
    assert "acks" in msg and "fedmfs-coordinator recover --config" in msg
    # status still shows what the ledger holds, and says what is wrong
    assert main(["status", "--state-dir", str(state)]) == 0
    warned = capsys.readouterr().err
    assert "warning" in warned and "were lost" in warned and "recover" in warned
    # recover accepts the rollback: a new, later fleet epoch and the mark reset to the ledger
    assert main(["recover", "--config", str(cfg), "--yes"]) == 0
    out = capsys.readouterr().out
    led = Ledger(state)
    try:
        epoch = int(led.get_meta("epoch"))
        assert epoch > 1000 and epoch >= int(time.time() * 1000) - 60_000
        assert led.seq == have + 1 and ledger_mod.read_mark(state).seq == led.seq
        assert f"new fleet epoch {epoch}" in out and "round bookkeeping" in out
        last = led.last_round()
        assert f"round {last.round}" in out
    finally:
        led.close()
    assert main(["recover", "--config", str(cfg), "--yes"]) == 0     # again: harmless, later still
    led = Ledger(state)
    assert int(led.get_meta("epoch")) > epoch
    led.close()


def test_recover_asks_before_it_changes_anything(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path)
    state = tmp_path / "state"
    crash(state, batches=10)
    cut_wal(state, tmp_path / "wal.copy")
    monkeypatch.setattr(sys, "stdin", open(os.devnull))    # not a terminal, no --yes
    assert main(["recover", "--config", str(cfg)]) == 2
    assert "--yes" in capsys.readouterr().err
    refused(state)                                          # nothing changed


# --------------------------------------------------------------------------- other ways to lose writes

def test_an_old_backup_restored_over_a_newer_state_dir_is_refused(tmp_path):
    state = tmp_path / "state"
    led = Ledger(state)
    led.put_meta("fleet", "lab")
    for r in range(3):
        led.put_round(r, RoundState.OPEN, 1e10, 1.0, ["a"], {})
    backup = sqlite3.connect(tmp_path / "backup.sqlite")
    led.db.backup(backup)                                   # docs/deploy.md: the online backup
    backup.close()
    for r in range(3, 6):
        led.put_round(r, RoundState.OPEN, 1e10, 1.0, ["a"], {})
    seq = led.seq
    led.close()
    # docs/deploy.md "Restoring the coordinator", with ledger.hwm left where it was
    for s in ("-wal", "-shm"):
        (state / f"ledger.sqlite{s}").unlink(missing_ok=True)
    (state / "ledger.sqlite").write_bytes((tmp_path / "backup.sqlite").read_bytes())
    err = refused(state)
    assert f"holds {seq - 3} commits" in str(err) and f"recorded {seq}" in str(err)


def test_a_backup_of_an_earlier_epoch_is_refused_even_with_more_commits(tmp_path):
    """After recover, the devices follow the new epoch: a ledger of the old epoch would be refused by
    every device as a replay, whatever its commit count."""
    cfg = write_config(tmp_path)
    state = tmp_path / "state"
    crash(state, batches=30, epoch=1000)
    db = sqlite3.connect(state / "ledger.sqlite")            # recovers the WAL: seq 32, epoch 1000
    old = sqlite3.connect(tmp_path / "old.sqlite")
    db.backup(old)
    old.close()
    db.execute("UPDATE meta SET value = '5' WHERE key = 'seq'")     # as if cut back to 5 commits
    db.commit()
    db.close()
    refused(state)
    assert main(["recover", "--config", str(cfg), "--yes"]) == 0
    led = Ledger(state)
    assert led.seq == 6
    led.close()
    for s in ("-wal", "-shm"):
        (state / f"ledger.sqlite{s}").unlink(missing_ok=True)
    (state / "ledger.sqlite").write_bytes((tmp_path / "old.sqlite").read_bytes())    # seq 32 > 6
    err = refused(state)
    assert "epoch 1000" in str(err)


def test_a_missing_mark_is_refused_when_the_ledger_has_commits(tmp_path):
    state = tmp_path / "state"
    led = Ledger(state)
    led.put_meta("fleet", "lab")
    led.close()
    (state / "ledger.hwm").unlink()
    with pytest.raises(ConfigError) as e:
        Ledger(state)
    msg = str(e.value)
    assert isinstance(e.value, ledger_mod.LostWritesError) and "\n" not in msg
    assert str(state / "ledger.hwm") in msg and "missing" in msg and "recover" in msg


def test_a_ledger_from_before_the_mark_gets_one_with_a_warning(tmp_path, caplog):
    state = tmp_path / "state"
    led = Ledger(state)
    led.put_meta("fleet", "lab")
    led.put_round(0, RoundState.OPEN, 1e10, 1.0, ["a"], {})
    led.db.execute("DELETE FROM meta WHERE key = 'seq'")      # as an older coordinator left it
    led.db.commit()
    led.close()
    (state / "ledger.hwm").unlink()
    with caplog.at_level("WARNING", "fedmfs.coordinator"):
        led = Ledger(state)
    try:
        assert "predates" in caplog.text and "ledger.hwm" in caplog.text
        assert ledger_mod.read_mark(state).seq == 0 == led.seq
        led.put_meta("x", "y")
        assert ledger_mod.read_mark(state).seq == 1 == led.seq
    finally:
        led.close()


def test_a_new_ledger_gets_its_mark_quietly_and_private(tmp_path, caplog):
    state = tmp_path / "state"
    old = os.umask(0o022)
    try:
        with caplog.at_level("WARNING", "fedmfs.coordinator"):
            led = Ledger(state)
    finally:
        os.umask(old)
    assert not caplog.records
    hwm = state / "ledger.hwm"
    ino, size = hwm.stat().st_ino, hwm.stat().st_size
    assert stat.S_IMODE(hwm.stat().st_mode) == 0o600
    for i in range(5):
        led.put_meta("k", str(i))
    assert led.seq == 5 and ledger_mod.read_mark(state).seq == 5
    assert (hwm.stat().st_ino, hwm.stat().st_size) == (ino, size)      # rewritten in place
    led.close()
    led = Ledger(state)
    assert led.seq == 5
    led.close()


def test_a_damaged_mark_is_refused(tmp_path):
    state = tmp_path / "state"
    Ledger(state).close()
    (state / "ledger.hwm").write_bytes(b"\xff" * 100)
    with pytest.raises(ConfigError) as e:
        Ledger(state)
    assert isinstance(e.value, ledger_mod.LostWritesError)
    assert str(state / "ledger.hwm") in str(e.value) and "recover" in str(e.value)


def test_a_torn_mark_write_leaves_the_previous_mark(tmp_path):
    """Two slots: a write torn in the middle leaves the other slot, one commit older (and the ledger,
    committed before the mark, is not behind it)."""
    state = tmp_path / "state"
    led = Ledger(state)
    for i in range(3):
        led.put_meta("k", str(i))
    led.close()
    m = ledger_mod.read_mark(state)
    slot = ledger_mod.MARK_SLOTS[m.gen % 2]
    with open(state / "ledger.hwm", "r+b") as f:
        f.seek(slot + 10)
        f.write(b"\x00\x01\x02")
    assert ledger_mod.read_mark(state).seq == m.seq - 1
    led = Ledger(state)                                       # ledger 3 >= mark 2: fine, mark caught up
    assert ledger_mod.read_mark(state).seq == 3
    led.close()


def test_a_crash_between_the_commit_and_the_mark_is_not_a_loss(tmp_path, monkeypatch):
    state = tmp_path / "state"
    led = Ledger(state)
    led.put_meta("k", "0")

    def fail(*a):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ledger_mod.os, "fdatasync", fail)
    with pytest.raises(ConfigError):                          # the commit is in, its mark is not
        led.put_meta("k", "1")
    monkeypatch.undo()
    led.close()
    led = Ledger(state)                                       # ledger 2 > mark 1: nothing lost
    try:
        assert led.get_meta("k") == "1" and led.seq == 2 and ledger_mod.read_mark(state).seq == 2
    finally:
        led.close()


def test_each_ack_goes_out_after_its_mark_is_written(tmp_path):
    led = Ledger(tmp_path)
    seen = []
    w = LedgerWriter(led, Metrics(), lambda t, p, q, r: seen.append((ledger_mod.read_mark(tmp_path).seq, led.seq)))
    w.start()
    for i in range(20):
        w.submit(Batch([PersistUpload(0, f"d{i}", "eye", b"x", f"{i:064x}", 1), Publish(f"d{i}", b"ack")], 0))
    assert w.flush(10)
    w.stop()
    led.close()
    assert len(seen) == 20 and all(mark == seq for mark, seq in seen)


def test_one_writer_per_state_dir(tmp_path, capsys):
    cfg = write_config(tmp_path)
    state = tmp_path / "state"
    led = Ledger(state)
    try:
        with pytest.raises(ConfigError) as e:
            Ledger(state)
        assert "another process" in str(e.value) and str(state / "ledger.hwm") in str(e.value)
        assert main(["recover", "--config", str(cfg), "--yes"]) == 2      # not while a coordinator runs
        assert "another process" in capsys.readouterr().err
        Ledger(state, readonly=True).close()                  # status still reads it
    finally:
        led.close()
    Ledger(state).close()


# --------------------------------------------------------------- the real coordinator, killed with -9

SPEC = DatasetSpec((ModalitySpec("eye", (2,), hidden=3), ModalitySpec("emg", (4,), hidden=2)), 3, 5)


def _write_coordinator(tmp_path: Path, port: int) -> Path:
    priv, _ = generate_keypair()
    (tmp_path / "key").write_text(priv)
    (tmp_path / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    (tmp_path / "fleet.toml").write_text('[[device]]\nid = "a"\n[[device]]\nid = "b"\n')
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f"""
fleet = "lab"
state_dir = "state"
spec = "spec.json"
fleet_file = "fleet.toml"
signing_key = "key"
seed = 3
[rounds]
total = 3
seconds = 3600
quorum = 1
chunk_bytes = 300
max_update_ratio = inf
[broker]
host = "127.0.0.1"
port = {port}
""")
    return cfg


def _cli(*args: str, log: Path | None = None):
    cmd = [sys.executable, "-m", "fedmfs.coordinator.cli", *args]
    if log is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    f = open(log, "ab")
    return subprocess.Popen(cmd, stdout=f, stderr=f)


class _Peer:
    """Devices a and b played by one raw paho client; it keeps each round message's epoch."""

    def __init__(self, port: int):
        self.q: queue.Queue = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="peer", protocol=mqtt.MQTTv5)
        self.c.on_message = lambda c, u, m: self.q.put((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", port)
        self.c.subscribe("fedmfs/v1/lab/#", 1)
        self.c.loop_start()
        self.t = Topics("lab")

    def wait(self, pred, timeout: float = 60.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                topic, p = self.q.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            res = pred(topic, p)
            if res:
                return res
        raise AssertionError("timed out waiting")

    def round(self, pred, timeout: float = 60.0):
        """(epoch, round, state) of the first round message that satisfies ``pred``."""
        def get(topic, p):
            if topic != self.t.round() or not p:
                return None
            h, body = decode_control(p, None)
            ann = json.loads(body)
            got = (h.epoch, ann["round"], ann["state"])
            return got if pred(*got) else None
        return self.wait(get, timeout)

    def ack(self, dev: str) -> Ack:
        return self.wait(lambda t, p: decode_message(p, Ack) if t == self.t.ack(dev) else None)

    def upload(self, dev: str, r: int) -> AckReason:
        rng = np.random.default_rng(r * 10 + ord(dev))
        st = {k: rng.standard_normal(s).astype(np.float32) for k, s in modality_shapes(SPEC["eye"], 3).items()}
        for f in split_payload(encode_model(st, ModelHeader(r, "eye", 10)), 300):
            self.c.publish(self.t.upload(dev, r, "eye"), f, 1).wait_for_publish(10)
        return self.ack(dev).reason

    def report(self, dev: str, r: int) -> AckReason:
        rep = Report(RoundRecord(dev, r, 10, {"eye": 1.0}, {"eye": 1}, {"eye": 1.0}, ("eye",)))
        self.c.publish(self.t.report(dev), encode_message(rep), 1).wait_for_publish(10)
        return self.ack(dev).reason

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.integration
def test_a_coordinator_killed_mid_round_with_its_wal_cut_refuses_to_run_until_recovered(tmp_path, mosquitto):
    cfg = _write_coordinator(tmp_path, mosquitto.port)
    state, log = tmp_path / "state", tmp_path / "coordinator.log"
    run = ("run", "--config", str(cfg), "--connect-timeout", "20")
    peer = _Peer(mosquitto.port)
    proc = _cli(*run, log=log)
    try:
        epoch, _, _ = peer.round(lambda e, r, s: r == 0 and s == "open")
        for d in "ab":                            # round 0: both accepted and reported
            assert peer.upload(d, 0) is AckReason.ACCEPTED
            assert peer.report(d, 0) is AckReason.REPORT_ACCEPTED
        peer.round(lambda e, r, s: r == 1 and s == "open")
        assert peer.upload("a", 1) is AckReason.ACCEPTED     # a moved on: it holds an ack of round 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        marked = ledger_mod.read_mark(state).seq
        cut_wal(state, tmp_path / "ledger.sqlite-wal.copy")
        proc = _cli(*run, log=log)
        assert proc.wait(60) == 2
        text = log.read_text()
        assert "Traceback" not in text
        line = [x for x in text.splitlines() if x.startswith("fedmfs-coordinator: ")]
        assert len(line) == 1 and str(state / "ledger.hwm") in line[0] and f"recorded {marked}" in line[0]
        rec = _cli("recover", "--config", str(cfg), "--yes")
        assert rec.returncode == 0, rec.stderr
        assert "new fleet epoch" in rec.stdout
        proc = _cli(*run, log=log)
        later, r, _ = peer.round(lambda e, r, s: e > epoch)   # the coordinator announces the later epoch
        assert r <= 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        peer.close()
