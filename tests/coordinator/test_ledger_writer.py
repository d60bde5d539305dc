"""The ledger writer thread: commit before publish, order kept, a failed commit publishes nothing more."""

import sqlite3
import threading
import time

import pytest

from fedmfs.coordinator.ledger import Ledger
from fedmfs.coordinator.machine import PersistStatus, PersistUpload, Publish, Refused
from fedmfs.coordinator.metrics import Metrics
from fedmfs.coordinator.writer import Batch, LedgerWriter
from fedmfs.core.wire import AckReason


def _committed(path, device):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM uploads WHERE device = ?", (device,)).fetchone()[0]
    finally:
        db.close()


def test_each_ack_goes_out_after_its_upload_committed_and_in_order(tmp_path):
    led = Ledger(tmp_path)
    seen = []

    def publish(topic, payload, qos, retain):
        # another connection sees the row: the transaction committed before the ack
        seen.append((topic, _committed(led.path, topic)))

    w = LedgerWriter(led, Metrics(), publish)
    w.start()
    for i in range(30):
        dev = f"d{i:02d}"
        w.submit(Batch([PersistUpload(0, dev, "eye", b"x" * (i + 1), f"{i:064x}", 1), PersistStatus(dev, True),
                        Publish(dev, b"ack")], 0))
    assert w.flush(10)
    w.stop()
    assert seen == [(f"d{i:02d}", 1) for i in range(30)]
    assert led.bytes_by_device(0) == {f"d{i:02d}": i + 1 for i in range(30)}
    assert all(d["online"] for d in led.devices())
    assert 1 <= w.commits <= 30
    led.close()


def test_failed_commit_publishes_nothing_of_it_or_later_and_reports_failure(tmp_path):
    led = Ledger(tmp_path)
    published, failed = [], threading.Event()
    w = LedgerWriter(led, Metrics(), lambda t, p, q, r: published.append(t), failed.set)
    w.start()
    w.submit(Batch([PersistUpload(0, "a", "eye", b"ok", "0" * 64, 1), Publish("ack-a", b"")], 0))
    assert w.flush(10)
    w.submit(Batch([PersistUpload(0, "b", "eye", None, "1" * 64, 1), Publish("ack-b", b"")], 0))  # NOT NULL
    w.submit(Batch([PersistUpload(0, "c", "eye", b"ok", "2" * 64, 1), Publish("ack-c", b"")], 0))
    assert w.flush(10)
    w.stop()
    assert failed.is_set() and w.failed
    assert published == ["ack-a"]
    assert led.bytes_by_device(0) == {"a": 2}
    led.close()


# ------------------------------------------------------------------- hostile frames: refusals are cheap

N_HOSTILE = 400


def _commits(led):
    """Count the transactions the ledger's connection commits (each one is an fsync of the WAL)."""
    seen = []
    led.db.set_trace_callback(lambda sql: seen.append(sql) if sql.strip().upper() == "COMMIT" else None)
    return seen


def _refusal_rows(path):
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT device, reason, count, nbytes FROM refusals ORDER BY device, reason").fetchall()
    finally:
        db.close()


def _hostile(i, device="mallory", reason=AckReason.BAD_CHUNK):
    return Batch([Refused(0, device, "eye", reason, 100, f"frame {i}"), Publish(f"ack/{device}", b"refused")], 0)


def test_hostile_frames_cost_no_commit_each_and_one_row(tmp_path):
    """Frames handled one loop turn each (the worst case: no group commit helps): before, each one
    committed a refusal row (N rows, N fsyncs); now they are counted in one row, written with the next
    durable write or when the writer stops, and every refusal ack still goes out at once."""
    led = Ledger(tmp_path)
    commits = _commits(led)
    published = []
    w = LedgerWriter(led, Metrics(), lambda t, p, q, r: published.append(t))   # inline: one turn per frame
    for i in range(N_HOSTILE):
        w.submit(_hostile(i))
    assert len(published) == N_HOSTILE                    # each refusal answered without waiting
    assert commits == [] and w.commits == 0               # and not one fsync for them
    w.stop()                                              # what is pending is written on the way out
    assert len(commits) == 1
    assert _refusal_rows(led.path) == [("mallory", "bad_chunk", N_HOSTILE, 100 * N_HOSTILE)]
    assert led.refusals() == [{"round": 0, "device": "mallory", "modality": "eye", "reason": "bad_chunk",
                               "count": N_HOSTILE, "nbytes": 100 * N_HOSTILE, "detail": f"frame {N_HOSTILE - 1}"}]
    assert led.refusal_count() == N_HOSTILE
    led.close()


