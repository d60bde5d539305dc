"""The edge round machine without a broker: event orders replayed, actions asserted."""

import hashlib
import itertools
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.payload import ModelHeader, encode_model
from fedmfs.core.records import RoundRecord
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.wire import (
    Ack,
    AckReason,
    DeviceConfig,
    Evaluation,
    Report,
    RoundAnnouncement,
    RoundState,
    Signer,
    Topics,
    Verifier,
    decode_chunk,
    decode_message,
    encode_global,
    encode_message,
    generate_keypair,
    sign_message,
)
from fedmfs.edge.machine import (
    AckArrived,
    Announced,
    ConfigArrived,
    Connected,
    DropPending,
    EdgeMachine,
    Fatal,
    Finished,
    GlobalArrived,
    GlobalFrame,
    JobFailed,
    JobKind,
    Publish,
    RebuildPayloads,
    Rebuilt,
    RunStage2,
    SaveGlobal,
    SaveHistory,
    SaveProgress,
    Stage2Done,
    StartTraining,
    Tick,
    Trained,
    check_progress,
    decode_inbound,
    verify_global,
)
from fedmfs.edge.uploads import publish_packet_bytes

DEV, FLEET, CHUNK = "d1", "f", 4
T = Topics(FLEET)
PAYLOADS = {"a": b"A" * 10, "b": b"B" * 7}          # 3 and 2 chunks of 4 bytes
SHA = {m: hashlib.sha256(p).hexdigest() for m, p in PAYLOADS.items()}
G = {"a": "1" * 64, "b": "2" * 64}                  # sha256 of the globals a round starts from
SEEN0 = {"epoch": 0, "announced": 0, "announced_state": "open"}   # what the device saw of the fleet
PRIV, PUB = generate_keypair()
RECORD = RoundRecord(DEV, 0, 40, {"a": 0.5, "b": 0.25}, {"a": 10, "b": 7}, {"a": 1.0, "b": 0.5}, ("a", "b"), 0.5)


def ann(r, state=RoundState.OPEN, globals_=None):
    return Announced(RoundAnnouncement(FLEET, r, state, 1e9, 3, (DEV,), dict(G if globals_ is None else globals_),
                                       CHUNK))


def ack(r, reason, modality=None, missing=(), sha=None):
    return Ack(DEV, r, reason, modality, SHA.get(modality, "") if modality and sha is None else (sha or ""), tuple(missing))


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def chunks(actions):
    """(modality, chunk index) of every upload frame published."""
    out = []
    for a in of(actions, Publish):
        if a.chunk:
            h, _ = decode_chunk(a.payload)
            out.append((a.topic.rsplit("/", 1)[1], h.index))
    return out


def ready(m: EdgeMachine, r=0, globals_=None):
    """Config, globals and an open round r: the machine asks to train (round 0) or for Stage #2."""
    m.handle(ConfigArrived(DeviceConfig(DEV, SelectionPolicy(gamma=2))))
    for mod, sha in G.items():
        m.handle(GlobalArrived(mod, sha, f"state-{mod}", b"frame", stored=True))
    m.handle(ann(r, globals_=globals_))


def trained(m: EdgeMachine, r=0, now=0.0):
    """Run round r's training job to completion and start the uploads."""
    acts = m.handle(Tick(now))
    [job] = of(acts, StartTraining)
    assert job.round == r and dict(job.starts) == {"a": "state-a", "b": "state-b"}
    out = m.handle(Trained(r, ("a", "b"), PAYLOADS, replace(RECORD, round=r), now))
    assert of(out, SaveProgress)[-1].progress["pending"]["chosen"] == ["a", "b"]
    return out + m.handle(Tick(now))


class QuietMachine(EdgeMachine):
    """The machine with its ``fetch`` requests left out of the actions: the tests of the round logic
    assert exact action lists; the fetches have their own tests (test_fetch_*)."""

    def handle(self, ev):
        return [a for a in super().handle(ev) if not (isinstance(a, Publish) and a.topic.endswith("/fetch"))]


def machine(**kw):
    return QuietMachine(DEV, FLEET, ack_timeout=10.0, max_attempts=3, **kw)


