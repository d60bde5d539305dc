"""The broker restarts under a running fleet.

Without persistence a restarted Mosquitto has lost every retained message (``round``, the devices'
``config``, the globals) and every session; a device restarted after that must still get its round and
config, without an operator. With persistence (SIGTERM: the DB is written on the way out; SIGKILL: only
what the last autosave wrote) the fleet must carry on. In every case: all processes exit 0, no upload is
lost or counted twice, and the globals equal the fault-free run's.
"""

import signal

import pytest
from faults.harness import CHUNK, check_ledger, check_same_as_reference, emit

pytestmark = [pytest.mark.faults, pytest.mark.integration]

DEVICES = (0, 1)          # S00 and S02
SLOW = "S00"              # its uploads are paced to 16 KB/s, so "mid-upload" lasts seconds (76 KB in round 0)
UP_RATE = 16 * 1024


def _mid_upload(run, device=SLOW):
    """Wait until ``device`` has sent a few chunk frames of its first upload (its proxy's upload count)."""
    px = run.proxies[device]
    run.wait_until(lambda: px.counters.up >= 2.5 * CHUNK, 120, f"{device} to be uploading")
    return px.counters.up


def _restart_devices(run):
    """SIGTERM and start each device again, between its jobs: one stopped in the middle of a training
    job is the fault of test_device_restarted_mid_training, not this file's."""
    for d in run.devices:
        run.restart_between_jobs(d)


def _finish(run, ref, capsys, what, timeout=200, stall=60):
    try:
        took = run.wait_done(timeout, stall=stall, what=what)
    finally:
        emit(capsys, f"[{what}] t={run.elapsed():.0f} s; ledger {run.progress()}; "
                     + "; ".join(p.summary() for p in run.proxies.values()))
    print(f"{what}: finished {took:.0f} s after the fault")
    check_same_as_reference(ref, run.report())
    check_ledger(run.state_dir, ref)


def test_broker_without_persistence_restarted_between_rounds_then_devices_restarted(broker, make_run, reference,
                                                                                    capsys):
    ref = reference(DEVICES)
    run = make_run(broker, DEVICES)
    run.start_all()
    run.wait_round_closed(0)
    for px in run.proxies.values():        # round 1's uploads take seconds: the devices can restart mid-upload
        px.set("up", rate=UP_RATE)
    broker.restart(signal.SIGTERM)         # retained round, configs and globals are gone
    run.mark("broker restarted (no persistence)")
    _restart_devices(run)                  # and the devices forget what they held in memory
    _finish(run, ref, capsys, "broker restarted (no persistence) between rounds, devices restarted")


def test_broker_without_persistence_restarted_mid_upload_then_devices_restarted(broker, make_run, reference, capsys):
    ref = reference(DEVICES)
    run = make_run(broker, DEVICES)
    for px in run.proxies.values():
        px.set("up", rate=UP_RATE)
    run.start_all()
    sent = _mid_upload(run)
    broker.restart(signal.SIGTERM)
    run.mark("broker restarted (no persistence)")
    up = run.progress()
    assert up is not None and up.closed == 0, f"the fault came too late: {up}"
    print(f"broker restarted after {SLOW} sent {sent} bytes of its round-0 uploads")
    _restart_devices(run)
    _finish(run, ref, capsys, "broker restarted (no persistence) mid-upload, devices restarted")


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_broker_with_persistence_restarted_mid_upload(persistent_broker, make_run, reference, capsys, how):
    ref = reference(DEVICES)
    run = make_run(persistent_broker, DEVICES)
    run.proxies[SLOW].set("up", rate=UP_RATE)
    run.start_all()
    sent = _mid_upload(run)
    persistent_broker.restart(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    run.mark(f"broker restarted ({how}, persistence on)")
    print(f"broker ({how}, persistence on) restarted after {SLOW} sent {sent} bytes of its round-0 uploads")
    _finish(run, ref, capsys, f"broker with persistence restarted ({how}) mid-upload")
