"""Processes that die or go silent: a device killed with SIGKILL in the middle of an upload and
started again; a device stopped (SIGSTOP) before it uploads anything, so the rounds close at their
deadline with the others' uploads (quorum 2 of 3)."""

import signal

import pytest
from faults.harness import CHUNK, check_ledger, check_same_as_reference, emit, global_frame_sizes

from fedmfs.coordinator.ledger import Ledger

pytestmark = [pytest.mark.faults, pytest.mark.integration]

DEVICES = (0, 1)          # S00 and S02
SLOW = "S00"              # its uploads are paced to 16 KB/s, so "mid-upload" lasts seconds (76 KB in round 0)


def test_device_killed_mid_upload_then_restarted(broker, make_run, reference, capsys):
    ref = reference(DEVICES)
    run = make_run(broker, DEVICES)
    px = run.proxies[SLOW]
    px.set("up", rate=16 * 1024)
    run.start_all()
    run.wait_until(lambda: px.counters.up >= 2.5 * CHUNK, 120, f"{SLOW} to be uploading")
    sent = px.counters.up
    run.kill9(SLOW)                      # a real SIGKILL: no last words, paho's queue is gone
    pr = run.progress()
    assert pr is not None and pr.closed == 0, f"the kill came too late: {pr}"
    print(f"{SLOW} killed after {sent} bytes of its round-0 uploads reached the broker; ledger {pr}")
    run.start(SLOW)
    try:
        took = run.wait_done(200, stall=60, what=f"{SLOW} killed mid-upload and restarted")
    finally:
        emit(capsys, f"[device kill -9 mid-upload] t={run.elapsed():.0f} s; ledger {run.progress()}; "
                     + "; ".join(p.summary() for p in run.proxies.values()))
    print(f"finished {took:.0f} s after the restart")
    check_same_as_reference(ref, run.report())
    check_ledger(run.state_dir, ref)


def test_device_restarted_mid_training_uploads_what_it_would_have(broker, make_run, reference, capsys):
    """SIGTERM (systemctl restart) while a device trains round 1, then start it again: the round must
    come out as without the restart (the daemon's stop waits for the job; what the job already saved
    must not make the retrained round differ)."""
    ref = reference(DEVICES)
    run = make_run(broker, DEVICES)
    run.start_all()
    run.wait_round_closed(0)
    # Stage #2 on round 0's globals is recorded just before round 1's training starts (1-15 s of it)
    run.wait_until(lambda: run.edge_progress(SLOW).get("stage2", -1) >= 0, 60, f"{SLOW}'s Stage #2 of round 0")
    assert run.edge_progress(SLOW).get("pending") is None, f"{SLOW} finished training round 1 too early"
    rc = run.send(SLOW, signal.SIGTERM)
    assert rc == 0, f"{SLOW} exited {rc} on SIGTERM"
    run.start(SLOW)
    try:
        took = run.wait_done(200, stall=60, what=f"{SLOW} restarted mid-training")
    finally:
        emit(capsys, f"[device restarted mid-training] t={run.elapsed():.0f} s; ledger {run.progress()}")
    print(f"finished {took:.0f} s after the restart")
    check_same_as_reference(ref, run.report())
    check_ledger(run.state_dir, ref)


ROUND_SECONDS = 30     # the others report within 10-20 s here; the run waits two deadlines and one more round length
SILENT = "S07"


def test_silent_device_rounds_close_at_the_deadline_with_the_others(broker, make_run, reference, capsys):
    # the fault-free run of the two devices that keep working: the silent one must change nothing
    ref = reference(DEVICES)
    run = make_run(broker, (0, 1, 6), round_seconds=ROUND_SECONDS, quorum=2)
    run.start_all()
    px = run.proxies[SILENT]
    v0 = run.wait_until(lambda: len(g := global_frame_sizes(run.state_dir)) == 6 and g, 60, "the initial globals")
    # stopped once it holds the initial globals: it is about to train, and has sent no chunk yet
    run.wait_until(lambda: px.counters.down >= sum(v0.values()), 60, f"{SILENT} to hold the initial globals")
    run.send(SILENT, signal.SIGSTOP, wait=None)
    stopped_at = run.elapsed()
    assert px.counters.up < CHUNK, f"{SILENT} sent {px.counters.up} bytes before it was stopped: too late"
    try:
        took = run.wait_done(3 * ROUND_SECONDS + 90, stall=ROUND_SECONDS + 30, names=["coordinator", "S00", "S02"],
                             what=f"the run with {SILENT} stopped")
    finally:
        emit(capsys, f"[silent device] {SILENT} stopped at t={stopped_at:.0f} s; t={run.elapsed():.0f} s; ledger "
                     f"{run.progress()}; " + "; ".join(p.summary() for p in run.proxies.values()))
    print(f"the others finished after {took:.0f} s")
    run.kill9(SILENT)
    led = Ledger(run.state_dir, readonly=True)
    try:
        rows = led.rounds()
        keys = {(u["round"], u["device"]) for u in led.uploads()}
        reported = dict(led.db.execute("SELECT round, MAX(at) FROM reports GROUP BY round").fetchall())
    finally:
        led.close()
    emit(capsys, "[silent device] " + "; ".join(
        f"round {r.round}: the others' last report {reported.get(r.round, float('nan')) - r.opened_at:.1f} s after "
        f"it opened, closed after {(r.closed_at or 0) - r.opened_at:.1f} s (deadline {ROUND_SECONDS} s)" for r in rows))
    for r in rows:
        assert r.closed_at is not None and r.closed_at - r.opened_at >= ROUND_SECONDS - 1, \
            f"round {r.round} closed after {(r.closed_at or 0) - r.opened_at:.1f} s, not at its deadline"
        assert r.aggregated, f"round {r.round} closed without aggregating the others' uploads"
    assert not any(d == SILENT for _, d in keys), f"{SILENT} uploaded while stopped: {sorted(keys)}"
    check_same_as_reference(ref, run.report())
    check_ledger(run.state_dir, ref)