def test_a_full_round_then_stage2_then_the_next_round():
    m = machine()
    assert m.handle(Tick(0.0)) == []                       # nothing announced yet
    ready(m)
    first = trained(m)
    assert chunks(first) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert of(first, SaveProgress)[-1].progress["pending"]["started"] == {"a": True, "b": True}
    assert chunks(m.handle(Tick(1.0))) == []               # within ack_timeout: quiet
    m.handle(AckArrived(ack(0, AckReason.ACCEPTED, "a"), 1.0))
    m.handle(AckArrived(ack(0, AckReason.ACCEPTED, "b"), 1.0))
    [rep] = [a for a in m.handle(Tick(1.5)) if isinstance(a, Publish)]
    assert rep.topic == T.report(DEV)
    report = decode_message(rep.payload, Report)
    assert report.accepted == ("a", "b") and report.bytes_sent == 17 and report.record == RECORD
    done = m.handle(AckArrived(ack(0, AckReason.REPORT_ACCEPTED), 2.0))
    assert of(done, DropPending) and of(done, SaveProgress)[-1].progress == {"reported": 0, "stage2": -1,
                                                                             "evaluated": -1, "pending": None,
                                                                             **SEEN0}
    h = of(done, SaveHistory)[-1].history["0"]
    assert h["acks"] == {"a": "accepted", "b": "accepted"}
    frames = [a for a in first if isinstance(a, Publish) and a.chunk]
    assert h["wire_bytes"] == sum(publish_packet_bytes(f.topic, len(f.payload), 1, True) for f in frames)
    assert m.handle(Tick(3.0)) == []                       # round 0 reported, round 1 not open
    # round 1 opens from new globals: Stage #2 on round 0's globals first, training only after it
    new = {"a": "3" * 64, "b": "4" * 64}
    m.handle(ann(1, globals_=new))
    assert m.handle(Tick(4.0)) == []                       # the new globals are not here yet
    for mod, sha in new.items():
        assert of(m.handle(GlobalArrived(mod, sha, f"g1-{mod}", b"fr-" + mod.encode())), SaveGlobal)
    [s2] = of(m.handle(Tick(5.0)), RunStage2)
    assert s2.round == 0 and dict(s2.deploy) == {"a": "g1-a", "b": "g1-b"}
    assert m.handle(Tick(6.0)) == [] and m.busy           # one job at a time
    m.handle(Stage2Done(0, 0.75, 80))
    acts = m.handle(Tick(7.0))
    [tr] = of(acts, StartTraining)
    [ev] = [decode_message(a.payload, Evaluation) for a in of(acts, Publish)]
    assert tr.round == 1 and ev == Evaluation(DEV, 0, 0.75, 80)     # the accuracy goes to the coordinator
    assert of(m.handle(AckArrived(ack(0, AckReason.EVALUATION_ACCEPTED), 7.5)), SaveProgress)[-1].progress[
        "evaluated"] == 0


def test_duplicate_and_out_of_order_acks_change_nothing():
    m = machine()
    ready(m)
    trained(m)
    assert m.handle(AckArrived(ack(5, AckReason.ACCEPTED, "a"), 1.0)) == []        # another round
    assert m.handle(AckArrived(ack(0, AckReason.ACCEPTED, "a", sha="9" * 64), 1.0)) == []   # other payload
    assert m.handle(AckArrived(ack(0, AckReason.ACCEPTED, "c"), 1.0)) == []        # not uploading c
    first = m.handle(AckArrived(ack(0, AckReason.ACCEPTED, "a"), 1.0))
    assert of(first, SaveProgress)[-1].progress["pending"]["status"] == {"a": "accepted"}
    assert m.handle(AckArrived(ack(0, AckReason.ACCEPTED, "a"), 1.1)) == []        # duplicate
    assert m.handle(AckArrived(ack(0, AckReason.MISSING_CHUNKS, "a", [0]), 1.2)) == []   # late, a is done
    # missing chunks: exactly those are resent
    assert chunks(m.handle(AckArrived(ack(0, AckReason.MISSING_CHUNKS, "b", [1]), 1.3))) == [("b", 1)]
    refused = m.handle(AckArrived(ack(0, AckReason.OVER_CAP, "b"), 1.4))
    assert of(refused, SaveProgress)[-1].progress["pending"]["status"] == {"a": "accepted", "b": "over_cap"}
    rep = decode_message(of(m.handle(Tick(1.5)), Publish)[0].payload, Report)
    assert rep.accepted == ("a",) and rep.bytes_sent == 10
    assert of(m.handle(AckArrived(ack(0, AckReason.REPORT_ACCEPTED), 1.6)), DropPending)
    assert m.handle(AckArrived(ack(0, AckReason.REPORT_ACCEPTED), 1.7)) == []      # twice: once finished
    assert m.progress["reported"] == 0


