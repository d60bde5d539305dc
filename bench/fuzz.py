"""Coverage-guided fuzzing (atheris, libFuzzer for Python) of everything that parses bytes from the
network or from data files.

The contract each target checks: every input either parses or raises the project's own error type
(:class:`fedmfs.core.errors.PayloadError` for the wire and model payloads, :class:`DataError` for data
files), never another exception (IndexError, KeyError, struct.error, UnicodeDecodeError, OverflowError,
MemoryError, RecursionError, zipfile.BadZipFile, ValueError from numpy, ...), never a hang; the two round
machines' ``handle()`` never raises on peer input. Where a parser accepts an input, its result is
checked too (re-encoding gives back the frame, the decoder accepts only what the encoder would write,
the byte-level JSON depth equals the parsed depth), so a finding can also be a wrong answer.

Every target starts from a corpus of valid encodings made by the project's own encoders
(``split_payload``, ``encode_model``, ``encode_global``, ``sign_message``, ``encode_message``, a saved
client file, ...), so mutations reach the checks behind the framing. Targets that take several inputs
(the reassembler, the round machines) read a sequence of records ``[tag:1][length:2][bytes]``; records
that need a valid signature or sha256 to get anywhere are signed or split by the harness itself with
its fixed test key, so the fuzzer drives what is inside them.

Install and run (each target runs in its own process; ``all`` runs them one after another)::

    pip install -e '.[fuzz]'                       # atheris
    python bench/fuzz.py --list                    # the targets
    nice -n 19 python bench/fuzz.py all --runs 20000
    nice -n 19 python bench/fuzz.py chunk message topic --runs 200000
    nice -n 19 python bench/fuzz.py coordinator --runs 50000 --out /tmp/fuzz

One summary line per target: inputs run, distinct crashes (distinct exception type + innermost project
frame), execs/s and the slowest input. A crash's first input and traceback are written to
``<out>/<target>/crash-<signature>.bin`` / ``.txt`` (``--out``, default ``$TMPDIR/fedmfs-fuzz``) and the
fuzzing goes on; ``--stop-on-crash`` stops at the first one instead. Replay saved inputs without
libFuzzer: ``python bench/fuzz.py --replay TARGET FILE...`` (``actionsense`` still needs atheris, for its
data provider). libFuzzer itself stops the target on a hang (``--timeout`` seconds for one input) or on
memory above ``--rss-mb``.

Results of the last long run: docs/reliability.md, "Fuzzing".
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROJECT_DIRS = tuple(str(ROOT / d) + os.sep for d in ("fedmfs", "coordinator", "edge"))
FLEET = "lab"
DEVICE = "dev1"
PRIVATE_KEY = "5a" * 32        # a fixed test key: the seed corpus can be signed the same in every process
SLOW_SECONDS = 5.0             # an input slower than this is recorded as a finding ("slow"; the machine is shared)
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


# ------------------------------------------------------------------------------------------ records

def records(data: bytes, limit: int = 48) -> list[tuple[int, bytes]]:
    """``[tag:1][length:2 big-endian][bytes]`` records; a truncated last one keeps what is there."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i + 3 <= len(data) and len(out) < limit:
        n = int.from_bytes(data[i + 1:i + 3], "big")
        out.append((data[i], data[i + 3:i + 3 + n]))
        i += 3 + n
    return out


