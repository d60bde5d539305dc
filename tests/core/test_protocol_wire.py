"""The wire protocol: topics, control messages, chunk frames, signed globals; fuzzed parsers."""

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmfs.core.errors import PayloadError
from fedmfs.core.records import RoundRecord
from fedmfs.core.selection import Alphas, SelectionPolicy
from fedmfs.core.wire import (
    CHUNK_HEADER_BYTES,
    PROTOCOL_VERSION,
    Ack,
    AckReason,
    ChunkHeader,
    DeviceConfig,
    DeviceState,
    DeviceStatus,
    Evaluation,
    Reassembler,
    Report,
    RoundAnnouncement,
    RoundState,
    Signer,
    TopicKind,
    Topics,
    Verifier,
    decode_chunk,
    decode_control,
    decode_global,
    decode_message,
    encode_chunk,
    encode_control,
    encode_global,
    encode_message,
    generate_keypair,
    parse_topic,
    sign_message,
    split_payload,
    verify_message,
)


def test_topics_roundtrip():
    t = Topics("lab")
    assert t.upload("dev-1", 3, "eye") == "fedmfs/v1/lab/device/dev-1/upload/3/eye"
    p = parse_topic(t.upload("dev-1", 3, "eye"))
    assert (p.kind, p.fleet, p.device, p.round, p.modality) == (TopicKind.UPLOAD, "lab", "dev-1", 3, "eye")
    assert parse_topic(t.round()).kind is TopicKind.ROUND
    assert parse_topic(t.global_model("xsens")).modality == "xsens"
    for k in ("config", "report", "ack", "status"):
        p = parse_topic(getattr(t, k)("d"))
        assert (p.kind.value, p.device) == (k, "d")


@pytest.mark.parametrize("topic", [
    "fedmfs/v2/lab/round", "fedmfs/v1/lab/device/d/upload/x/eye", "fedmfs/v1/lab/device/+/report",
    "fedmfs/v1/lab/device/d/upload/1/EYE", "fedmfs/v1/lab", "fedmfs/v1/lab/global/a/b", "",
])
def test_bad_topics(topic):
    with pytest.raises(PayloadError):
        parse_topic(topic)


def test_bad_names_refused():
    with pytest.raises(PayloadError):
        Topics("a/b")
    with pytest.raises(PayloadError):
        Topics("lab").report("#")


MESSAGES = [
    RoundAnnouncement("lab", 2, RoundState.OPEN, 1700000000.5, 5, ("a", "b"), {"eye": "0" * 64}, 4096),
    DeviceConfig("a", SelectionPolicy("fedmfs", 2, Alphas(0.2, 0.8, 0.0), 100000, "fp16")),
    DeviceConfig("b", SelectionPolicy(gamma=1)),
    DeviceConfig("c", SelectionPolicy(gamma=1), max_samples=500),
    Report(RoundRecord("a", 2, 40, {"eye": 0.5, "emg": 0.1}, {"eye": 900, "emg": 1200}, {"eye": 1.0, "emg": 0.0},
                       ("eye",), 0.5), ("eye",), 900, 950),
    Evaluation("a", 2, 0.75, 80),
    Ack("a", 2, AckReason.MISSING_CHUNKS, "eye", "ab" * 32, (1, 3), "resend"),
    Ack("a", 2, AckReason.REPORT_ACCEPTED),
    DeviceStatus("a", DeviceState.OFFLINE),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.type)
def test_message_roundtrip(msg):
    data = encode_message(msg)
    assert decode_message(data) == msg
    assert decode_message(data, type(msg)) == msg


def test_message_validation_names_the_field():
    good = json.loads(encode_message(MESSAGES[4]))
    for key, value, words in [("round", -1, "round"), ("shapley", {"eye": "x"}, "shapley"),
                              ("samples", True, "samples"), ("chosen", ["Eye"], "modality")]:
        bad = dict(good, record=dict(good["record"], **{key: value}))
        with pytest.raises(PayloadError, match=words):
            decode_message(json.dumps(bad).encode())
    for key, value, words in [("v", 9, "version"), ("type", "nope", "type"), ("accepted", ["emg"], "not chosen")]:
        bad = dict(good, **{key: value})
        with pytest.raises(PayloadError, match=words):
            decode_message(json.dumps(bad).encode())
    with pytest.raises(PayloadError, match="expected a config"):
        decode_message(encode_message(MESSAGES[0]), DeviceConfig)
    with pytest.raises(PayloadError, match="lacks field 'samples'"):
        rec = {k: v for k, v in good["record"].items() if k != "samples"}
        decode_message(json.dumps(dict(good, record=rec)).encode())
    cfg = json.loads(encode_message(MESSAGES[1]))
    for key, value, words in [("method", "best", "unknown method"), ("codec", "fp8", "codec"),
                              ("alpha_s", -1.0, "alphas"), ("gamma", True, "gamma")]:
        with pytest.raises(PayloadError, match=words):
            decode_message(json.dumps(dict(cfg, **{key: value})).encode())