def test_every_order_of_acks_finishes_the_round_exactly_once():
    evs = [ack(0, AckReason.ACCEPTED, "a"), ack(0, AckReason.ACCEPTED, "b"), ack(0, AckReason.ACCEPTED, "a"),
           ack(0, AckReason.MISSING_CHUNKS, "b", [0, 1]), ack(0, AckReason.REPORT_ACCEPTED)]
    for order in itertools.permutations(evs):
        m = machine()
        ready(m)
        trained(m)
        acts, now = [], 1.0
        for e in order:
            acts += m.handle(AckArrived(e, now))
            acts += m.handle(Tick(now + 0.05))
            now += 0.1
        acts += m.handle(Tick(now + 100))
        assert len(of(acts, DropPending)) == 1, order
        assert m.progress == {"reported": 0, "stage2": -1, "evaluated": -1, "pending": None, **SEEN0}
        assert not of(acts, StartTraining) and not m.uploads
        # a report went out only once both uploads had final answers, and it names the accepted ones
        for p in of(acts, Publish):
            if p.topic == T.report(DEV):
                assert decode_message(p.payload, Report).accepted == ("a", "b")


def test_unanswered_uploads_are_probed_then_given_up_and_the_report_retried():
    m = machine()
    ready(m)
    trained(m)
    assert chunks(m.handle(Tick(10.0))) == [("a", 2), ("b", 1)]    # probes: the last chunk
    assert chunks(m.handle(Tick(20.0))) == [("a", 2), ("b", 1)]
    assert chunks(m.handle(Tick(30.0))) == [("a", 2), ("b", 1)]
    acts = m.handle(Tick(40.0))                                      # max_attempts = 3: failed
    assert chunks(acts) == [] and m.progress["pending"]["status"] == {"a": "failed", "b": "failed"}
    reports = [a for a in acts if isinstance(a, Publish) and a.topic == T.report(DEV)]
    assert len(reports) == 1 and decode_message(reports[0].payload, Report).accepted == ()
    assert m.handle(Tick(45.0)) == []                                # report: wait ack_timeout
    assert len(of(m.handle(Tick(50.0)), Publish)) == 1
    assert len(of(m.handle(Tick(60.0)), Publish)) == 1
    assert of(m.handle(Tick(70.0)), DropPending)                    # 3 reports unanswered: finished
    assert m.progress["reported"] == 0


def test_acks_refusals_probes_and_resumes_are_in_the_log_at_info(caplog):
    # issue 10: at INFO the edge log never recorded acks, refusals, probes or resumes
    caplog.set_level("INFO", logger="fedmfs.edge")
    a = machine()
    ready(a)
    acts = trained(a)
    a.handle(AckArrived(ack(0, AckReason.MISSING_CHUNKS, "a", [1]), 1.0))
    a.handle(AckArrived(ack(0, AckReason.ACCEPTED, "a"), 2.0))
    a.handle(AckArrived(ack(0, AckReason.OVER_CAP, "b"), 2.0))
    a.handle(Tick(2.5))
    a.handle(AckArrived(ack(0, AckReason.REPORT_ACCEPTED), 3.0))
    text = caplog.text
    assert "a: the coordinator lacks 1 of 3 chunks; resending them" in text
    assert "round 0: a accepted by the coordinator" in text
    assert "round 0: b refused: over_cap" in text
    assert "round 0: report recorded by the coordinator" in text
    b = machine(progress=of(acts, SaveProgress)[-1].progress, payloads=dict(PAYLOADS))
    ready(b)
    b.handle(Tick(100.0))
    b.handle(Tick(111.0))
    assert "resuming the upload of a (3 chunks)" in caplog.text
    assert "a: no answer for 10 s; probing (attempt 1 of 3)" in caplog.text
    assert all(r.levelno >= 20 for r in caplog.records if "round 0" in r.getMessage())