def pack(recs: list[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes([t]) + len(p).to_bytes(2, "big") + p for t, p in recs)


class Contract(AssertionError):
    """A parser accepted an input but its answer is wrong (a round trip, a depth, an invariant)."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Contract(what)


# ------------------------------------------------------------------------------------------ targets

# libFuzzer dictionaries: tokens the mutator splices in, so a number can become 1e999 or a string a NUL
# (each character one byte, latin-1; written to the dictionary file escaped)
JSON_TOKENS = ['"', "\\", "[", "]", "{", "}", ":", ",", "null", "true", "false", "-0", "1e999", "-1e999", "1e-999",
               "NaN", "Infinity", "-Infinity", "9" * 40, "18446744073709551616", "2147483648", "1.5", "\\u0000",
               "\\ud800", "\\\"", '"v":2', '"type":', '"__metadata__"', '"format"', '"fedmfs-model"', '"dtype"',
               '"F16"', '"I8"', '"F64"', '"BOOL"', '"shape"', '"data_offsets"', '"samples"', '"round"',
               '"modality"', '"codec"', '"int8"', '"spec"', '"modalities"', '"feature_shape"', '"hidden"',
               '"num_classes"', '"steps"', '"clients"', '"metadata"', '"class_names"', '"version"']
NPY_TOKENS = ["\x93NUMPY\x01\x00", "\x93NUMPY\x02\x00", "\x93NUMPY\x03\x00", "'descr': '<f4'", "'descr': '|O'",
              "'descr': [('a', '<i4')]", "'fortran_order': True", "'shape': (", "), }", "(-1,)", "(99999999999,)",
              "PK\x03\x04", "PK\x01\x02", "PK\x05\x06", "x_eye.npy", "y.npy", "train.npy", "\x08\x00", "\x0c\x00",
              "\x63\x00", "\xff\xff\xff\xff"]
TEXT_TOKENS = ["nan", "inf", "-inf", "1e999", "0x1p3", "1_000", "\xef\xbb\xbf", "\x00", "\xc2\xb2", "\r\n", "\t",
               " ", "\n\n"]


@dataclass
class Target:
    name: str
    doc: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    max_len: int = 8192
    tokens: tuple[str, ...] = ()


@dataclass
class Env:
    """Everything the targets share, built after atheris has started instrumenting imports."""

    targets: dict[str, Target] = field(default_factory=dict)
    scratch: Path | None = None      # the data targets' files; removed when the process ends its work


def build() -> Env:
    import numpy as np

    from fedmfs.coordinator import machine as cm
    from fedmfs.core import payload as pl
    from fedmfs.core import safejson
    from fedmfs.core.data import actionsense, format, ucihar
    from fedmfs.core.errors import DataError, PayloadError
    from fedmfs.core.modality import DatasetSpec, ModalitySpec
    from fedmfs.core.records import RoundRecord
    from fedmfs.core.selection import SelectionPolicy
    from fedmfs.core.wire import chunks, messages, signing, topics
    from fedmfs.core.wire.messages import (
        Ack,
        AckReason,
        DeviceConfig,
        DeviceState,
        DeviceStatus,
        Evaluation,
        Fetch,
        GlobalWant,
        Report,
        RoundAnnouncement,
        RoundState,
    )
    from fedmfs.edge import machine as em

    env = Env()
    signer = signing.Signer(PRIVATE_KEY)
    verifier = signing.Verifier(signer.public_hex())
    spec = DatasetSpec((ModalitySpec("eye", (2,), hidden=3), ModalitySpec("emg", (4,), hidden=2)), 3, 5)
    mods = ("eye", "emg", "xyz")

    def model(mod: str, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {k: rng.standard_normal(s).astype(np.float32)
                for k, s in cm.modality_shapes(spec[mod], spec.num_classes).items()}

    def payload(mod: str, seed: int, rnd: int = 0, samples: int = 10, codec: str = "fp32") -> bytes:
        return pl.encode_model(model(mod, seed), pl.ModelHeader(rnd, mod, samples, pl.Codec(codec)))

    def add(name: str, doc: str, allowed: tuple[type[BaseException], ...], seeds: Callable[[], list[bytes]],
            max_len: int = 8192, tokens: list[str] = JSON_TOKENS) -> Callable[[Callable[[bytes], None]],
                                                                             Callable[[bytes], None]]:
        def deco(fn: Callable[[bytes], None]) -> Callable[[bytes], None]:
            env.targets[name] = Target(name, doc, fn, allowed, seeds, max_len, tuple(tokens))
            return fn
        return deco

    # ---- messages, reused as seeds by several targets
    rec = RoundRecord(DEVICE, 0, 10, {"eye": 0.5, "emg": -0.1}, {"eye": 900, "emg": 700}, {"eye": 1.0, "emg": 0.2},
                      ("eye",), 0.5)
    ann = RoundAnnouncement(FLEET, 0, RoundState.OPEN, 1600.0, 3, (DEVICE, "b"),
                            {"eye": hashlib.sha256(b"x").hexdigest()}, 200)
    cfg = DeviceConfig(DEVICE, SelectionPolicy(gamma=1, cap_bytes=5000, codec="int8"), 500)
    msgs: list[Any] = [ann, cfg, Report(rec, ("eye",), 900, 1100), Evaluation(DEVICE, 0, 0.75, 12),
            Ack(DEVICE, 0, AckReason.MISSING_CHUNKS, "eye", "ab" * 32, (1, 2, 5), "3 missing"),
            Ack(DEVICE, 0, AckReason.REPORT_ACCEPTED), DeviceStatus(DEVICE, DeviceState.ONLINE),
            Fetch(DEVICE, 7, 0, RoundState.OPEN, True, (GlobalWant("eye", "ab" * 32, (0, 1, 2)),))]
    plain = [messages.encode_message(m) for m in msgs]
    signed = [messages.sign_message(ann, FLEET, 7, 0, signer), messages.sign_message(cfg, FLEET, 7, 0, signer)]

    # ---- safejson
    def json_seeds() -> list[bytes]:
        return plain + [b'{"a":[1,2,{"b":"\\\\\\"[{"}],"c":-0.5e3}', b"[" * 17 + b"]" * 17, b'"\\u00e9[\\""',
                        b"1" * 33, b'{"__metadata__":{"format":"fedmfs-model"}}',
                        pl.encode_model(model("eye", 1), pl.ModelHeader(0, "eye", 1))[8:200]]

    def parsed_depth(v: object) -> int:
        depth, stack = 0, [(v, 1)]
        while stack:
            x, d = stack.pop()
            if isinstance(x, dict | list):
                depth = max(depth, d)
                stack += [(y, d + 1) for y in (x.values() if isinstance(x, dict) else x)]
        return depth

    @add("safejson", "fedmfs.core.safejson.loads; json_depth equals the parsed depth of valid JSON",
         (PayloadError,), json_seeds, 4096)
    def t_safejson(data: bytes) -> None:
        try:
            ref = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            ref = None
        else:
            check(safejson.json_depth(data) == parsed_depth(ref),
                  f"json_depth differs from the parsed depth: {safejson.json_depth(data)} != {parsed_depth(ref)}")
        v = safejson.loads(data)
        check(json.dumps(v) == json.dumps(ref), "safejson.loads and json.loads disagree")

    # ---- model payloads
    def payload_seeds() -> list[bytes]:
        return [payload("eye", 1), payload("emg", 2, 3, 400, "fp16"), payload("eye", 3, 1, 7, "int8"),
                pl.encode_model({"w": np.zeros((0, 3), np.float32)}, pl.ModelHeader(0, "m", 1, pl.Codec.INT8))]

    def payload_contract(data: bytes) -> None:
        header, state = pl.decode_model(data)
        check(pl.state_digest(state) == header.sha256, "decoded tensors do not match the header's sha256")
        try:     # the decoder accepts only what the encoder would write
            again = pl.encode_model(state, pl.ModelHeader(header.round, header.modality, header.samples))
        except PayloadError as e:
            raise Contract(f"decode_model accepted a payload encode_model refuses: {e}") from e
        h2, s2 = pl.decode_model(again)
        check((h2.round, h2.modality, h2.samples, h2.sha256) == (header.round, header.modality, header.samples,
                                                                 header.sha256), "re-encoded header differs")

    @add("payload", "fedmfs.core.payload.decode_model on whole payloads", (PayloadError,), payload_seeds, 4096)
    def t_payload(data: bytes) -> None:
        payload_contract(data)

    def rehashed(data: bytes) -> bytes:
        """``data`` with the sha256 in its metadata made right for the tensors safetensors reads from it, so a
        mutated name, dtype or shape reaches the checks behind the digest (unreadable input: as it is)."""
        from safetensors.numpy import load as st_load
        from safetensors.numpy import save as st_save
        try:
            tensors = st_load(data)
            (n,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8:8 + n]).get("__metadata__")
            meta = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
            codec = pl.Codec(meta.get("codec", "fp32"))
            meta["sha256"] = pl.state_digest(pl.dequantise(tensors, codec))
            return bytes(st_save(tensors, metadata=meta))
        except Exception:       # whatever does not rehash is fuzzed as it is
            return data

    @add("payload_rehash", "decode_model on mutated payloads whose sha256 the harness makes right again",
         (PayloadError,), payload_seeds, 4096, JSON_TOKENS + ['"w.__scale__"', ".__scale__", '""', '"head.bias"'])
    def t_payload_rehash(data: bytes) -> None:
        payload_contract(rehashed(data))

    body = payload("eye", 1)
    (n0,) = struct.unpack("<Q", body[:8])
    tensor_bytes = body[8 + n0:]

    def header_seeds() -> list[bytes]:
        out = []
        for p in payload_seeds():
            (n,) = struct.unpack("<Q", p[:8])
            out.append(p[8:8 + n])
        return out

    @add("payload_header", "decode_model with a fuzzed safetensors JSON header (its length prefix kept right) "
         "in front of valid tensor bytes", (PayloadError,), header_seeds, 4096)
    def t_payload_header(data: bytes) -> None:
        payload_contract(struct.pack("<Q", len(data)) + data + tensor_bytes)

    # ---- chunks
    def chunk_seeds() -> list[bytes]:
        return chunks.split_payload(payload("eye", 1), 300)[:2] + chunks.split_payload(b"x" * 10, 4)[-1:] + \
            chunks.split_payload(b"y", 1)

    @add("chunk", "fedmfs.core.wire.chunks.decode_chunk; encode_chunk gives the frame back", (PayloadError,),
         chunk_seeds, 2048)
    def t_chunk(data: bytes) -> None:
        h, d = chunks.decode_chunk(data)
        check(chunks.encode_chunk(h, d) == data, "encode_chunk(decode_chunk(frame)) != frame")

    def reasm_seeds() -> list[bytes]:
        out = []
        for p, cb, order in ((payload("eye", 1), 400, None), (b"abcdefghij", 3, [3, 0, 0, 2, 1, 3]),
                             (b"z" * 5, 5, [0])):
            frames = chunks.split_payload(p, cb)
            out.append(pack([(0, frames[i]) for i in (order if order is not None else range(len(frames)))]))
        out.append(pack([(1, struct.pack(">IIIQ", 1, 2, 3, 6) + hashlib.sha256(b"abcdef").digest() + b"def"),
                         (1, struct.pack(">IIIQ", 0, 2, 3, 6) + hashlib.sha256(b"abcdef").digest() + b"abc")]))
        return out

    @add("reassembler", "Reassembler.add: chunk frames (tag 0, decoded) or raw unchecked headers (tag 1) in any "
         "order; a completed payload matches its sha256 and length", (PayloadError,), reasm_seeds, 8192)
    def t_reassembler(data: bytes) -> None:
        asm = None
        for tag, rec in records(data):
            if tag % 2 == 0:
                h, d = chunks.decode_chunk(rec)
            else:            # an arbitrary header, as a caller that skipped decode_chunk would pass it
                if len(rec) < 52:
                    continue
                i, t, cb, pb = struct.unpack(">IIIQ", rec[:20])
                h, d = chunks.ChunkHeader(i, t, cb, pb, rec[20:52].hex()), rec[52:]
            if asm is None:
                asm = chunks.Reassembler(h)
            res = asm.add(h, d)
            if res.payload is not None:
                check(hashlib.sha256(res.payload).hexdigest() == asm.header.sha256, "sha256")
                check(len(res.payload) == asm.header.payload_bytes, "payload length differs from the header's")
                return
            check(all(0 <= i < asm.header.total for i in res.missing), "missing index out of range")

    # ---- signed frames
    def global_seeds() -> list[bytes]:
        p = payload("eye", 1)
        legacy = signing.encode_global(FLEET, 2, "eye", p, signer, 0)
        legacy = b"FMG\x01" + legacy[4:]
        return [signing.encode_global(FLEET, 0, "eye", p, signer, 7),
                signing.encode_global("other.fleet-1", 12, "emg", payload("emg", 2), signer, 2**40), legacy]

    @add("global", "decode_global without a verifier (the coordinator's own ledger, protocol 1 frames too) and "
         "with one", (PayloadError,), global_seeds, 8192)
    def t_global(data: bytes) -> None:
        try:
            h, p = signing.decode_global(data, None)
        except PayloadError:
            pass
        else:
            check(hashlib.sha256(p).hexdigest() == h.sha256, "global payload sha256")
        h, p = signing.decode_global(data, verifier)
        check(signing.encode_global(h.fleet, h.round, h.modality, p, signer, h.epoch) == data
              or not data.startswith(b"FMG\x02"), "a verified global is not what the coordinator would sign")

    def control_seeds() -> list[bytes]:
        return signed + plain[:2] + [b"FMS\x01" + signed[0][4:]]

    @add("control", "decode_control with and without a verifier, verify_message for round and config",
         (PayloadError,), control_seeds, 4096)
    def t_control(data: bytes) -> None:
        for v in (None, verifier):
            try:
                signing.decode_control(data, v)
            except PayloadError:
                pass
        for kind in (RoundAnnouncement, DeviceConfig):
            try:
                head, msg = messages.verify_message(data, verifier, FLEET, kind)
            except PayloadError:
                continue
            check(isinstance(msg, kind) and head.fleet == FLEET, "verify_message answered another kind or fleet")

    def inner_seeds() -> list[bytes]:
        return [pack([(0, bytes([7, 0])), (0, plain[0])]), pack([(1, bytes([7, 0])), (1, plain[1])])]

    @add("signed_body", "verify_message on a body the harness signs (kind, epoch and round from the first "
         "record): what is inside the signature", (PayloadError,), inner_seeds, 4096)
    def t_signed_body(data: bytes) -> None:
        rs = records(data, 2)
        if len(rs) < 2 or len(rs[0][1]) < 2:
            return
        kind = RoundAnnouncement if rs[0][0] % 2 == 0 else DeviceConfig
        frame = signing.encode_control(FLEET, kind.type, rs[0][1][0], rs[0][1][1], rs[1][1], signer)
        head, msg = messages.verify_message(frame, verifier, FLEET, kind)
        check(messages.decode_message(messages.encode_message(msg), kind) == msg, "message round trip")

    # ---- control messages
    @add("message", "decode_message (any type, then each expected type); decode(encode(msg)) == msg",
         (PayloadError,), lambda: plain + signed, 4096)
    def t_message(data: bytes) -> None:
        try:
            msg: Any = messages.decode_message(data)
        except PayloadError:
            msg = None
        else:
            check(messages.decode_message(messages.encode_message(msg)) == msg, "message round trip")
        for kind in (RoundAnnouncement, DeviceConfig, Report, Evaluation, Ack, DeviceStatus):
            try:
                m = messages.decode_message(data, kind)
            except PayloadError:
                continue
            check(m == msg, "decode_message with expect differs from without")

    # ---- topics
    t = topics.Topics(FLEET)
    topic_seeds = [t.round(), t.global_model("eye"), t.config(DEVICE), t.upload(DEVICE, 12, "emg"), t.report(DEVICE),
                   t.ack("a.b-c_d"), t.status(DEVICE), t.all_uploads()]

    def topic_str(data: bytes) -> str:
        return data.decode("utf-8", "surrogateescape")

    @add("topic", "parse_topic; the parsed topic is rebuilt by Topics", (PayloadError,),
         lambda: [s.encode() for s in topic_seeds], 1024, ["/", "+", "#", "\xc2\xb2", "\xd9\xa1", "0", "00", "\x00",
                                                           "upload", "device", "global", "fedmfs/v1/"])
    def t_topic(data: bytes) -> None:
        text = topic_str(data)
        p: Any = topics.parse_topic(text)
        tt, K = topics.Topics(p.fleet), topics.TopicKind
        rebuilt = {K.ROUND: lambda: tt.round(), K.GLOBAL: lambda: tt.global_model(p.modality),
                   K.UPLOAD: lambda: tt.upload(p.device, p.round, p.modality), K.CONFIG: lambda: tt.config(p.device),
                   K.REPORT: lambda: tt.report(p.device), K.ACK: lambda: tt.ack(p.device),
                   K.STATUS: lambda: tt.status(p.device)}.get(p.kind)
        if rebuilt is not None:    # (kinds added since are checked by the parse alone)
            check(rebuilt() == text, f"parse_topic takes a topic Topics spells otherwise: {text!r} -> {rebuilt()!r}")

    # ---- data files
    scratch = env.scratch = Path(tempfile.mkdtemp(prefix=f"fedmfs-fuzz-{os.getpid()}-", dir=SCRATCH))

    def client(seed: int = 0, n: int = 6) -> format.ClientData:
        rng = np.random.default_rng(seed)
        return format.ClientData("c0", {"eye": rng.standard_normal((n, 5, 2)).astype(np.float32),
                                        "emg": rng.standard_normal((n, 5, 4)).astype(np.float32)},
                                 rng.integers(0, 3, n).astype(np.int64), np.arange(n) % 3 != 0)

    def npz_bytes(c: format.ClientData, compressed: bool = False) -> bytes:
        buf = io.BytesIO()
        arrays = {**{f"x_{k}": v for k, v in c.x.items()}, "y": c.y, "train": c.train}
        save: Any = np.savez_compressed if compressed else np.savez
        save(buf, **arrays)
        return buf.getvalue()

    def npz_seeds() -> list[bytes]:
        c = client()
        one = format.ClientData("c1", {"eye": c.x["eye"][:2]}, c.y[:2], c.train[:2])
        return [npz_bytes(c), npz_bytes(c, True), npz_bytes(one)]

    npz_path = scratch / "c0.npz"

    @add("npz", "format.load_client on a client's .npz file", (DataError,), npz_seeds, 16384, NPY_TOKENS)
    def t_npz(data: bytes) -> None:
        npz_path.write_bytes(data)
        c = format.load_client(npz_path, spec)
        check(len(c) == c.train.shape[0] and set(c.x) <= set(spec.names), "a loaded client breaks its spec")

    fleet_dir = scratch / "fleet"
    fleet_dir.mkdir()
    format.save_fleet(format.Fleet(spec, [client()]), fleet_dir)
    fleet_json = (fleet_dir / "fleet.json").read_bytes()

    @add("fleet_json", "format.load_fleet with a fuzzed fleet.json (and one valid client file)", (DataError,),
         lambda: [fleet_json, json.dumps(json.loads(fleet_json)).encode()], 4096)
    def t_fleet_json(data: bytes) -> None:
        (fleet_dir / "fleet.json").write_bytes(data)
        f = format.load_fleet(fleet_dir)
        check(all(len(c) >= 0 for c in f.clients), "fleet")

    text_path = scratch / "matrix.txt"

    @add("text_matrix", "ucihar.read_text_matrix (any width, then 3 columns) and the activity labels reader",
         (DataError,), lambda: [b"1 2 3\n4 5 6\n", b"  1.0e+00 -2.5e-01 nan\n\n7 8 inf\n", b"1 WALKING\n2 UP\n"],
         2048, TEXT_TOKENS)
    def t_text_matrix(data: bytes) -> None:
        text_path.write_bytes(data)
        (scratch / "activity_labels.txt").write_bytes(data)
        ucihar._class_names(scratch)
        for cols in (None, 3):
            try:
                a = ucihar.read_text_matrix(text_path, cols)
            except DataError:
                continue
            check(a.ndim == 2 and a.dtype == np.float64 and (cols is None or a.shape[1] == cols), "matrix shape")

    uci_root = scratch / "uci"

    def uci_seeds() -> list[bytes]:
        return [pack([(0, b"1\n2\n6\n"), (1, b"1\n1\n3\n")]), pack([(0, b"5\n"), (1, b"30\n")])]

    @add("ucihar", "load_uci_har on a tree whose y_ and subject_ files are fuzzed (signals valid, as many rows "
         "as the labels file has lines)", (DataError,), uci_seeds, 1024, TEXT_TOKENS)
    def t_ucihar(data: bytes) -> None:
        rs = dict(records(data, 2))
        shutil.rmtree(uci_root, ignore_errors=True)
        d = uci_root / "train"
        (d / "Inertial Signals").mkdir(parents=True)
        ytext, stext = rs.get(0, b""), rs.get(1, b"")
        (d / "y_train.txt").write_bytes(ytext)
        (d / "subject_train.txt").write_bytes(stext)
        rows = max(1, min(64, len([ln for ln in ytext.splitlines() if ln.split()])))
        line = (" ".join(["0.5"] * 128) + "\n").encode() * rows
        for sig in ("body_acc", "body_gyro", "total_acc"):
            for ax in "xyz":
                (d / "Inertial Signals" / f"{sig}_{ax}_train.txt").write_bytes(line)
        f = ucihar.load_uci_har(uci_root, parts=("train",))
        check(all(c.y.min() >= 0 and c.y.max() < 6 for c in f.clients), "labels outside 0..5")

    h5_path = scratch / "as.hdf5"

    @add("actionsense", "load_actionsense_hdf5 on HDF5 files the fuzzer builds (which datasets exist, their "
         "shapes, dtypes and values, the activities attribute, steps)", (DataError,),
         lambda: [bytes(range(256)) * 2, b"\x01" * 200, b"\xff" * 300], 1024)
    def t_actionsense(data: bytes) -> None:
        import atheris  # the FuzzedDataProvider; the hypothesis tests build these files themselves
        fdp = atheris.FuzzedDataProvider(data)
        try:
            write_h5(fdp)
        except (ValueError, TypeError, OSError):    # h5py could not write what was drawn: not a file to test
            return
        steps = fdp.PickValueInList([None, 1, 2, 5, 100])
        mods = fdp.PickValueInList([None, ("eye",), ("eye", "tactile_left"), ("xsens", "emg_right")])
        subjects = fdp.PickValueInList([None, ["S00"], ["S01", "S00"], []])
        f = actionsense.load_actionsense_hdf5(h5_path, subjects, steps, 0.8, 0, modalities=mods)
        check(all(len(c) > 0 for c in f.clients), "a client without windows")

    def write_h5(fdp: Any) -> None:
        import h5py
        n = fdp.ConsumeIntInRange(0, 7)
        t = fdp.ConsumeIntInRange(0, 6)
        dtypes = [np.float32, np.float64, np.int64, np.int8, np.bool_, "S3", np.complex64]

        def arr(shape: tuple[int, ...]) -> np.ndarray:
            dt = fdp.PickValueInList(dtypes)
            vals = [fdp.ConsumeFloatInRange(-3.0, 3.0) if fdp.ConsumeBool() else
                    fdp.PickValueInList([0.0, 1.0, float("nan"), float("inf"), 1e300]) for _ in range(int(np.prod(shape)))]
            a = np.array(vals, dtype=np.float64).reshape(shape)
            if dt == "S3":
                return np.array([str(v)[:3] for v in a.reshape(-1)], dtype="S3").reshape(shape)
            with np.errstate(all="ignore"):
                return a.astype(dt)

        with h5py.File(h5_path, "w") as f:
            if fdp.ConsumeIntInRange(0, 9):
                f["example_label_indexes"] = arr((fdp.PickValueInList([n, n, n + 1]),))
            if fdp.ConsumeIntInRange(0, 9):
                ids = [fdp.PickValueInList([b"S00", b"S01", b"S0 bad", b"", b"-x", "\u00e9t\u00e9".encode(), b"S\xff"])
                       for _ in range(n)]
                f["example_subject_ids"] = np.array(ids, dtype="S8")
            if fdp.ConsumeBool():
                f["example_labels"] = np.array([b"act"] * n, dtype="S3")
            a = fdp.ConsumeIntInRange(0, 4)
            if a == 1:
                f.attrs["activities_to_classify"] = repr(["None", "a", "b", "c"][:fdp.ConsumeIntInRange(0, 4)])
            elif a == 2:
                f.attrs["activities_to_classify"] = fdp.ConsumeUnicodeNoSurrogates(12)
            elif a == 3:
                f.attrs["activities_to_classify"] = np.arange(fdp.ConsumeIntInRange(0, 3))
            elif a == 4:
                f.attrs["activities_to_classify"] = fdp.ConsumeBytes(6)
            if fdp.ConsumeIntInRange(0, 3) == 0:
                width = fdp.PickValueInList([2 + 8 + 8 + 66 + 2 * 4, 2 + 8 + 8 + 66 + 2 * 9, 90, 1])
                f["example_matrices"] = arr((n, t, width)) if fdp.ConsumeBool() else arr((n, width))
            else:
                for m, name in actionsense.STREAMS.items():
                    if fdp.ConsumeIntInRange(0, 5) == 0:
                        continue
                    raw = {"tactile_left": (2, 2), "tactile_right": (2, 2), "xsens": (22, 3)}.get(m, (2,))
                    shape = fdp.PickValueInList([(n, t, *raw), (n, t, *raw), (n, t), (n, t, 3), (n, 1, *raw),
                                                 (n + 1, t, *raw)])
                    f[name] = arr(shape)
            if fdp.ConsumeIntInRange(0, 9) == 0:       # a group where a dataset belongs
                name = fdp.PickValueInList(["example_label_indexes", "example_subject_ids", "example_labels",
                                            "example_matrices", *actionsense.STREAMS.values()])
                if name not in f:
                    f.create_group(name)

    # ---- the coordinator's round machine
    def coordinator_seeds() -> list[bytes]:
        def up(dev: int, mod: int, p: bytes, cb: int = 300, order: int = 0, drop: int = 0) -> tuple[int, bytes]:
            return 1, bytes([dev, 0, mod]) + cb.to_bytes(2, "big") + bytes([order, drop]) + p

        rep = [messages.encode_message(Report(RoundRecord(d, r, 10, {"eye": 1.0}, {"eye": 1}, {"eye": 1.0},
                                                          ("eye",)))) for r in (0, 1) for d in ("a", "b", "c")]
        ev = messages.encode_message(Evaluation("a", 0, 0.5, 3))
        st = messages.encode_message(DeviceStatus("a", DeviceState.OFFLINE))
        g_eye = hashlib.sha256(pl.encode_model(model("eye", 100), pl.ModelHeader(0, "eye", 1))).hexdigest()
        fe = messages.encode_message(Fetch("a", 7, 0, RoundState.OPEN, True, (GlobalWant("eye", g_eye, (0, 1, 63)),)))
        frames = chunks.split_payload(payload("eye", 1), 300)
        round1 = [up(i, 0, payload("eye", 5 + i, 1, 20)) for i in range(3)]
        return [
            pack([(0, bytes([0, 0, 0]) + frames[0]), up(0, 0, payload("eye", 1)), up(1, 1, payload("emg", 2), 250, 3, 1),
                  (2, bytes([0]) + rep[0])]),
            pack([up(0, 0, payload("eye", 1)), up(1, 0, payload("eye", 2, samples=99999)),
                  up(2, 1, payload("emg", 3, codec="int8")), (2, bytes([0]) + rep[0]), (2, bytes([1]) + rep[1]),
                  (2, bytes([2]) + rep[2]), *round1, (2, bytes([0]) + ev), (3, bytes([0]) + st), (4, b"\x10\x00")]),
            pack([up(1, 0, payload("eye", 9) * 2), up(3, 2, b"junk"), (5, b"\x02"), up(0, 0, payload("eye", 1)),
                  (4, b"\xff\xff"), (2, bytes([1]) + rep[4])]),
            pack([(6, bytes([0]) + fe), (6, bytes([1]) + fe), (6, bytes([3]) + fe), up(0, 0, payload("eye", 1)),
                  (6, bytes([0]) + fe), (4, b"\x00\x20")]),
        ]

    devices = ("a", "b", "c", "zz", "A-1")

    def coordinator(variant: int) -> cm.CoordinatorMachine:
        rule = ("weighted_mean", "trimmed_mean", "median")[variant % 3]
        ratio = float("inf") if variant & 4 else 1.0
        devs = (DeviceConfig("a", SelectionPolicy(gamma=1)), DeviceConfig("b", SelectionPolicy(cap_bytes=3000), 50),
                DeviceConfig("c", SelectionPolicy(codec="int8")))
        m = cm.CoordinatorMachine(FLEET, spec, devs, cm.RoundPolicy(2, 60.0, 2, 300, rule, ratio), signer, 7)
        m.seed_globals({n: model(n, 100 + i) for i, n in enumerate(spec.names)})
        m.handle(cm.Start(now=1000.0))
        return m

    @add("coordinator", "CoordinatorMachine.handle on sequences of chunk frames (tag 0), uploads the harness "
         "splits in a fuzzed order (1), reports (2), statuses (3), ticks (4), fetches (6); never raises, caps hold",
         (), coordinator_seeds, 16384)
    def t_coordinator(data: bytes) -> None:
        rs = records(data)
        m = coordinator(rs[-1][1][0] if rs and rs[-1][0] == 5 and rs[-1][1] else 0)
        now = 1001.0
        for tag, r in rs:
            if len(r) < 1:
                continue
            dev = devices[r[0] % len(devices)]
            events: list[Any] = []
            if tag == 0 and len(r) >= 3:
                events = [cm.ChunkArrived(dev, r[1], mods[r[2] % 3], r[3:], now)]
            elif tag == 1 and len(r) >= 7:
                cb = max(1, int.from_bytes(r[3:5], "big"))
                try:
                    frames = chunks.split_payload(r[7:], cb)
                except PayloadError:
                    frames = []
                order = list(range(len(frames)))
                rng = np.random.default_rng(r[5])
                if r[5]:
                    rng.shuffle(order)
                if r[6]:    # drop some, send the last one twice (the device's probe)
                    order = [i for i in order if not (i * 7 + r[6]) % 3 == 0] + order[-1:]
                events = [cm.ChunkArrived(dev, r[1], mods[r[2] % 3], frames[i], now) for i in order[:600]]
            elif tag == 2:
                events = [cm.ReportArrived(dev, r[1:], now)]
            elif tag == 3:
                events = [cm.StatusArrived(dev, r[1:], now)]
            elif tag == 6:
                events = [cm.FetchArrived(dev, r[1:], now)]
            elif tag == 4:
                now += int.from_bytes(r[:2], "big") / 10
                events = [cm.Tick(now)]
            for ev in events:
                m.handle(ev)
                for d, c in m.caps.items():
                    check(c is None or m.used.get(d, 0) <= c, f"a cap is exceeded: device {d} used {m.used.get(d)} > {c}")

    # ---- the edge: decode_inbound, verify_global and the machine
    def edge_seeds() -> list[bytes]:
        def topic(tp: str, p: bytes) -> tuple[int, bytes]:
            return 0, bytes([len(tp)]) + tp.encode() + p

        e_ann = RoundAnnouncement(FLEET, 1, RoundState.OPEN, 1600.0, 3, (DEVICE,), {}, 200)
        e_cfg = DeviceConfig(DEVICE, SelectionPolicy(gamma=1), 100)
        ack = messages.encode_message(Ack(DEVICE, 1, AckReason.ROUND_CLOSED))
        return [
            pack([topic(t.round(), signed[0]), topic(t.config(DEVICE), signed[1]),
                  topic(t.global_model("eye"), global_seeds()[0]), topic(t.ack(DEVICE), ack), (4, b"\x00\x10")]),
            pack([(1, bytes([7, 1]) + messages.encode_message(e_ann)), (2, bytes([7, 1]) + messages.encode_message(e_cfg)),
                  (3, bytes([7, 1, 0]) + payload("eye", 4, 1)), (3, bytes([6, 9, 1]) + payload("emg", 4, 9)),
                  (1, bytes([7, 0]) + messages.encode_message(ann)), topic(t.ack(DEVICE), ack)]),
            pack([topic(t.state(DEVICE), signed[0]), topic(t.state(DEVICE), signed[1]),
                  *[topic(t.device_global(DEVICE, "eye"), f) for f in chunks.split_payload(global_seeds()[0], 97)],
                  (4, b"\x00\x10")]),
        ]

    @add("edge", "edge decode_inbound + verify_global on topic/payload records (tag 0) and on bodies the harness "
         "signs: round (1), config (2), global payload (3); ticks (4); the events go through EdgeMachine.handle",
         (), edge_seeds, 16384)
    def t_edge(data: bytes) -> None:
        mach = em.EdgeMachine(DEVICE, FLEET)
        now = 2000.0
        for tag, r in records(data):
            topic, body = None, b""
            if tag == 0 and r:
                n = r[0]
                topic, body = r[1:1 + n].decode("utf-8", "surrogateescape"), r[1 + n:]
            elif tag in (1, 2) and len(r) >= 2:
                kind = "round" if tag == 1 else "config"
                topic = t.round() if tag == 1 else t.config(DEVICE)
                body = signing.encode_control(FLEET, kind, r[0], r[1], r[2:], signer)
            elif tag == 3 and len(r) >= 3:
                mod = mods[r[2] % 3]
                topic, body = f"{t.base}/global/{mod}", signing.encode_global(FLEET, r[1], mod, r[3:], signer, r[0])
            elif tag == 4:
                now += int.from_bytes(r[:2], "big")
                mach.handle(em.Tick(now))
                continue
            if topic is None:
                continue
            try:
                ev = em.decode_inbound(topic, body, DEVICE, now, verifier)
                if isinstance(ev, em.GlobalFrame):
                    ev = em.verify_global(ev.frame, verifier, FLEET, now=now)
            except PayloadError:
                continue
            if ev is not None:
                mach.handle(ev)

    return env


# ------------------------------------------------------------------------------------------ the child

def _signature(e: BaseException) -> str:
    """Exception type + the innermost frame in the project (or the harness for a Contract)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = "?"
    for f in frames:
        if f.filename.startswith(PROJECT_DIRS) or (isinstance(e, Contract) and f.filename == __file__):
            where = f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}"
    if isinstance(e, Contract):     # the kind of wrong answer: what its message says before the first colon
        return f"Contract@{where}: {str(e).split(':', 1)[0][:80]}"
    return f"{type(e).__name__}@{where}"


