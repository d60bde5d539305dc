"""The ledger writer thread: commit before publish, order kept, a failed commit publishes nothing more."""

import sqlite3
import threading

from fedmfs.coordinator.ledger import Ledger
from fedmfs.coordinator.machine import PersistUpload, Publish
from fedmfs.coordinator.metrics import Metrics
from fedmfs.coordinator.writer import Batch, LedgerWriter, SetOnline


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
        w.submit(Batch([PersistUpload(0, dev, "eye", b"x" * (i + 1), f"{i:064x}", 1), SetOnline(dev, True),
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