def test_reconnect_mid_upload_republishes_the_status_and_the_upload_carries_on():
    m = machine()
    ready(m)
    trained(m)
    m.handle(AckArrived(ack(0, AckReason.ACCEPTED, "a"), 1.0))
    [st] = m.handle(Connected(2.0, mqtt5=False))
    assert st.topic == T.status(DEV) and st.retain and b'"online"' in st.payload
    # the link lost b's frames: the probe after ack_timeout brings the coordinator's missing list
    assert chunks(m.handle(Tick(11.0))) == [("b", 1)]
    assert chunks(m.handle(AckArrived(ack(0, AckReason.MISSING_CHUNKS, "b", [0]), 11.5))) == [("b", 0)]
    assert m.wire_bytes > 0
    h0 = m.wire_bytes
    m.handle(AckArrived(ack(0, AckReason.ACCEPTED, "b"), 12.0))
    assert m.wire_bytes == h0                                        # MQTT 3.1.1 frames counted already
    m.handle(Tick(12.5))
    done = m.handle(AckArrived(ack(0, AckReason.REPORT_ACCEPTED), 13.0))
    assert of(done, SaveHistory)[-1].history["0"]["acks"] == {"a": "accepted", "b": "accepted"}


def test_round_closing_while_training_finishes_it_without_uploading():
    m = machine()
    ready(m)
    assert of(m.handle(Tick(0.0)), StartTraining)
    m.handle(ann(0, RoundState.CLOSED))
    m.handle(ConfigArrived(DeviceConfig(DEV, SelectionPolicy(gamma=1, cap_bytes=5))))   # a new cap, for the next round
    assert m.handle(Tick(1.0)) == [] and m.busy
    m.handle(Trained(0, ("a", "b"), PAYLOADS, RECORD, 2.0))
    acts = m.handle(Tick(2.0))
    assert chunks(acts) == [] and of(acts, DropPending) and m.progress["reported"] == 0
    m.handle(ann(1))
    [s2] = of(m.handle(Tick(3.0)), RunStage2)
    m.handle(Stage2Done(0, 0.5))
    [tr] = of(m.handle(Tick(4.0)), StartTraining)
    assert tr.round == 1 and tr.config.policy.cap_bytes == 5


def test_a_new_round_while_uploading_abandons_the_old_one():
    m = machine()
    ready(m)
    trained(m)
    m.handle(ann(1))
    acts = m.handle(Tick(1.0))
    assert of(acts, DropPending) and of(acts, RunStage2)[0].round == 0 and chunks(acts) == []
    assert of(acts, SaveHistory)[0].history["0"]["acks"] == {}


def test_restart_mid_upload_probes_and_resends_only_what_is_missing():
    a = machine()
    ready(a)
    acts = trained(a)
    acts += a.handle(AckArrived(ack(0, AckReason.ACCEPTED, "a"), 1.0))
    saved = of(acts, SaveProgress)[-1].progress
    history = of(acts, SaveHistory)[-1].history
    # the process dies; a new one reads state.json, history.json and pending/b.bin
    b = machine(progress=saved, history=history, payloads={"b": PAYLOADS["b"]})
    ready(b)
    acts = b.handle(Tick(100.0))
    assert not of(acts, StartTraining) and chunks(acts) == [("b", 1)]       # probe, not a full resend
    assert chunks(b.handle(AckArrived(ack(0, AckReason.MISSING_CHUNKS, "b", [0]), 100.5))) == [("b", 0)]
    b.handle(AckArrived(ack(0, AckReason.ACCEPTED, "b"), 101.0))
    rep = decode_message(of(b.handle(Tick(101.0)), Publish)[0].payload, Report)
    assert rep.accepted == ("a", "b") and rep.record.shapley == RECORD.shapley