@pytest.mark.parametrize("body", [
    b'{"v":1,"type":"report","record":' + b"9" * 5000 + b"}",       # ValueError: int max str digits
    b'{"v":1,"type":"status","device":"a","state":"online","x":' + b"1" * 40 + b"}",
    b'{"v":1,"type":"report","record":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b"[" * 20 + b"]" * 20,
])
def test_hostile_json_is_a_payload_error(body):
    """Issue 9 point 4: a JSON integer of thousands of digits raised ValueError out of decode_message."""
    with pytest.raises(PayloadError):
        decode_message(body)


def test_json_depth_ignores_brackets_in_strings():
    from fedmfs.core.safejson import json_depth

    cases = {b"1": 0, b"[]": 1, b'{"a":[1,[2]]}': 3, b'{"a":"[[[["}': 1, rb'["\\",[[]]]': 3, rb'["\"[",[]]': 2,
             rb'{"a":"\\\\","b":{"c":[]}}': 3}
    for text, depth in cases.items():
        json.loads(text)   # each is valid JSON
        assert json_depth(text) == depth, text
    ack = Ack("a", 1, AckReason.BAD_MESSAGE, detail="[" * 100 + "{")   # deep only inside a string
    assert decode_message(encode_message(ack)) == ack


def test_config_max_samples_is_optional_on_the_wire_and_checked():
    """A config from a coordinator before max_samples decodes with the default; a bad bound is refused."""
    from fedmfs.core.wire import DEFAULT_MAX_SAMPLES

    cfg = json.loads(encode_message(MESSAGES[3]))
    assert cfg["max_samples"] == 500
    old = {k: v for k, v in cfg.items() if k != "max_samples"}
    assert decode_message(json.dumps(old).encode(), DeviceConfig).max_samples == DEFAULT_MAX_SAMPLES == 10_000
    for value in (0, 2**31, True, 1.5, "7"):
        with pytest.raises(PayloadError, match="max_samples"):
            decode_message(json.dumps(dict(cfg, max_samples=value)).encode())


def test_decode_message_is_typed():
    """A caller that names the type gets that type (and mypy knows it)."""
    rep: Report = decode_message(encode_message(MESSAGES[4]), Report)
    assert rep.record.shapley == {"eye": 0.5, "emg": 0.1} and rep.device == "a" and rep.round == 2


def test_chunks_roundtrip_any_order_and_missing():
    payload = bytes(range(256)) * 41 + b"tail"
    frames = split_payload(payload, 1000)
    assert len(frames) == 11
    assert all(len(f) == CHUNK_HEADER_BYTES + 1000 for f in frames[:-1])
    h0, _ = decode_chunk(frames[0])
    r = Reassembler(h0)
    order = [5, 10, 3, 3, 0]
    for i in order:
        res = r.add(*decode_chunk(frames[i]))
    assert res.payload is None and res.last_seen
    assert res.missing == (1, 2, 4, 6, 7, 8, 9)
    for i in res.missing[:-1]:
        assert r.add(*decode_chunk(frames[i])).payload is None
    done = r.add(*decode_chunk(frames[9]))
    assert done.payload == payload and done.missing == ()


def test_chunk_inconsistency_refused():
    frames = split_payload(b"x" * 3000, 1000)
    other = split_payload(b"y" * 3000, 1000)
    r = Reassembler(decode_chunk(frames[0])[0])
    with pytest.raises(PayloadError, match="does not belong"):
        r.add(*decode_chunk(other[1]))
    with pytest.raises(PayloadError, match="carries"):
        decode_chunk(frames[1][:-1])
    # a forged sha256 consistent across chunks is caught at completion
    forged = [f[:24] + hashlib.sha256(b"z").digest() + f[56:] for f in frames]
    r = Reassembler(decode_chunk(forged[0])[0])
    r.add(*decode_chunk(forged[0])); r.add(*decode_chunk(forged[1]))
    with pytest.raises(PayloadError, match="sha256"):
        r.add(*decode_chunk(forged[2]))
    with pytest.raises(PayloadError):
        encode_chunk(ChunkHeader(0, 2, 10, 15, "0" * 64), b"123")


def test_signed_global_roundtrip_and_forgery():
    priv, pub = generate_keypair()
    frame = encode_global("lab", 3, "eye", b"payload-bytes", Signer(priv))
    h, p = decode_global(frame, Verifier(pub))
    assert (h.fleet, h.round, h.modality, p) == ("lab", 3, "eye", b"payload-bytes")
    _, other_pub = generate_keypair()
    with pytest.raises(PayloadError, match="signature"):
        decode_global(frame, Verifier(other_pub))
    with pytest.raises(PayloadError, match="sha256"):
        decode_global(frame[:-1] + b"X", Verifier(pub))
    # replaying a signed model under another round: the signature covers the round
    tampered = frame.replace(b'"round":3', b'"round":4')
    with pytest.raises(PayloadError, match="signature"):
        decode_global(tampered, Verifier(pub))


