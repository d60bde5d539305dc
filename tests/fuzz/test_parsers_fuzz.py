"""Property tests of every parser of network bytes and data files (the bounded, CI-sized sibling of
``bench/fuzz.py``, the atheris harness): each input either parses or raises the project's own error
(PayloadError for the wire and model payloads, DataError for data files), and what parses is right
(round trips, the decoder accepts only what the encoder writes); the round machines never raise.

Inputs are valid encodings made by the project's own encoders, mutated (bytes replaced, cut, inserted),
plus plain random bytes. Each test is bounded (``max_examples``) so the file runs in well under a minute.
Defects the fuzzing found have their minimal reproducers in ``test_fuzz_findings.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmfs.coordinator import machine as cm
from fedmfs.core import payload as pl
from fedmfs.core import safejson
from fedmfs.core.data import format as dataformat
from fedmfs.core.data import ucihar
from fedmfs.core.errors import DataError, PayloadError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.records import RoundRecord
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.wire import (
    Ack,
    AckReason,
    DeviceConfig,
    DeviceState,
    DeviceStatus,
    Evaluation,
    Fetch,
    GlobalWant,
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
    parse_topic,
    sign_message,
    split_payload,
    verify_message,
)
from fedmfs.edge import machine as em

# derandomize: CI explores the same inputs every run (a failure is a change, never luck); the open-ended
# search is bench/fuzz.py's
FAST = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SLOWEST = settings(SLOW, max_examples=15)

FLEET, DEVICE = "lab", "dev1"
SIGNER = Signer("5a" * 32)
VERIFIER = Verifier(SIGNER.public_hex())
SPEC = DatasetSpec((ModalitySpec("eye", (2,), hidden=3), ModalitySpec("emg", (4,), hidden=2)), 3, 5)
TOPICS = Topics(FLEET)


def model(mod: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in cm.modality_shapes(SPEC[mod], 3).items()}


def payload(mod: str, seed: int, rnd: int = 0, samples: int = 10, codec: str = "fp32") -> bytes:
    return pl.encode_model(model(mod, seed), pl.ModelHeader(rnd, mod, samples, pl.Codec(codec)))


PAYLOADS = [payload("eye", 1), payload("emg", 2, 3, 400, "fp16"), payload("eye", 3, 1, 7, "int8")]
ANN = RoundAnnouncement(FLEET, 0, RoundState.OPEN, 1600.0, 3, (DEVICE, "b"), {"eye": "ab" * 32}, 200)
CFG = DeviceConfig(DEVICE, SelectionPolicy(gamma=1, cap_bytes=5000, codec="int8"), 500)
RECORD = RoundRecord(DEVICE, 0, 10, {"eye": 0.5, "emg": -0.1}, {"eye": 900, "emg": 700}, {"eye": 1.0, "emg": 0.2},
                     ("eye",), 0.5)
MESSAGES: list[Any] = [ANN, CFG, Report(RECORD, ("eye",), 900, 1100), Evaluation(DEVICE, 0, 0.75, 12),
            Ack(DEVICE, 0, AckReason.MISSING_CHUNKS, "eye", "ab" * 32, (1, 2, 5), "3 missing"),
            DeviceStatus(DEVICE, DeviceState.ONLINE),
            Fetch(DEVICE, 7, 0, RoundState.OPEN, True, (GlobalWant("eye", "ab" * 32, (0, 1, 2)),))]
PLAIN = [encode_message(m) for m in MESSAGES]
SIGNED = [sign_message(ANN, FLEET, 7, 0, SIGNER), sign_message(CFG, FLEET, 7, 0, SIGNER)]
GLOBALS = [encode_global(FLEET, 0, "eye", PAYLOADS[0], SIGNER, 7), encode_global(FLEET, 4, "emg", PAYLOADS[1], SIGNER)]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed with a few bytes replaced, cut out, inserted, or its tail dropped; or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.integers(0, 4))
        if op <= 1:
            data[i] = draw(st.sampled_from([0, 1, 0x22, 0x5C, 0x7B, 0x7D, 0x30, 0x39, 0x7F, 0x80, 0xFF,
                                            draw(st.integers(0, 255))]))
        elif op == 2:
            del data[i:i + draw(st.integers(1, 16))]
        elif op == 3:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[i:]
    return bytes(data)


# ---------------------------------------------------------------------------------------------- JSON

def _depth(v: object) -> int:
    depth, stack = 0, [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict | list):
            depth = max(depth, d)
            stack += [(y, d + 1) for y in (x.values() if isinstance(x, dict) else x)]
    return depth


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**40, 10**40) | st.floats(allow_nan=False)
                           | st.text(alphabet=st.sampled_from('ab"\\[]{}\u00e9 '), max_size=6),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=20)


@FAST
@given(st.one_of(mutated(PLAIN + [b'{"a":["\\\\\\"[{",{"b":[]}]}', b"[" * 17 + b"]" * 17]),
                 JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_safejson_refuses_only_with_payload_error_and_measures_depth_exactly(data):
    try:
        ref = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        ref = None
    else:
        assert safejson.json_depth(data) == _depth(ref)
    try:
        v = safejson.loads(data)
    except PayloadError:
        return
    assert json.dumps(v) == json.dumps(ref)


# ------------------------------------------------------------------------------------- model payloads

def _payload_contract(data: bytes) -> None:
    try:
        header, state = pl.decode_model(data)
    except PayloadError:
        return
    assert pl.state_digest(state) == header.sha256
    # the decoder accepts only what the encoder would write
    again = pl.encode_model(state, pl.ModelHeader(header.round, header.modality, header.samples))
    h2, _ = pl.decode_model(again)
    assert (h2.round, h2.modality, h2.samples, h2.sha256) == (header.round, header.modality, header.samples,
                                                              header.sha256)


@FAST
@given(mutated(PAYLOADS))
def test_decode_model_on_mutated_payloads(data):
    _payload_contract(data)


_HEADERS = [p[8:8 + struct.unpack("<Q", p[:8])[0]] for p in PAYLOADS]


@FAST
@given(mutated(_HEADERS), st.sampled_from(PAYLOADS))
def test_decode_model_with_a_mutated_safetensors_header(head, body):
    """The length prefix kept right, so the JSON header's own checks (and safetensors') are reached."""
    (n,) = struct.unpack("<Q", body[:8])
    _payload_contract(struct.pack("<Q", len(head)) + head + body[8 + n:])


# ---------------------------------------------------------------------------------------------- chunks

CHUNKS = split_payload(PAYLOADS[0], 300)[:2] + split_payload(b"abcdefghij", 4)


@FAST
@given(mutated(CHUNKS))
def test_decode_chunk_refuses_or_round_trips(frame):
    try:
        h, d = decode_chunk(frame)
    except PayloadError:
        return
    assert encode_chunk(h, d) == frame


@FAST
@given(st.binary(min_size=1, max_size=600), st.integers(1, 200),
       st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=30),
       st.lists(st.binary(max_size=80), max_size=3))
def test_reassembler_with_decoded_frames_in_any_order(data, chunk, order, foreign):
    """Frames of the upload in any order, repeated, with frames of other uploads and junk mixed in."""
    frames = split_payload(data, chunk)
    others = split_payload(data + b"!", chunk) + foreign
    asm = None
    for i, theirs in order:
        frame = others[i % len(others)] if theirs else frames[i % len(frames)]
        try:
            h, d = decode_chunk(frame)
            if asm is None:
                asm = Reassembler(h)
            res = asm.add(h, d)
        except PayloadError:
            continue
        if res.payload is not None:
            assert hashlib.sha256(res.payload).hexdigest() == asm.header.sha256
            assert len(res.payload) == asm.header.payload_bytes
            return
        assert all(0 <= j < asm.header.total for j in res.missing)


# --------------------------------------------------------------------------------------- signed frames

@FAST
@given(mutated(GLOBALS + [b"FMG\x01" + GLOBALS[0][4:]]))
def test_decode_global_with_and_without_a_verifier(frame):
    for v in (None, VERIFIER):
        try:
            h, p = decode_global(frame, v)
        except PayloadError:
            continue
        assert hashlib.sha256(p).hexdigest() == h.sha256
        if v is not None:    # only what the coordinator signed passes
            assert encode_global(h.fleet, h.round, h.modality, p, SIGNER, h.epoch) == frame


@FAST
@given(mutated(SIGNED + PLAIN[:2]))
def test_decode_control_and_verify_message(frame):
    for v in (None, VERIFIER):
        try:
            decode_control(frame, v)
        except PayloadError:
            pass
    for kind in (RoundAnnouncement, DeviceConfig):
        try:
            head, msg = verify_message(frame, VERIFIER, FLEET, kind)
        except PayloadError:
            continue
        assert isinstance(msg, kind) and head.fleet == FLEET and frame in SIGNED


@FAST
@given(st.sampled_from([RoundAnnouncement, DeviceConfig]), st.integers(0, 2**53), st.integers(0, 9),
       mutated(PLAIN[:2]))
def test_verify_message_on_signed_mutated_bodies(kind, epoch, rnd, body):
    """What is inside a valid signature: the message decoders behind verify_message."""
    frame = encode_control(FLEET, kind.type, epoch, rnd, body, SIGNER)
    try:
        head, msg = verify_message(frame, VERIFIER, FLEET, kind)
    except PayloadError:
        return
    assert (head.epoch, head.round) == (epoch, rnd)
    assert decode_message(encode_message(msg), kind) == msg


# ------------------------------------------------------------------------------------ control messages

FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(), st.text(max_size=70),
                         st.sampled_from(["eye", "emg", DEVICE, FLEET, "open", "done", "online", "ab" * 32,
                                          "accepted", "fp16", "fedmfs"]),
                         st.lists(st.sampled_from(["eye", 3, None, DEVICE]), max_size=3),
                         st.dictionaries(st.sampled_from(["eye", "emg", "X", ""]),
                                         st.one_of(st.integers(-1, 99), st.floats(), st.text(max_size=3)), max_size=2))


@st.composite
def message_dicts(draw: st.DrawFn) -> bytes:
    """A valid message's JSON with some fields replaced, dropped or added."""
    d = json.loads(draw(st.sampled_from(PLAIN)))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(sorted(d) + ["extra", "record"]))
        if draw(st.integers(0, 4)) == 0:
            d.pop(key, None)
        elif key == "record" and isinstance(d.get("record"), dict) and d["record"]:
            d["record"][draw(st.sampled_from(sorted(d["record"])))] = draw(FIELD_VALUES)
        else:
            d[key] = draw(FIELD_VALUES)
    return json.dumps(d).encode()