class Runner:
    """Runs one target's inputs, keeps counts and the first input of every distinct crash."""

    def __init__(self, target: Target, out: Path, runs: int, stop_on_crash: bool, cleanup: list[Path]):
        self.t, self.out, self.runs, self.stop, self.cleanup = target, out, runs, stop_on_crash, cleanup
        self.count, self.slowest, self.slowest_input, self.started = 0, 0.0, b"", time.monotonic()
        self.crashes: dict[str, int] = {}
        self.last_write = 0.0
        out.mkdir(parents=True, exist_ok=True)

    def one(self, data: bytes) -> None:
        t0 = time.perf_counter()
        try:
            self.t.run(data)
        except self.t.allowed:
            pass
        except Exception as e:      # anything else is the finding (MemoryError and RecursionError too)
            self._crash(_signature(e), data, "".join(traceback.format_exception(e)))
            if self.stop:
                raise
        dt = time.perf_counter() - t0
        if dt > SLOW_SECONDS:
            self._crash(f"slow@{self.t.name}", data, f"one input took {dt:.2f} s\n")
        if dt > self.slowest:     # kept, so a slow input can be replayed (--replay) on a quiet machine
            self.slowest, self.slowest_input = dt, data
        self.count += 1
        if self.count >= self.runs:
            self.write(final=True)
            for p in self.cleanup:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            os._exit(0)     # libFuzzer would go on: its own run count includes what it replays
        if time.monotonic() - self.last_write > 5:
            self.write()

    def _crash(self, sig: str, data: bytes, text: str) -> None:
        self.crashes[sig] = self.crashes.get(sig, 0) + 1
        if self.crashes[sig] == 1:
            h = hashlib.sha1(sig.encode()).hexdigest()[:10]
            (self.out / f"crash-{h}.bin").write_bytes(data)
            (self.out / f"crash-{h}.txt").write_text(f"{sig}\n\n{text}\ninput ({len(data)} bytes): {data[:4096].hex()}\n")

    def write(self, final: bool = False) -> None:
        self.last_write = time.monotonic()
        elapsed = self.last_write - self.started
        stats = {"target": self.t.name, "inputs": self.count, "seconds": round(elapsed, 1),
                 "execs_per_s": round(self.count / elapsed, 1) if elapsed else 0.0, "slowest_s": round(self.slowest, 3),
                 "crashes": self.crashes, "final": final}
        (self.out / "stats.json").write_text(json.dumps(stats, indent=1))
        (self.out / "slowest.bin").write_bytes(self.slowest_input)


