"""A full device disk (issue 10, point 7): it logged a full traceback every second.

Now a job failing with an OSError is one line naming the file, retried ever less often (up to once a
minute), and the repeats are logged at most once a minute with a count; saving the progress file on a
full disk is rate-limited the same way. A real tmpfs filled to the last byte stands in for the disk.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from fedmfs.edge.machine import JobFailed, JobKind, RefusalLog, StartTraining, Tick
from fedmfs.edge.worker import Worker

from .test_edge_machine import machine, of, ready


def _fail_full(job):
    raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/fedmfs/pending/eye.bin")


def test_a_full_disk_is_one_line_backed_off_and_rate_limited(caplog):
    posted = []
    w = Worker(_fail_full, posted.append)
    try:
        m = machine()
        ready(m)
        caplog.set_level(logging.INFO)
        now, started = 0.0, 0
        while now < 600.0:
            for a in of(m.handle(Tick(now)), StartTraining):
                started += 1
                w.submit(a)
                deadline = time.monotonic() + 10
                while not posted and time.monotonic() < deadline:
                    time.sleep(0.01)
                [failed] = posted
                posted.clear()
                assert isinstance(failed, JobFailed) and failed.retryable and failed.kind is JobKind.TRAIN
                assert "No space left on device" in failed.error and "pending/eye.bin" in failed.error
                m.handle(JobFailed(failed.kind, failed.round, failed.error, True, now))
            now += 0.5
    finally:
        w.stop(5)
    # retried after 1, 2, 4, ... 60 s: not twice a second for ten minutes
    assert 8 <= started <= 16, started
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    assert len(errors) <= 11, [r.getMessage() for r in errors]          # at most once a minute
    assert any("more like it held back" in r.getMessage() for r in errors)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_saving_progress_on_a_full_tmpfs_logs_one_line_a_minute(tmp_path, caplog):
    from fedmfs.edge.daemon import EdgeDaemon

    mnt = tmp_path / "state"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)     # fill it to the last byte
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        d = object.__new__(EdgeDaemon)       # only the action executor: no config, no link
        d.dir, d.errors, d.outbox, d.link = Path(mnt), RefusalLog(60.0), [], None
        caplog.set_level(logging.INFO)
        from fedmfs.edge.machine import SaveProgress
        for _ in range(200):
            d._apply([SaveProgress({"reported": 0})])
        lines = [r for r in caplog.records if "could not carry out SaveProgress" in r.getMessage()]
        assert len(lines) == 1 and "No space left on device" in lines[0].getMessage()
        assert not any(r.exc_info for r in caplog.records)
    finally:
        subprocess.run(["umount", str(mnt)])