@FAST
@given(st.one_of(mutated(PLAIN + SIGNED), message_dicts()))
def test_decode_message_of_every_type(data):
    try:
        msg: Any = decode_message(data)
    except PayloadError:
        msg = None
    else:
        assert decode_message(encode_message(msg)) == msg
    for kind in (RoundAnnouncement, DeviceConfig, Report, Evaluation, Ack, DeviceStatus):
        try:
            assert decode_message(data, kind) == msg
        except PayloadError:
            pass


# ---------------------------------------------------------------------------------------------- topics

TOPIC_SEEDS = [TOPICS.round(), TOPICS.global_model("eye"), TOPICS.config(DEVICE), TOPICS.upload(DEVICE, 12, "emg"),
               TOPICS.report(DEVICE), TOPICS.ack("a.b-c_d"), TOPICS.status(DEVICE), TOPICS.fetch(DEVICE),
               TOPICS.state(DEVICE), TOPICS.device_global(DEVICE, "eye")]


@FAST
@given(st.one_of(mutated([t.encode() for t in TOPIC_SEEDS]).map(lambda b: b.decode("utf-8", "surrogateescape")),
                 st.text(max_size=80).map(lambda t: f"fedmfs/v1/{t}")))
def test_parse_topic_refuses_or_rebuilds(topic):
    try:
        p: Any = parse_topic(topic)
    except PayloadError:
        return
    t, K = Topics(p.fleet), TopicKind
    rebuilt = {K.ROUND: lambda: t.round(), K.GLOBAL: lambda: t.global_model(p.modality),
               K.UPLOAD: lambda: t.upload(p.device, p.round, p.modality), K.CONFIG: lambda: t.config(p.device),
               K.REPORT: lambda: t.report(p.device), K.ACK: lambda: t.ack(p.device),
               K.STATUS: lambda: t.status(p.device), K.FETCH: lambda: t.fetch(p.device),
               K.STATE: lambda: t.state(p.device), K.DEVICE_GLOBAL: lambda: t.device_global(p.device, p.modality)
               }.get(p.kind)
    assert rebuilt is not None, p.kind
    assert rebuilt() == topic          # one spelling per topic (a round "06" was another: fixed, 4b78ad8)