def test_the_epoch_is_signed_into_a_global():
    priv, pub = generate_keypair()
    frame = encode_global("lab", 3, "eye", b"payload-bytes", Signer(priv), epoch=1700000000123)
    h, _ = decode_global(frame, Verifier(pub))
    assert (h.epoch, h.round) == (1700000000123, 3) and frame[:4] == b"FMG" + bytes([PROTOCOL_VERSION])
    with pytest.raises(PayloadError, match="signature"):      # a global of another fleet life
        decode_global(frame.replace(b'"epoch":1700000000123', b'"epoch":1700000000124'), Verifier(pub))


def test_a_protocol_1_global_is_read_only_from_the_coordinators_own_files():
    priv, pub = generate_keypair()
    head = json.dumps({"fleet": "lab", "round": 2, "modality": "eye", "sha256": hashlib.sha256(b"p").hexdigest(),
                       "signature": "ab" * 64}).encode()
    old = b"FMG\x01" + len(head).to_bytes(2, "big") + head + b"p"
    h, p = decode_global(old, None)
    assert (h.round, h.epoch, p) == (2, 0, b"p")
    with pytest.raises(PayloadError, match="magic"):
        decode_global(old, Verifier(pub))


def test_decode_global_refuses_a_huge_integer_with_a_payload_error():
    priv, _ = generate_keypair()
    frame = encode_global("lab", 3, "eye", b"x", Signer(priv))
    n = int.from_bytes(frame[4:6], "big")
    head = frame[6:6 + n].replace(b'"round":3', b'"round":' + b"9" * 5000)
    with pytest.raises(PayloadError, match="digits"):      # ValueError (int max str digits) before
        decode_global(frame[:4] + len(head).to_bytes(2, "big") + head + frame[6 + n:], None)


def test_signed_control_frames():
    priv, pub = generate_keypair()
    ann = MESSAGES[0]
    frame = sign_message(ann, "lab", 7, ann.round, Signer(priv))
    assert frame[:4] == b"FMS" + bytes([PROTOCOL_VERSION])
    head, got = verify_message(frame, Verifier(pub), "lab", RoundAnnouncement)
    assert got == ann and (head.fleet, head.kind, head.epoch, head.round) == ("lab", "round", 7, 2)
    assert decode_message(frame) == ann                       # observers read it without the key
    cfg = DeviceConfig("a", SelectionPolicy(gamma=1))
    cframe = sign_message(cfg, "lab", 7, 5, Signer(priv))
    assert verify_message(cframe, Verifier(pub), "lab", DeviceConfig)[1] == cfg
    refusals = {
        "not signed": (encode_message(ann), "lab", RoundAnnouncement),
        "signature does not verify": (sign_message(ann, "lab", 7, 2, Signer(generate_keypair()[0])), "lab",
                                      RoundAnnouncement),
        "fleet 'lab'": (frame, "other", RoundAnnouncement),
        "belongs": (cframe, "lab", RoundAnnouncement),         # a config frame on the round topic
        "sha256": (frame[:-2] + b"9}", "lab", RoundAnnouncement),
        "protocol version 1": (b"FMS\x01" + frame[4:], "lab", RoundAnnouncement),
    }
    for why, (data, fleet, kind) in refusals.items():
        with pytest.raises(PayloadError, match=why):
            verify_message(data, Verifier(pub), fleet, kind)
    # the header's epoch and round are signed; the round inside must be the header's
    for a, b in ((b'"epoch":7', b'"epoch":8'), (b'"round":2', b'"round":3')):
        with pytest.raises(PayloadError, match="signature"):
            verify_message(frame.replace(a, b, 1), Verifier(pub), "lab", RoundAnnouncement)
    lying = encode_control("lab", "round", 7, 9, encode_message(ann), Signer(priv))
    with pytest.raises(PayloadError, match="round 9"):
        verify_message(lying, Verifier(pub), "lab", RoundAnnouncement)
    with pytest.raises(ValueError):
        encode_control("lab", "ack", 7, 0, b"{}", Signer(priv))
    assert decode_control(frame, None)[1] == encode_message(ann)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_parsers_raise_only_payload_error(data):
    for fn in (decode_message, decode_chunk, lambda d: decode_global(d, None), lambda d: decode_control(d, None),
               lambda d: decode_control(b"FMS" + bytes([PROTOCOL_VERSION]) + d, None)):
        try:
            fn(data)
        except PayloadError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=12),
       st.sampled_from(["round", "config", "report", "ack", "status"]))
def test_fuzz_json_messages(obj, kind):
    d = {"v": PROTOCOL_VERSION, "type": kind}
    if isinstance(obj, dict):
        d.update(obj)
    try:
        msg = decode_message(json.dumps(d).encode())
    except PayloadError:
        return
    assert decode_message(encode_message(msg)) == msg


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.integers(1, 700), st.randoms(use_true_random=False))
def test_fuzz_reassembly_any_order(payload, chunk, rnd):
    frames = split_payload(payload, chunk)
    order = list(range(len(frames))) * 2
    rnd.shuffle(order)
    r = Reassembler(decode_chunk(frames[0])[0])
    got = None
    for i in order:
        res = r.add(*decode_chunk(frames[i]))
        got = got or res.payload
    assert got == payload


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_topics(t):
    try:
        parse_topic("fedmfs/v1/" + t)
    except PayloadError:
        pass
