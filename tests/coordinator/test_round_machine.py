"""The sans-I/O round machine: acceptance, refusals, caps, duplicates, closing, replayed event orders."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmfs.coordinator.machine import (
    ChunkArrived,
    CoordinatorMachine,
    FleetChanged,
    PersistGlobal,
    PersistUpload,
    Publish,
    Refused,
    ReportArrived,
    RoundClosed,
    RoundPolicy,
    Start,
    Tick,
    modality_shapes,
)
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.payload import Codec, ModelHeader, decode_model, encode_model
from fedmfs.core.records import RoundRecord
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.wire import (
    Ack,
    AckReason,
    DeviceConfig,
    Report,
    RoundState,
    Signer,
    Verifier,
    decode_global,
    decode_message,
    encode_message,
    generate_keypair,
    split_payload,
)

INF = float("inf")
SPEC = DatasetSpec((ModalitySpec("eye", (2,), hidden=3), ModalitySpec("emg", (4,), hidden=2)), 3, 5)
PRIV, PUB = generate_keypair()


def state(mod, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in modality_shapes(SPEC[mod], 3).items()}


def payload(mod, seed, round_index=0, samples=10, codec=Codec.FP32):
    return encode_model(state(mod, seed), ModelHeader(round_index, mod, samples, codec))


def machine(devices=("a", "b", "c"), caps=None, rounds=2, quorum=1, chunk=200, gamma=None):
    caps = caps or {}
    gamma = len(SPEC.modalities) if gamma is None else gamma
    devs = tuple(DeviceConfig(d, SelectionPolicy(gamma=gamma, cap_bytes=caps.get(d))) for d in devices)
    # these uploads are arbitrary random states (updates ~1.4 x the global): exact means, no clipping
    # (tests/coordinator/test_poisoning.py tests the bounds)
    m = CoordinatorMachine("lab", SPEC, devs, RoundPolicy(rounds, 60.0, quorum, chunk, max_update_ratio=INF),
                           Signer(PRIV))
    m.seed_globals({n: state(n, 100 + i) for i, n in enumerate(SPEC.names)})
    m.handle(Start(now=1000.0))
    return m


def acks(actions):
    return [decode_message(a.payload, Ack) for a in actions if isinstance(a, Publish) and "/ack" in a.topic]


def upload(m, dev, mod, data, now=1001.0, order=None, round_index=None):
    frames = split_payload(data, m.policy.chunk_bytes)
    out = []
    for i in (order if order is not None else range(len(frames))):
        out += m.handle(ChunkArrived(dev, m.round if round_index is None else round_index, mod, frames[i], now))
    return out


def report(m, dev, now=1002.0, round_index=None):
    rep = Report(RoundRecord(dev, m.round if round_index is None else round_index, 10, {"eye": 1.0}, {"eye": 1},
                             {"eye": 1.0}, ("eye",)))
    return m.handle(ReportArrived(dev, encode_message(rep), now))


def test_modality_shapes_match_torch_model():
    pytest.importorskip("torch")
    from fedmfs.learner.models import ModalityModel, state_to_numpy
    ms = ModalitySpec("tactile", (4, 4), hidden=5)
    got = {k: v.shape for k, v in state_to_numpy(ModalityModel(ms, 7)).items()}
    assert got == modality_shapes(ms, 7)


def test_start_publishes_configs_globals_and_open_round():
    devs = (DeviceConfig("a", SelectionPolicy(gamma=1, cap_bytes=5000)),)
    m = CoordinatorMachine("lab", SPEC, devs, RoundPolicy(2), Signer(PRIV))
    acts = m.seed_globals({n: state(n, 1) for n in SPEC.names}) + m.handle(Start(now=10.0))
    topics = [a.topic for a in acts if isinstance(a, Publish)]
    assert topics.count("fedmfs/v1/lab/global/eye") == 2  # seeded, then republished on start
    assert "fedmfs/v1/lab/device/a/config" in topics
    ann = decode_message([a for a in acts if isinstance(a, Publish) and a.topic.endswith("/round")][-1].payload)
    assert (ann.round, ann.state, ann.deadline) == (0, RoundState.OPEN, 610.0)
    assert set(ann.globals) == {"eye", "emg"}
    frame = [a for a in acts if isinstance(a, PersistGlobal) and a.modality == "eye"][0].frame
    h, p = decode_global(frame, Verifier(PUB))
    np.testing.assert_array_equal(decode_model(p)[1]["head.bias"], state("eye", 1)["head.bias"])


def test_accept_out_of_order_and_missing_chunks():
    m = machine()
    data = payload("eye", 1)
    n = len(split_payload(data, 200))
    assert n >= 4
    out = upload(m, "a", "eye", data, order=[n - 1, 0])
    (a,) = acks(out)
    assert a.reason is AckReason.MISSING_CHUNKS and a.missing == tuple(range(n - 1))
    (a,) = acks(upload(m, "a", "eye", data, order=[n - 1]))    # the device's probe
    assert a.reason is AckReason.MISSING_CHUNKS and a.missing == tuple(range(1, n - 1))
    out = upload(m, "a", "eye", data, order=list(range(1, n - 1)))
    (a,) = acks(out)
    assert a.reason is AckReason.ACCEPTED
    persist = [x for x in out if isinstance(x, PersistUpload)]
    assert persist[0].payload == data and persist[0].samples == 10
    assert out.index(persist[0]) < out.index([x for x in out if isinstance(x, Publish)][0])  # persist before ack
    assert m.used["a"] == len(data)


def test_duplicate_identical_is_acked_not_counted_and_different_is_refused():
    m = machine()
    d1, d2 = payload("eye", 1), payload("eye", 2)
    upload(m, "a", "eye", d1)
    again = upload(m, "a", "eye", d1)
    assert [a.reason for a in acks(again)] == [AckReason.ACCEPTED]
    assert not [x for x in again if isinstance(x, PersistUpload)]
    assert m.aggs["eye"].count == 1 and m.used["a"] == len(d1)
    other = upload(m, "a", "eye", d2)
    assert AckReason.DUPLICATE in [a.reason for a in acks(other)]
    assert m.aggs["eye"].count == 1


def test_cap_enforced_early_and_per_round():
    d_eye, d_emg = payload("eye", 1), payload("emg", 1)
    m = machine(caps={"a": len(d_eye) + len(d_emg) - 1})
    assert acks(upload(m, "a", "eye", d_eye))[-1].reason is AckReason.ACCEPTED
    out = upload(m, "a", "emg", d_emg)
    assert [a.reason for a in acks(out)] == [AckReason.OVER_CAP, AckReason.OVER_CAP]  # first + last chunk only
    assert [r.reason for r in out if isinstance(r, Refused)] == [AckReason.OVER_CAP]
    assert m.used["a"] == len(d_eye) and "emg" not in m.aggs


@pytest.mark.parametrize("case", ["unknown_device", "unknown_modality", "wrong_shape", "bad_payload_round",
                                  "bad_chunk", "round_closed", "garbage_payload"])
def test_refusals_with_reasons(case):
    m = machine()
    dev, mod, data, rnd = "a", "eye", payload("eye", 1), None
    if case == "unknown_device":
        dev = "zz"
    elif case == "unknown_modality":
        mod = "tactile"
        data = encode_model(state("eye", 1), ModelHeader(0, "tactile", 1))
    elif case == "wrong_shape":
        data = encode_model({**state("eye", 1), "head.bias": np.zeros(4, np.float32)}, ModelHeader(0, "eye", 3))
    elif case == "bad_payload_round":
        data = payload("eye", 1, round_index=5)
    elif case == "round_closed":
        rnd = 1
    elif case == "garbage_payload":
        data = b"\x00" * 500
    if case == "bad_chunk":
        out = m.handle(ChunkArrived("a", 0, "eye", b"FMC\x01junk", 1.0))
        want = AckReason.BAD_CHUNK
    else:
        out = upload(m, dev, mod, data, round_index=rnd)
        want = {"unknown_device": AckReason.UNKNOWN_DEVICE, "unknown_modality": AckReason.UNKNOWN_MODALITY,
                "wrong_shape": AckReason.WRONG_SHAPE, "bad_payload_round": AckReason.BAD_PAYLOAD,
                "round_closed": AckReason.ROUND_CLOSED, "garbage_payload": AckReason.BAD_PAYLOAD}[case]
    assert want in [a.reason for a in acks(out)]
    assert not [x for x in out if isinstance(x, PersistUpload)]
    assert not m.aggs


def test_bad_report_answered():
    m = machine()
    out = m.handle(ReportArrived("a", b"{not json", 1.0))
    assert acks(out)[0].reason is AckReason.BAD_MESSAGE
    rep = Report(RoundRecord("b", 0, 1))
    out = m.handle(ReportArrived("a", encode_message(rep), 1.0))
    assert acks(out)[0].reason is AckReason.BAD_MESSAGE and not m.reported


def _aggregate_oracle(entries):
    out = {}
    for mod in SPEC.names:
        ws = [(s, w) for (mm, s, w) in entries if mm == mod]
        if ws:
            tot = sum(w for _, w in ws)
            out[mod] = {k: (sum(w * s[k].astype(np.float64) for s, w in ws) / tot).astype(np.float32)
                        for k in ws[0][0]}
    return out


def test_round_closes_when_all_reported_with_weighted_mean_and_next_round_opens():
    m = machine()
    entries = []
    for i, (dev, mod, n) in enumerate([("a", "eye", 10), ("b", "eye", 30), ("c", "emg", 7)]):
        upload(m, dev, mod, payload(mod, i, samples=n))
        entries.append((mod, state(mod, i), n))
    report(m, "a"); report(m, "b")
    assert m.state is RoundState.OPEN
    out = report(m, "c", now=1030.0)
    closed = [x for x in out if isinstance(x, RoundClosed)][0]
    assert closed.aggregated == {"eye": 2, "emg": 1} and closed.quorum_met and closed.duration == 30.0
    oracle = _aggregate_oracle(entries)
    for mod in SPEC.names:
        for k, v in oracle[mod].items():
            np.testing.assert_allclose(m.globals[mod].state[k], v, rtol=1e-6)
        assert m.globals[mod].version == 1
    ann = [decode_message(a.payload) for a in out if isinstance(a, Publish) and a.topic.endswith("/round")][-1]
    assert (ann.round, ann.state) == (1, RoundState.OPEN)
    assert ann.globals == {mod: m.globals[mod].sha256 for mod in SPEC.names}
    # a late chunk and a late report for round 0
    assert acks(upload(m, "a", "emg", payload("emg", 5), round_index=0))[0].reason is AckReason.ROUND_CLOSED
    assert acks(report(m, "a", round_index=0))[0].reason is AckReason.ROUND_CLOSED


def test_deadline_with_and_without_quorum():
    m = machine(quorum=2, rounds=3)
    report(m, "a")            # below quorum, nothing accepted: closes without aggregating
    assert m.handle(Tick(now=1059.0)) == []
    out = m.handle(Tick(now=1061.0))
    closed = [x for x in out if isinstance(x, RoundClosed)][0]
    assert not closed.quorum_met and closed.aggregated == {} and m.globals["eye"].version == 0
    assert m.round == 1 and m.state is RoundState.OPEN and m.deadline == 1121.0
    upload(m, "a", "eye", payload("eye", 1, round_index=1)); report(m, "a", now=1070.0); report(m, "b", now=1071.0)
    out = m.handle(Tick(now=1200.0))
    assert [x for x in out if isinstance(x, RoundClosed)][0].aggregated == {"eye": 1}
    assert m.globals["eye"].version == 1 and m.round == 2


def test_accepted_uploads_are_never_dropped_below_quorum(caplog):
    # issue 10: at a deadline below quorum, uploads already acknowledged `accepted` were dropped (the
    # round closed without aggregating). Now the round is extended once, then aggregates what it has.
    m = machine(quorum=2, rounds=3)
    upload(m, "a", "eye", payload("eye", 1))
    report(m, "a")
    with caplog.at_level("WARNING"):
        out = m.handle(Tick(now=1061.0))
    assert not [x for x in out if isinstance(x, RoundClosed)]
    assert m.round == 0 and m.state is RoundState.OPEN and m.deadline == 1121.0
    ann = [decode_message(a.payload) for a in out if isinstance(a, Publish) and a.topic.endswith("/round")]
    assert ann and ann[-1].deadline == 1121.0          # re-announced with the new deadline
    assert "missing: b, c" in caplog.text and "extended" in caplog.text
    assert m.handle(Tick(now=1120.0)) == []
    out = m.handle(Tick(now=1122.0))
    closed = [x for x in out if isinstance(x, RoundClosed)][0]
    assert not closed.quorum_met and closed.aggregated == {"eye": 1} and m.globals["eye"].version == 1


def test_gamma_is_enforced_per_device_per_round_whatever_the_device_state():
    # issue 10: a device whose state file was lost redid the round, chose another modality, and both
    # uploads were accepted (gamma 1). The coordinator now counts what it accepted per device.
    m = machine(gamma=1, rounds=2)
    eye = payload("eye", 1)
    assert acks(upload(m, "a", "eye", eye))[-1].reason is AckReason.ACCEPTED
    first, last = acks(upload(m, "a", "emg", payload("emg", 2)))
    assert first.reason is last.reason is AckReason.OVER_GAMMA and "gamma 1: eye already accepted" in first.detail
    assert acks(upload(m, "a", "eye", eye))[-1].reason is AckReason.ACCEPTED   # a re-send
    assert acks(upload(m, "b", "emg", payload("emg", 2)))[-1].reason is AckReason.ACCEPTED   # others unaffected
    report(m, "a"); report(m, "b"); report(m, "c")
    assert m.round == 1       # next round: a fresh allowance
    assert acks(upload(m, "a", "emg", payload("emg", 2, round_index=1)))[-1].reason is AckReason.ACCEPTED


def test_last_round_announces_done():
    m = machine(devices=("a",), rounds=1)
    out = report(m, "a")
    ann = [decode_message(a.payload) for a in out if isinstance(a, Publish) and a.topic.endswith("/round")][-1]
    assert ann.state is RoundState.DONE and m.state is RoundState.DONE
    assert acks(upload(m, "a", "eye", payload("eye", 1)))[0].reason is AckReason.ROUND_CLOSED


def test_fleet_change_applies_caps_next_round():
    m = machine(devices=("a",), rounds=2)
    d = payload("eye", 1)
    m.handle(FleetChanged((DeviceConfig("a", SelectionPolicy(gamma=1, cap_bytes=10)),), 1.0))
    assert acks(upload(m, "a", "eye", d))[-1].reason is AckReason.ACCEPTED   # the open round keeps its cap
    report(m, "a")
    assert m.round == 1 and m.caps == {"a": 10}
    assert acks(upload(m, "a", "eye", payload("eye", 1, round_index=1)))[0].reason is AckReason.OVER_CAP


def test_a_device_added_mid_round_takes_part_from_the_next_round_never_uncapped():
    # found writing docs/deploy.md: a device added by a fleet-file reload mid-round had no cap in the
    # round's snapshot (caps.get -> None), so its uploads in that round had no byte limit
    m = machine(devices=("a",), rounds=2)
    late = DeviceConfig("z", SelectionPolicy(gamma=1, cap_bytes=10))
    m.handle(FleetChanged((DeviceConfig("a", SelectionPolicy(gamma=1)), late), 1.0))
    ack = acks(upload(m, "z", "eye", payload("eye", 1)))[0]
    assert ack.reason is AckReason.ROUND_CLOSED and "takes part from round 1" in ack.detail
    assert "z" not in m.used and m.aggs.get("eye") is None
    report(m, "a")
    assert m.round == 1 and m.caps["z"] == 10 and "z" in m.expected
    assert acks(upload(m, "z", "eye", payload("eye", 1, round_index=1)))[0].reason is AckReason.OVER_CAP


def _events_for_round(m):
    evs = []
    for i, (dev, mod) in enumerate([("a", "eye"), ("b", "eye"), ("b", "emg"), ("c", "emg")]):
        for f in split_payload(payload(mod, i, samples=5 + i), 200):
            evs.append(ChunkArrived(dev, 0, mod, f, 1001.0))
    return evs


def test_replayed_orders_with_duplicates_give_the_same_globals():
    ref = None
    for seed in range(25):
        m = machine(rounds=1)
        evs = _events_for_round(m)
        rnd = random.Random(seed)
        evs = evs + rnd.sample(evs, k=len(evs) // 2)     # at-least-once delivery
        rnd.shuffle(evs)
        for e in evs:
            m.handle(e)
        # a device whose last chunk came before others probes again
        for dev, mod, i in [("a", "eye", 0), ("b", "eye", 1), ("b", "emg", 2), ("c", "emg", 3)]:
            upload(m, dev, mod, payload(mod, i, samples=5 + i), order=[len(split_payload(payload(mod, i), 200)) - 1])
        for dev in "abc":
            report(m, dev)
        assert m.state is RoundState.DONE
        assert {k: g.version for k, g in m.globals.items()} == {"eye": 1, "emg": 1}
        assert m.aggs["eye"].count == 2 and m.aggs["emg"].count == 2
        states = {k: g.state for k, g in m.globals.items()}
        ref = ref or states
        # arrival order changes only the float64 summation order: equal to float32 precision
        for k in SPEC.names:
            for t in states[k]:
                np.testing.assert_allclose(states[k][t], ref[k][t], rtol=1e-6, atol=1e-7)
        assert m.used == {"a": len(payload("eye", 0, samples=5)),
                          "b": len(payload("eye", 1, samples=6)) + len(payload("emg", 2, samples=7)),
                          "c": len(payload("emg", 3, samples=8))}


def test_restore_resumes_without_double_counting():
    m = machine(rounds=2)
    d = payload("eye", 1)
    upload(m, "a", "eye", d)
    report(m, "a")
    # a "restarted" machine from what was persisted
    m2 = CoordinatorMachine("lab", SPEC, tuple(m.devices.values()), m.policy, Signer(PRIV))
    for mod, g in m.globals.items():
        m2.restore_global(mod, g.version, g.round, g.frame)
    m2.restore_round(m.round, m.state, m.deadline, m.opened_at, m.expected, m.caps)
    m2.restore_upload("a", "eye", d)
    m2.restore_report(m.reported["a"])
    out = m2.handle(Start(now=1005.0))
    ann = [decode_message(a.payload) for a in out if isinstance(a, Publish) and a.topic.endswith("/round")][-1]
    assert ann.round == 0 and ann.state is RoundState.OPEN and ann.deadline == m.deadline
    assert [a.reason for a in acks(upload(m2, "a", "eye", d))] == [AckReason.ACCEPTED]
    assert m2.aggs["eye"].count == 1 and m2.used["a"] == len(d)
    assert acks(report(m2, "a"))[0].reason is AckReason.REPORT_ACCEPTED
    report(m2, "b"); report(m2, "c")
    assert m2.round == 1 and m2.globals["eye"].version == 1
    np.testing.assert_array_equal(m2.globals["eye"].state["head.weight"], state("eye", 1)["head.weight"])




@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "zz"]), st.integers(0, 2), st.sampled_from(["eye", "emg", "xx"]),
                          st.binary(max_size=300), st.booleans()), max_size=12))
def test_fuzz_machine_never_raises_on_peer_bytes(msgs):
    m = machine(rounds=2)
    good = split_payload(payload("eye", 1), 200)
    for dev, rnd, mod, data, use_good in msgs:
        # half the time a real frame with a flipped byte, else random bytes
        frame = bytearray(good[rnd % len(good)]) if use_good else bytearray(data)
        if use_good and data:
            frame[len(data) % len(frame)] ^= 0xFF
        m.handle(ChunkArrived(dev, rnd, mod, bytes(frame), 1001.0))
        m.handle(ReportArrived(dev, bytes(data), 1001.0))
    assert m.used.get("a", 0) <= len(payload("eye", 1)) * 2


def _filled(mod, value, samples, round_index=0):
    st = {k: np.full(v.shape, value, np.float32) for k, v in state(mod, 0).items()}
    return encode_model(st, ModelHeader(round_index, mod, samples, Codec.FP32))


@pytest.mark.parametrize("rule, expect", [("weighted_mean", 2.5), ("median", 2.0), ("trimmed_mean", 2.0)])
def test_the_fleets_aggregation_rule_is_used_and_unsent_modalities_keep_their_global(rule, expect):
    """The rule of RoundPolicy (the coordinator.toml [rounds] aggregation) makes the global: a weighted
    mean of 1 (10 samples) and 3 (30 samples) is 2.5, their median 2.0; emg, which nobody sent, keeps
    its version-0 global."""
    devs = tuple(DeviceConfig(d, SelectionPolicy()) for d in ("a", "b"))
    m = CoordinatorMachine("lab", SPEC, devs, RoundPolicy(2, 60.0, 1, 200, rule, max_update_ratio=INF), Signer(PRIV))
    m.seed_globals({n: state(n, 100 + i) for i, n in enumerate(SPEC.names)})
    m.handle(Start(now=1000.0))
    emg_before = m.globals["emg"].sha256
    assert acks(upload(m, "a", "eye", _filled("eye", 1.0, 10)))[-1].reason is AckReason.ACCEPTED
    assert acks(upload(m, "b", "eye", _filled("eye", 3.0, 30)))[-1].reason is AckReason.ACCEPTED
    report(m, "a")
    out = report(m, "b")
    assert [a for a in out if isinstance(a, RoundClosed)][0].aggregated == {"eye": 2}
    for v in m.globals["eye"].state.values():
        np.testing.assert_allclose(v, expect)
    assert (m.globals["eye"].version, m.globals["emg"].version) == (1, 0)
    assert m.globals["emg"].sha256 == emg_before
    # round 1 lists emg's initial global too: a device joining now starts emg from the fleet's model
    assert m.training_globals() == {"eye": m.globals["eye"].sha256, "emg": emg_before}
    assert m.announcement().globals == m.training_globals()


def test_an_unknown_aggregation_rule_is_refused_by_name():
    with pytest.raises(ValueError, match="median"):
        RoundPolicy(2, aggregation="mode")


def test_round_config_and_globals_are_signed_with_the_fleet_epoch():
    """Issue 9, point 3: what the coordinator publishes for the devices to trust carries its signature
    and the fleet epoch; a device verifies it with the key it holds for globals."""
    from fedmfs.core.wire import verify_message
    devs = (DeviceConfig("a", SelectionPolicy(gamma=1)),)
    m = CoordinatorMachine("lab", SPEC, devs, RoundPolicy(2), Signer(PRIV), epoch=1700000000123)
    acts = m.seed_globals({n: state(n, 1) for n in SPEC.names}) + m.handle(Start(now=10.0))
    pubs = {a.topic: a.payload for a in acts if isinstance(a, Publish)}
    head, ann = verify_message(pubs["fedmfs/v1/lab/round"], Verifier(PUB), "lab", type(m.announcement()))
    assert (head.epoch, head.round, ann.round) == (1700000000123, 0, 0)
    head, cfg = verify_message(pubs["fedmfs/v1/lab/device/a/config"], Verifier(PUB), "lab", DeviceConfig)
    assert (head.epoch, head.round, cfg) == (1700000000123, 0, devs[0])
    h, _ = decode_global(pubs["fedmfs/v1/lab/global/eye"], Verifier(PUB))
    assert (h.epoch, h.round) == (1700000000123, 0)
    # a config published after a fleet change carries the round it was published in
    m.round = 1
    [c] = m.handle(FleetChanged(devs, 20.0))
    assert verify_message(c.payload, Verifier(PUB), "lab", DeviceConfig)[0].round == 1


def test_a_restored_global_is_signed_again_with_this_epoch():
    m = machine()
    frame = m.globals["eye"].frame
    m2 = CoordinatorMachine("lab", SPEC, tuple(m.devices.values()), m.policy, Signer(PRIV), epoch=42)
    m2.restore_global("eye", 0, 0, frame)
    h, _ = decode_global(m2.globals["eye"].frame, Verifier(PUB))
    assert h.epoch == 42 and m2.globals["eye"].sha256 == m.globals["eye"].sha256
    m3 = CoordinatorMachine("lab", SPEC, tuple(m.devices.values()), m.policy, Signer(PRIV), epoch=0)
    m3.restore_global("eye", 0, 0, frame)
    assert m3.globals["eye"].frame == frame          # already current: byte for byte the same