def test_restart_after_training_before_any_chunk_sends_everything():
    a = machine()
    ready(a)
    a.handle(Tick(0.0))
    saved = of(a.handle(Trained(0, ("a", "b"), PAYLOADS, RECORD, 0.0)), SaveProgress)[-1].progress
    b = machine(progress=saved, payloads=dict(PAYLOADS))
    ready(b)
    assert chunks(b.handle(Tick(1.0))) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]


def test_restart_with_a_lost_payload_tries_a_rebuild_then_gives_it_up_and_reports():
    pending = {"round": 0, "chosen": ["a"], "status": {}, "chunk_bytes": CHUNK, "started": {"a": True}}
    m = machine(progress={"reported": -1, "stage2": -1, "pending": pending})
    ready(m)
    [job] = of(m.handle(Tick(0.0)), RebuildPayloads)
    assert job.round == 0 and job.modalities == ("a",)
    assert m.progress["pending"]["status"] == {}         # waits for the rebuild
    m.handle(Rebuilt(0, {}, 0.5))                         # nothing could be rebuilt
    acts = m.handle(Tick(1.0))
    assert m.progress["pending"]["status"] == {"a": "failed"}
    assert decode_message(of(acts, Publish)[0].payload, Report).record.chosen == ("a",)


def test_a_damaged_pending_payload_is_never_sent_it_is_rebuilt_from_the_local_model(caplog):
    # issue 10: a corrupt pending payload was re-sent unchecked, refused bad_payload, and the device's
    # log said nothing: the round's contribution was lost
    a = machine()
    ready(a)
    saved = of(trained(a), SaveProgress)[-1].progress
    assert saved["pending"]["sha256"] == SHA
    damaged = {"a": b"X" + PAYLOADS["a"][1:], "b": PAYLOADS["b"]}
    b = machine(progress=saved, payloads=damaged)
    ready(b)
    caplog.set_level("INFO", logger="fedmfs.edge")
    acts = b.handle(Tick(100.0))
    assert ("a", 2) not in chunks(acts) and chunks(acts) == [("b", 1)]     # only b's probe: a is not sent
    assert "pending payload of a is damaged" in caplog.text
    [job] = of(acts, RebuildPayloads)
    assert job.modalities == ("a",)
    b.handle(Rebuilt(0, {"a": PAYLOADS["a"]}, 100.5))
    acts = b.handle(Tick(101.0))
    assert chunks(acts) == [("a", 2)]          # the rebuilt payload is probed like any resumed upload
    assert "rebuilt from the saved local model" in caplog.text


def test_restart_after_the_report_does_not_train_the_round_again():
    m = machine(progress={"reported": 0, "stage2": -1, "pending": None})
    ready(m)
    assert m.handle(Tick(0.0)) == []
    m.handle(ann(1))
    assert of(m.handle(Tick(1.0)), RunStage2)[0].round == 0


def test_job_failures_retry_after_the_delay_or_stop_the_daemon():
    m = machine()
    ready(m)
    m.handle(Tick(0.0))
    assert m.handle(JobFailed(JobKind.TRAIN, 0, "OSError: disk", True, 5.0)) == []
    assert m.handle(Tick(5.5)) == []                                 # retry_delay = 1 s
    [again] = of(m.handle(Tick(6.0)), StartTraining)
    assert again.round == 0
    [fatal] = m.handle(JobFailed(JobKind.TRAIN, 0, "ConfigError: bad lr", False, 7.0, exit_code=2))
    assert isinstance(fatal, Fatal) and fatal.exit_code == 2 and "bad lr" in fatal.reason
    assert m.handle(Trained(3, (), {}, {}, 8.0)) == []                # nobody asked: ignored