def test_an_accepted_upload_is_durable_before_its_ack_and_carries_the_pending_refusals(tmp_path):
    led = Ledger(tmp_path)
    commits = _commits(led)
    seen = []

    def publish(topic, payload, qos, retain):
        if topic == "ack/honest":   # another connection sees the row: committed before the ack
            seen.append((_committed(led.path, "honest"), _refusal_rows(led.path)))

    w = LedgerWriter(led, Metrics(), publish)
    w.start()
    for i in range(N_HOSTILE):
        w.submit(_hostile(i))
    w.submit(Batch([PersistUpload(0, "honest", "eye", b"model", "a" * 64, 10), Publish("ack/honest", b"ok")], 0))
    for i in range(N_HOSTILE):
        w.submit(_hostile(i))
    assert w.flush(10)
    w.stop()
    # the upload was committed before its ack, with every refusal counted before it (and those of the
    # later frames its group commit took along), in one row
    [(uploads, rows)] = seen
    assert uploads == 1 and len(rows) == 1
    assert rows[0][:2] == ("mallory", "bad_chunk") and N_HOSTILE <= rows[0][2] <= 2 * N_HOSTILE
    assert led.refusal_count() == 2 * N_HOSTILE
    assert len(commits) <= 3             # the upload's, the flush's and at most one more on stopping
    led.close()


def test_refusal_rows_are_capped_and_what_is_dropped_is_counted(tmp_path):
    """Hostile frames under many device names (an open broker) or reasons: the rows stay under the
    cap; past it each round keeps one overflow row per reason (device '*') counting the rest."""
    led = Ledger(tmp_path, max_refusal_rows=50)
    w = LedgerWriter(led, Metrics(), None)
    reasons = [AckReason.BAD_CHUNK, AckReason.UNKNOWN_DEVICE]
    for i in range(N_HOSTILE):
        w.submit(_hostile(i, device=f"m{i:04d}", reason=reasons[i % 2]))
    w.stop()
    rows = _refusal_rows(led.path)
    assert len(rows) == 50 + 2
    assert sum(r[2] for r in rows) == N_HOSTILE == led.refusal_count()
    overflow = {r[1]: r[2] for r in rows if r[0] == "*"}
    assert overflow == {"bad_chunk": N_HOSTILE // 2 - 25, "unknown_device": N_HOSTILE // 2 - 25}
    # a device that already has its row keeps counting there, even past the cap
    w.submit(_hostile(0, device="m0000"))
    w.stop()
    assert dict(((d, r), c) for d, r, c, _ in _refusal_rows(led.path))[("m0000", "bad_chunk")] == 2
    assert len(_refusal_rows(led.path)) == 52
    led.close()


def test_the_writer_thread_writes_lone_refusals_after_a_while(tmp_path):
    led = Ledger(tmp_path)
    w = LedgerWriter(led, Metrics(), None, refusal_flush_seconds=0.05)
    w.start()
    w.submit(_hostile(0))
    end = time.monotonic() + 10
    while not _refusal_rows(led.path) and time.monotonic() < end:
        time.sleep(0.01)
    assert _refusal_rows(led.path) == [("mallory", "bad_chunk", 1, 100)]
    w.stop()
    led.close()


def test_a_ledger_with_the_old_refusals_table_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    db.executescript("""
        CREATE TABLE refusals (
          id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, device TEXT NOT NULL, modality TEXT,
          reason TEXT NOT NULL, nbytes INTEGER NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);
        INSERT INTO refusals (round, device, modality, reason, nbytes, detail, at) VALUES
          (0, 'a', 'eye', 'over_cap', 10, 'one', 1.0), (0, 'a', 'eye', 'over_cap', 20, 'two', 2.0),
          (1, 'b', NULL, 'bad_message', 5, 'x', 3.0);
    """)
    db.close()
    led = Ledger(tmp_path)
    assert led.refusals() == [
        {"round": 0, "device": "a", "modality": "eye", "reason": "over_cap", "count": 2, "nbytes": 30,
         "detail": "two"},
        {"round": 1, "device": "b", "modality": None, "reason": "bad_message", "count": 1, "nbytes": 5,
         "detail": "x"}]
    led.close()


@pytest.mark.parametrize("max_rows", [0, -1])
def test_the_cap_must_be_positive(tmp_path, max_rows):
    with pytest.raises(ValueError):
        Ledger(tmp_path, max_refusal_rows=max_rows)
