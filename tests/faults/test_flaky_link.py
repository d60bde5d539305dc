"""The flaky link of the issue: one device behind 32 KB/s, 200 ms latency, its TCP connection cut
every 5-15 s (seeded). The fleet must finish the run, the device must not download the retained
globals again on every reconnect, and its stale chunk frames must not be re-sent after the round closed.

Bounds asserted (stated here, printed with the measured figures):

* download (bytes the proxy delivered broker -> device) <= 2 x lacked, where lacked = the bytes of every
  signed global frame the run produced (all versions in the coordinator's ledger: the device starts
  with none and needs each, to train or for Stage #2) + CONTROL_ALLOWANCE for the control traffic;
* round_closed refusals of the device's chunk frames in the coordinator's ledger <= MAX_STALE_REFUSALS.
"""

import pytest
from faults.harness import (
    check_ledger,
    check_same_as_reference,
    emit,
    expected_lacked,
    global_frame_sizes,
    lacked_bytes,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

FLAKY = "S07"
# Round and config announcements, acks, MQTT framing (CONNACK, SUBACK, PUBLISH headers): a device on a
# clean link downloads about 6 KB beyond the global frames in this whole 2-round run (measured: 843 069
# bytes for 837 232 of frames). 48 KiB is 8 times that, room for a round and a config message again on
# each of a dozen reconnects.
CONTROL_ALLOWANCE = 48 * 1024
MAX_STALE_REFUSALS = 10


def test_flaky_link_completes_without_redownloading_globals(broker, make_run, reference, capsys):
    ref = reference()
    run = make_run(broker, seed=7)
    px = run.proxies[FLAKY]
    px.set("both", rate=32 * 1024, latency_ms=200)
    run.start_all()
    px.cut_every(5, 15)
    # the bound is known as soon as the initial globals are in the ledger (same sizes in every version)
    v0 = run.wait_until(lambda: len(global_frame_sizes(run.state_dir)) == 6 and global_frame_sizes(run.state_dir),
                        60, "the initial globals")
    bound = 2 * (expected_lacked(ref, v0) + CONTROL_ALLOWANCE)

    def watch():
        c = px.counters
        if c.down > bound:
            return (f"{FLAKY} downloaded {c.down} bytes after {c.served} connections ({c.cuts} cuts), over the "
                    f"bound {bound} = 2 x (global frames {expected_lacked(ref, v0)} + control {CONTROL_ALLOWANCE}): "
                    "what it already had was sent to it again after reconnects")
        n = run.refusals(FLAKY, "round_closed")
        if n > MAX_STALE_REFUSALS:
            return (f"{n} round_closed refusals of {FLAKY}'s chunk frames (bound {MAX_STALE_REFUSALS}): stale "
                    "chunk frames re-sent after the round closed")
        return None

    try:
        took = run.wait_done(240, stall=100, watch=watch, what="the flaky-link run")
    finally:
        c = px.counters
        have, frames = lacked_bytes(run.state_dir) if (run.state_dir / "ledger.sqlite").exists() else (0, 0)
        whole = max(have, expected_lacked(ref, v0))
        emit(capsys, f"[flaky link] {FLAKY} (32 KB/s, 200 ms, cut every 5-15 s): download {c.down} B; lacked "
                     f"{whole + CONTROL_ALLOWANCE} B = global frames {whole} B (the whole run's; {have} B in "
                     f"{frames} frames in the ledger now) + control allowance {CONTROL_ALLOWANCE} B; ratio "
                     f"{c.down / (whole + CONTROL_ALLOWANCE):.2f} (bound 2.0); upload {c.up} B; connections "
                     f"{c.served}, cuts {c.cuts}; round_closed refusals of its chunks "
                     f"{run.refusals(FLAKY, 'round_closed')} (bound {MAX_STALE_REFUSALS}); clean devices downloaded "
                     f"{ {d: p.counters.down for d, p in run.proxies.items() if d != FLAKY} }; t={run.elapsed():.0f} s; "
                     f"ledger {run.progress()}")
    print(run.describe(), f"\nfinished in {took:.0f} s")
    lacked, _ = lacked_bytes(run.state_dir)
    assert c.down <= 2 * (lacked + CONTROL_ALLOWANCE), \
        f"{FLAKY} downloaded {c.down} bytes, over 2 x ({lacked} + {CONTROL_ALLOWANCE})"
    n = run.refusals(FLAKY, "round_closed")
    assert n <= MAX_STALE_REFUSALS, f"{n} round_closed refusals of {FLAKY}'s chunk frames"
    assert c.cuts >= 3, f"only {c.cuts} cuts: the link was not flaky enough to test anything"
    rep = run.report()
    check_same_as_reference(ref, rep)
    check_ledger(run.state_dir, ref)