def test_done_runs_the_last_stage2_then_finishes_once():
    m = machine(progress={"reported": 2, "stage2": 1, "pending": None})
    ready(m, r=2)
    m.handle(ann(2, RoundState.DONE))
    [s2] = of(m.handle(Tick(0.0)), RunStage2)
    assert s2.round == 2 and m.handle(Tick(0.5)) == []
    m.handle(Stage2Done(2, 0.9))
    [ev] = of(m.handle(Tick(1.0)), Publish)        # the last evaluation goes out before the run ends
    assert decode_message(ev.payload, Evaluation).round == 2 and not m.finished
    m.handle(AckArrived(ack(2, AckReason.EVALUATION_ACCEPTED), 1.2))
    assert of(m.handle(Tick(1.5)), Finished) and m.finished
    assert m.handle(Tick(2.0)) == []


def test_other_fleets_and_missing_config_hold_the_machine():
    m = machine()
    m.handle(ann(0))
    assert m.handle(Tick(0.0)) == []                                  # no config yet
    m.handle(ConfigArrived(DeviceConfig(DEV, SelectionPolicy(gamma=1))))
    assert m.handle(Tick(0.0)) == []                                  # globals not held
    m.handle(Announced(RoundAnnouncement("other", 0, RoundState.OPEN, 1e9, 3, (DEV,), {}, CHUNK)))
    assert m.handle(Tick(0.0)) == []
    with pytest.raises(TypeError):
        m.handle("not an event")


# ------------------------------------------------------------------------------- decoding, verification

def test_decode_inbound_routes_this_devices_messages_only():
    v = Verifier(PUB)
    cfg = DeviceConfig(DEV, SelectionPolicy(gamma=1))
    signed = sign_message(cfg, FLEET, 5, 2, Signer(PRIV))
    assert decode_inbound(T.config(DEV), signed, DEV, 1.0, v) == ConfigArrived(cfg, 1.0, 5, 2)
    assert decode_inbound(T.config("other"), signed, DEV, 1.0, v) is None
    assert decode_inbound(T.round(), b"", DEV, 1.0, v) is None                    # cleared retained
    a = Ack(DEV, 0, AckReason.ACCEPTED, "a", SHA["a"])
    assert decode_inbound(T.ack(DEV), encode_message(a), DEV, 2.0, v) == AckArrived(a, 2.0)
    assert decode_inbound(T.global_model("a"), b"xyz", DEV, 0.0, v) == GlobalFrame(b"xyz")
    r = ann(3).announcement
    assert decode_inbound(T.round(), sign_message(r, FLEET, 5, 3, Signer(PRIV)), DEV, 1.0, v) == Announced(r, 1.0, 5)
    with pytest.raises(PayloadError, match="not signed"):
        decode_inbound(T.round(), encode_message(r), DEV, 0.0, v)
    with pytest.raises(PayloadError, match="not signed"):
        decode_inbound(T.config(DEV), encode_message(cfg), DEV, 0.0, v)
    with pytest.raises(PayloadError):
        decode_inbound(T.round(), b"{not json", DEV, 0.0, v)
    with pytest.raises(PayloadError):
        decode_inbound("elsewhere/x/y/z", b"{}", DEV, 0.0, v)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["round", "config", "ack", "global"]), data=st.binary(max_size=300))
def test_decode_inbound_only_ever_raises_payload_error(kind, data):
    topic = {"round": T.round(), "config": T.config(DEV), "ack": T.ack(DEV), "global": T.global_model("a")}[kind]
    try:
        ev = decode_inbound(topic, data, DEV, 0.0, Verifier(PUB))
    except PayloadError:
        return
    m = machine()
    if not isinstance(ev, (GlobalFrame, type(None))):
        m.handle(ev)
        m.handle(Tick(0.0))


def test_verify_global_checks_signature_fleet_and_payload():
    priv, pub = generate_keypair()
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    payload = encode_model(state, ModelHeader(round=1, modality="a", samples=3))
    frame = encode_global(FLEET, 1, "a", payload, Signer(priv))
    ev = verify_global(frame, Verifier(pub), FLEET)
    assert ev.modality == "a" and ev.sha256 == hashlib.sha256(payload).hexdigest() and not ev.stored
    np.testing.assert_array_equal(ev.state["w"], state["w"])
    with pytest.raises(PayloadError):
        verify_global(frame, Verifier(generate_keypair()[1]), FLEET)             # another key
    with pytest.raises(PayloadError):
        verify_global(encode_global("other", 1, "a", payload, Signer(priv)), Verifier(pub), FLEET)
    with pytest.raises(PayloadError):
        verify_global(encode_global(FLEET, 1, "b", payload, Signer(priv)), Verifier(pub), FLEET)