# ------------------------------------------------------------------------------------------ data files

def _client(n: int = 6) -> dataformat.ClientData:
    rng = np.random.default_rng(0)
    return dataformat.ClientData("c0", {"eye": rng.standard_normal((n, 5, 2)).astype(np.float32),
                                        "emg": rng.standard_normal((n, 5, 4)).astype(np.float32)},
                                 rng.integers(0, 3, n).astype(np.int64), np.arange(n) % 3 != 0)


def _npz(arrays: dict, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    save: Any = np.savez_compressed if compressed else np.savez
    save(buf, **arrays)
    return buf.getvalue()


_C = _client()
NPZ = [_npz({"x_eye": _C.x["eye"], "x_emg": _C.x["emg"], "y": _C.y, "train": _C.train}, c) for c in (False, True)]


def _load_npz(tmp_path_factory, data: bytes) -> None:
    p = tmp_path_factory.mktemp("npz") / "c0.npz"
    p.write_bytes(data)
    try:
        c = dataformat.load_client(p, SPEC)
    except DataError:
        return
    assert set(c.x) <= set(SPEC.names) and c.train.shape == (len(c),)


@SLOW
@given(data=mutated(NPZ))
def test_load_client_on_mutated_npz_files(tmp_path_factory, data):
    _load_npz(tmp_path_factory, data)


ARRAYS = st.sampled_from([np.zeros((6, 5, 2), np.float32), np.zeros((6, 5, 2), np.float64), np.zeros(6, np.int64),
                          np.ones(6, bool), np.array(["a"] * 6), np.zeros((6, 5, 4), np.complex64), np.zeros(()),
                          np.full((6, 5, 2), np.nan, np.float32), np.zeros(6, "V3"), np.arange(6.0) - 2,
                          np.zeros(6, [("a", "i4")]), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.int64)])