def child(name: str, runs: int, out: Path, seed: int, timeout: int, rss_mb: int, stop: bool) -> None:
    import atheris

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    with atheris.instrument_imports(include=["fedmfs"]):
        env = build()
    target = env.targets[name]
    corpus = Path(tempfile.mkdtemp(prefix=f"fedmfs-corpus-{name}-", dir=SCRATCH))
    for i, s in enumerate(target.seeds()):
        (corpus / f"seed-{i}").write_bytes(s)
    dict_file = corpus.with_suffix(".dict")      # beside the corpus: every file in it is an input
    runner = Runner(target, out / name, runs, stop, [p for p in (env.scratch, corpus, dict_file) if p is not None])
    dict_file.write_text("".join('"' + "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\x{ord(c):02X}"
                                                   for c in t) + '"\n' for t in target.tokens))
    args = [sys.argv[0], str(corpus), f"-seed={seed}", f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}",
            f"-max_len={target.max_len}", f"-runs={2 * runs + 1000}", f"-artifact_prefix={out / name}/",
            "-print_final_stats=0"] + ([f"-dict={dict_file}"] if target.tokens else [])
    atheris.Setup(args, runner.one)
    atheris.Fuzz()


# ------------------------------------------------------------------------------------------ the parent

def run_target(name: str, a: argparse.Namespace) -> dict:
    out = Path(a.out)
    stats_file = out / name / "stats.json"
    stats_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--runs", str(a.runs), "--out", str(out), "--seed", str(a.seed),
           "--timeout", str(a.timeout), "--rss-mb", str(a.rss_mb)] + (["--stop-on-crash"] if a.stop_on_crash else [])
    log_path = out / name / "libfuzzer.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    stats: dict[str, Any] = (json.loads(stats_file.read_text()) if stats_file.exists()
                             else {"target": name, "inputs": 0, "crashes": {}})
    stats["exit_code"] = rc
    if rc != 0 or not stats.get("final"):
        stats["crashes"][f"libFuzzer stop (exit {rc}: a hang, memory or a crash outside Python; see {log_path})"] = 1
    return stats


