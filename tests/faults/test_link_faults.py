"""Bad links that are not the issue's exact one: latency + a bandwidth limit + "loss" (stalls of the
stream) + cuts; and a flapping link (down and up every few seconds: going down cuts the connection, and
while down new connections are reset). The run completes, nothing is lost or doubled, same globals."""

import pytest
from faults.harness import check_ledger, check_same_as_reference, emit

pytestmark = [pytest.mark.faults, pytest.mark.integration]

DEVICES = (0, 1)          # S00 and S02
BAD = "S02"


def _finish(run, ref, capsys, what, timeout=240, stall=100):
    try:
        took = run.wait_done(timeout, stall=stall, what=what)
    finally:
        emit(capsys, f"[{what}] t={run.elapsed():.0f} s; ledger {run.progress()}; "
                     + "; ".join(p.summary() for p in run.proxies.values()))
    print(f"{what}: finished in {took:.0f} s")
    check_same_as_reference(ref, run.report())
    check_ledger(run.state_dir, ref)


def test_lossy_slow_link_with_cuts(broker, make_run, reference, capsys):
    ref = reference(DEVICES)
    run = make_run(broker, DEVICES, seed=11)
    px = run.proxies[BAD]
    px.set("both", latency_ms=100, rate=64 * 1024, stall_p=0.05, stall_s=(0.2, 0.6))
    run.start_all()
    px.cut_every(8, 20)
    _finish(run, ref, capsys, "100 ms, 64 KB/s, 5% stalls of 0.2-0.6 s, cuts every 8-20 s")
    assert px.counters.cuts >= 2 and px.counters.stalls >= 10, "the link was not bad enough to test anything"


def test_flapping_link(broker, make_run, reference, capsys):
    ref = reference(DEVICES)
    run = make_run(broker, DEVICES, seed=12)
    px = run.proxies[BAD]
    # 64 KB/s: the device's ~800 KB of globals take ~13 s of link time, so the link flaps several times
    # during the run however fast the machine (on an idle machine the run otherwise ended before it flapped)
    px.set("both", rate=64 * 1024)
    run.start_all()
    px.flap(up=(2, 5), down=(1, 3))
    _finish(run, ref, capsys, "64 KB/s, a link up 2-5 s, down 1-3 s")
    assert px.counters.cuts >= 2, "the link did not flap enough to test anything"