@pytest.mark.parametrize("doc", [[], {"reported": "0", "stage2": -1}, {"reported": 0, "stage2": -1, "pending": 3},
                                 {"reported": 0, "stage2": -1, "pending": {"round": 0, "chosen": ["a"]}}])
def test_a_malformed_progress_document_is_a_config_error(doc):
    with pytest.raises(ConfigError, match="afresh"):
        check_progress(doc)


def test_an_unanswered_evaluation_is_resent_then_given_up_and_a_restart_resends_it():
    m = machine(progress={"reported": 0, "stage2": -1, "evaluated": -1, "pending": None})
    ready(m, r=1)
    [s2] = of(m.handle(Tick(0.0)), RunStage2)
    m.handle(Stage2Done(0, 0.5, 20))
    sent = [a for a in m.handle(Tick(1.0)) if isinstance(a, Publish) and a.topic == T.report(DEV)]
    assert [decode_message(a.payload, Evaluation) for a in sent] == [Evaluation(DEV, 0, 0.5, 20)]
    assert not [a for a in m.handle(Tick(5.0)) if isinstance(a, Publish) and a.topic == T.report(DEV)]
    # a restart before the coordinator answered: the evaluation comes from the saved history
    m2 = machine(progress=dict(m.progress), history=dict(m.history))
    ready(m2, r=1)
    acts = m2.handle(Tick(20.0))
    assert [decode_message(a.payload, Evaluation).round for a in of(acts, Publish)
            if a.topic == T.report(DEV)] == [0]
    for t in (31.0, 42.0):        # max_attempts = 3: two more tries, then it is given up
        assert [a for a in of(m2.handle(Tick(t)), Publish) if a.topic == T.report(DEV)]
    given_up = m2.handle(Tick(53.0))
    assert of(given_up, SaveProgress)[-1].progress["evaluated"] == 0


def test_old_state_files_without_evaluated_are_read():
    assert check_progress({"reported": 3, "stage2": 2, "pending": None})["evaluated"] == 2
    with pytest.raises(ConfigError, match="evaluated"):
        check_progress({"reported": 3, "stage2": 2, "evaluated": "x", "pending": None})


def test_dynamic_bandwidth_caps_a_round_at_the_link_rate_times_its_time_budget():
    """Issue 17 (the paper's future work): with ``upload_seconds`` in its policy a device caps a round at
    what its measured link carries in that time (and at the coordinator's cap); unmeasured, or without
    a time budget, the coordinator's cap is the cap."""
    pol = SelectionPolicy(gamma=2, cap_bytes=5_000, upload_seconds=2.0)
    assert pol.link_cap(None) == 5_000 and pol.link_cap(1_000.0) == 2_000 and pol.link_cap(10_000.0) == 5_000
    assert SelectionPolicy(upload_seconds=3.0).link_cap(100.0) == 300                      # no fixed cap
    assert SelectionPolicy(cap_bytes=7).link_cap(1.0) == 7                                  # no time budget
    assert SelectionPolicy.from_dict(pol.to_dict()) == pol
    assert DeviceConfig.from_dict(DeviceConfig(DEV, pol).to_dict()).policy.upload_seconds == 2.0
    with pytest.raises(ValueError, match="upload_seconds"):
        SelectionPolicy(upload_seconds=0)
    m = machine()
    m.handle(ConfigArrived(DeviceConfig(DEV, pol)))
    for mod, sha in G.items():
        m.handle(GlobalArrived(mod, sha, f"state-{mod}", b"frame", stored=True))
    m.handle(ann(0))
    m.download_rate = 1_500.0            # what its fetched chunks arrived at (bytes/s)
    [job] = of(m.handle(Tick(0.0)), StartTraining)
    assert job.config.policy.cap_bytes == 3_000 and job.config.policy.gamma == 2
    assert m.config.policy.cap_bytes == 5_000           # the coordinator's config is kept as it was sent