def summary_line(s: dict) -> str:
    return (f"{s['target']:<15} inputs {s.get('inputs', 0):>9,}  distinct crashes {len(s['crashes']):>2}  "
            f"{s.get('execs_per_s', 0):>8,.0f} execs/s  slowest {s.get('slowest_s', 0):.3f} s")


def replay(name: str, files: list[str]) -> int:
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    env = build()
    target = env.targets[name]
    bad = 0
    for f in files:
        t0 = time.perf_counter()
        try:
            target.run(Path(f).read_bytes())
            print(f"{f}: parsed in {time.perf_counter() - t0:.3f} s")
        except target.allowed as e:
            print(f"{f}: refused in {time.perf_counter() - t0:.3f} s ({type(e).__name__}: {str(e)[:100]})")
        except Exception as e:
            bad += 1
            print(f"{f}: CRASH {_signature(e)}")
            traceback.print_exception(e)
    if env.scratch is not None:
        shutil.rmtree(env.scratch, ignore_errors=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help="target names, or 'all'")
    ap.add_argument("--runs", type=int, default=10_000, help="inputs per target (default 10000)")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "fedmfs-fuzz"),
                    help="crash inputs, libFuzzer logs, stats and the slowest input of each target")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    ap.add_argument("--timeout", type=int, default=20, help="seconds one input may take before libFuzzer stops")
    ap.add_argument("--rss-mb", type=int, default=3072, help="memory limit of a target process")
    ap.add_argument("--stop-on-crash", action="store_true", help="stop a target at its first crash")
    ap.add_argument("--summary", help="also write the summary as JSON to this file")
    ap.add_argument("--list", action="store_true", help="list the targets")
    ap.add_argument("--replay", nargs="+", metavar=("TARGET", "FILE"), help="run saved inputs through a target")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.runs, Path(a.out), a.seed, a.timeout, a.rss_mb, a.stop_on_crash)
        return 0
    if a.replay:
        return replay(a.replay[0], a.replay[1:])
    env = build()
    if env.scratch is not None:
        shutil.rmtree(env.scratch, ignore_errors=True)
    if a.list or not a.targets:
        for t in env.targets.values():
            print(f"{t.name:<15} {t.doc}")
        return 0
    names = list(env.targets) if a.targets == ["all"] else a.targets
    unknown = [n for n in names if n not in env.targets]
    if unknown:
        ap.error(f"unknown targets {unknown}; --list shows them")
    results = []
    for n in names:
        s = run_target(n, a)
        results.append(s)
        print(summary_line(s), flush=True)
        for sig, count in s["crashes"].items():
            print(f"    {count:>7} x {sig}")
    total = sum(s.get("inputs", 0) for s in results)
    print(f"{'total':<15} inputs {total:>9,}  distinct crashes {sum(len(s['crashes']) for s in results):>2}")
    if a.summary:
        Path(a.summary).write_text(json.dumps(results, indent=1))
    return 1 if any(s["crashes"] for s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