@SLOW
@given(arrays=st.dictionaries(st.sampled_from(["x_eye", "x_emg", "x_", "x_zz", "y", "train", "other"]), ARRAYS,
                              max_size=5))
def test_load_client_on_npz_files_of_any_arrays(tmp_path_factory, arrays):
    _load_npz(tmp_path_factory, _npz(arrays))


@SLOW
@given(data=st.one_of(mutated([json.dumps({"format": "fedmfs-fleet", "version": 1, "spec": SPEC.to_dict(),
                                           "clients": ["c0"], "metadata": {}}).encode()])))
def test_load_fleet_on_mutated_fleet_json(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fleet")
    dataformat.save_fleet(dataformat.Fleet(SPEC, [_C]), d)
    (d / "fleet.json").write_bytes(data)
    try:
        dataformat.load_fleet(d)
    except DataError:
        pass


@FAST
@given(data=mutated([b"1 2 3\n4 5 6\n", b"  1.0e+00 -2.5e-01 nan\n\n7 8 inf\n", b"1 WALKING\n2 UP\n"]))
def test_read_text_matrix_and_activity_labels(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("txt")
    (d / "m.txt").write_bytes(data)
    (d / "activity_labels.txt").write_bytes(data)
    assert len(ucihar._class_names(d)) == 6
    for cols in (None, 3):
        try:
            a = ucihar.read_text_matrix(d / "m.txt", cols)
        except DataError:
            continue
        assert a.ndim == 2 and (cols is None or a.shape[1] == cols)


@SLOW
@given(ys=mutated([b"1\n2\n6\n", b"5\n"]), subjects=mutated([b"1\n1\n3\n", b"30\n"]))
def test_load_uci_har_on_fuzzed_label_and_subject_files(tmp_path_factory, ys, subjects):
    root = tmp_path_factory.mktemp("uci")
    d = root / "train"
    (d / "Inertial Signals").mkdir(parents=True)
    (d / "y_train.txt").write_bytes(ys)
    (d / "subject_train.txt").write_bytes(subjects)
    rows = max(1, len([ln for ln in ys.splitlines() if ln.split()]))
    for sig in ("body_acc", "body_gyro", "total_acc"):
        for ax in "xyz":
            (d / "Inertial Signals" / f"{sig}_{ax}_train.txt").write_bytes((" 0.5" * 128 + "\n").encode() * rows)
    try:
        f = ucihar.load_uci_har(root, parts=("train",))
    except DataError:
        return
    assert all(0 <= c.y.min() and c.y.max() < 6 for c in f.clients)


@SLOWEST
@given(n=st.integers(0, 5), t=st.integers(0, 4), labels=st.lists(st.integers(-1, 4), max_size=6),
       names=st.one_of(st.none(), st.lists(st.sampled_from(["None", "a", "b"]), max_size=4).map(repr), st.just("[")),
       ids=st.lists(st.sampled_from([b"S00", b"S01", b"bad id", b"", b"S\xff"]), max_size=6),
       streams=st.lists(st.booleans(), min_size=6, max_size=6), example_labels=st.integers(-1, 7),
       steps=st.sampled_from([None, 1, 2, 5]))
def test_load_actionsense_on_files_of_any_layout(tmp_path_factory, n, t, labels, names, ids, streams, example_labels,
                                                 steps):
    h5py = pytest.importorskip("h5py")
    from fedmfs.core.data.actionsense import STREAMS, load_actionsense_hdf5
    p = tmp_path_factory.mktemp("as") / "a.hdf5"
    with h5py.File(p, "w") as f:
        f["example_label_indexes"] = np.array(labels, np.int64)
        f["example_subject_ids"] = np.array(ids, "S8")
        if example_labels >= 0:
            f["example_labels"] = np.array([b"act"] * example_labels, "S3")
        if names is not None:
            f.attrs["activities_to_classify"] = names
        raw = {"tactile_left": (2, 2), "tactile_right": (2, 2), "xsens": (22, 3)}
        for (m, name), on in zip(STREAMS.items(), streams):
            if on:
                f[name] = np.random.default_rng(0).standard_normal((n, t, *raw.get(m, (2,)))).astype(np.float32)
    try:
        fleet = load_actionsense_hdf5(p, None, steps)
    except DataError:
        return
    assert all(len(c) > 0 for c in fleet.clients)


# ------------------------------------------------------------------------------------------- machines

_DEVICES = ("a", "b", "c", "zz")
_REPORTS = [encode_message(Report(RoundRecord(d, r, 10, {"eye": 1.0}, {"eye": 1}, {"eye": 1.0}, ("eye",))))
            for r in (0, 1) for d in ("a", "b", "c")]

coordinator_event = st.one_of(
    st.tuples(st.just("chunk"), st.sampled_from(_DEVICES), st.integers(0, 2), st.sampled_from(["eye", "emg", "xyz"]),
              mutated(split_payload(PAYLOADS[0], 300))),
    st.tuples(st.just("upload"), st.sampled_from(_DEVICES), st.integers(0, 1), st.sampled_from(["eye", "emg"]),
              mutated([payload("eye", 5), payload("emg", 6, codec="int8"), payload("eye", 7, 1, 99999)]),
              st.integers(100, 900), st.randoms(use_true_random=False)),
    st.tuples(st.just("report"), st.sampled_from(_DEVICES), mutated(_REPORTS + PLAIN)),
    st.tuples(st.just("status"), st.sampled_from(_DEVICES), mutated(PLAIN[-1:])),
    st.tuples(st.just("tick"), st.floats(0, 100)),
)


@SLOW
@given(st.lists(coordinator_event, max_size=12), st.sampled_from(["weighted_mean", "trimmed_mean", "median"]))
def test_coordinator_machine_never_raises_on_peer_input(events, rule):
    logging.getLogger("fedmfs").setLevel(logging.CRITICAL)
    devs = (DeviceConfig("a", SelectionPolicy(gamma=1)), DeviceConfig("b", SelectionPolicy(cap_bytes=3000), 50),
            DeviceConfig("c", SelectionPolicy(codec="int8")))
    m = cm.CoordinatorMachine(FLEET, SPEC, devs, cm.RoundPolicy(2, 60.0, 2, 300, rule), SIGNER, 7)
    m.seed_globals({n: model(n, 100 + i) for i, n in enumerate(SPEC.names)})
    m.handle(cm.Start(now=1000.0))
    now = 1001.0
    for e in events:
        if e[0] == "chunk":
            m.handle(cm.ChunkArrived(e[1], e[2], e[3], e[4], now))
        elif e[0] == "upload":
            try:
                frames = split_payload(e[4], e[5])
            except PayloadError:
                continue
            e[6].shuffle(frames)
            for f in frames + frames[-1:]:
                m.handle(cm.ChunkArrived(e[1], e[2], e[3], f, now))
        elif e[0] == "report":
            m.handle(cm.ReportArrived(e[1], e[2], now))
        elif e[0] == "status":
            m.handle(cm.StatusArrived(e[1], e[2], now))
        else:
            now += e[1]
            m.handle(cm.Tick(now))
        assert all(c is None or m.used.get(d, 0) <= c for d, c in m.caps.items())


edge_message = st.one_of(
    st.tuples(st.sampled_from(TOPIC_SEEDS + [TOPICS.ack("other"), "fedmfs/v1/x/round"]),
              mutated(SIGNED + PLAIN + GLOBALS)),
    st.tuples(st.just("signed"), st.sampled_from(["round", "config"]), st.integers(0, 9), st.integers(0, 3),
              mutated(PLAIN[:2])),
    st.tuples(st.just("global"), st.integers(0, 9), st.integers(0, 3), st.sampled_from(["eye", "emg"]),
              mutated(PAYLOADS)),
)


@SLOW
@given(st.lists(edge_message, max_size=8))
def test_edge_decode_inbound_verify_global_and_machine(msgs):
    logging.getLogger("fedmfs").setLevel(logging.CRITICAL)
    mach = em.EdgeMachine(DEVICE, FLEET)
    for i, msg in enumerate(msgs):
        if msg[0] == "signed":
            topic = TOPICS.round() if msg[1] == "round" else TOPICS.config(DEVICE)
            body = encode_control(FLEET, msg[1], msg[2], msg[3], msg[4], SIGNER)
        elif msg[0] == "global":
            topic, body = TOPICS.global_model(msg[3]), encode_global(FLEET, msg[2], msg[3], msg[4], SIGNER, msg[1])
        else:
            topic, body = msg
        try:
            ev = em.decode_inbound(topic, body, DEVICE, 2000.0 + i, VERIFIER)
            if isinstance(ev, em.GlobalFrame):
                ev = em.verify_global(ev.frame, VERIFIER, FLEET, now=2000.0 + i)
        except PayloadError:
            continue
        if ev is not None:
            mach.handle(ev)
        mach.handle(em.Tick(2000.5 + i))
