"""Minimal reproducers of what fuzzing found (bench/fuzz.py, tests/fuzz/test_parsers_fuzz.py; the list and
the fixes: docs/reliability.md, "Fuzzing"). Each failed before its fix.

The defects first reported in other modules (the wire's chunk reassembly and topic parser, fsio's spec
documents) are fixed too; their reproducers are plain tests now.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest

from fedmfs.core.data.format import ClientData, Fleet, load_client, load_fleet, save_fleet
from fedmfs.core.errors import DataError, PayloadError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.wire import ChunkHeader, Reassembler, parse_topic

SPEC = DatasetSpec((ModalitySpec("eye", (2,), hidden=3),), 3, 5)


# ------------------------------------------------------------------------------------------- ActionSense

def _h5(tmp_path, labels, ids, *, example_labels=None, activities=None, stream=None):
    h5py = pytest.importorskip("h5py")
    from fedmfs.core.data.actionsense import STREAMS
    p = tmp_path / "a.hdf5"
    n = len(labels)
    with h5py.File(p, "w") as f:
        f["example_label_indexes"] = np.array(labels, np.int64)
        f["example_subject_ids"] = np.array(ids, "S8")
        if example_labels is not None:
            f["example_labels"] = np.array(example_labels, "S8")
        if activities is not None:
            f.attrs["activities_to_classify"] = activities
        for m, name in STREAMS.items():
            shape = {"tactile_left": (2, 2), "tactile_right": (2, 2), "xsens": (22, 3)}.get(m, (2,))
            f[name] = stream if stream is not None else np.ones((n, 3, *shape), np.float32)
    return p


def test_actionsense_example_labels_shorter_than_the_labels(tmp_path):
    """Was IndexError (boolean index did not match) in _labels."""
    from fedmfs.core.data.actionsense import load_actionsense_hdf5
    p = _h5(tmp_path, [0, 1], [b"S00", b"S00"], example_labels=[b"a"])
    with pytest.raises(DataError, match="example_labels has 1 rows"):
        load_actionsense_hdf5(p, steps=None)


def test_actionsense_a_single_class(tmp_path):
    """Was ValueError('num_classes must be >= 2') from DatasetSpec."""
    from fedmfs.core.data.actionsense import load_actionsense_hdf5
    p = _h5(tmp_path, [0, 0], [b"S00", b"S00"])
    with pytest.raises(DataError, match="at least 2"):
        load_actionsense_hdf5(p, steps=None)


@pytest.mark.parametrize("activities", ["{[1]: 2}", "'abc'", np.int64(5), np.bytes_(b"\xff\xfe")])
def test_actionsense_activities_attribute_not_a_list(tmp_path, activities):
    """Were TypeError (literal_eval of an unhashable key, list() of a scalar) and UnicodeDecodeError; a
    string was split into one class name per character."""
    from fedmfs.core.data.actionsense import load_actionsense_hdf5
    p = _h5(tmp_path, [1, 2], [b"S00", b"S00"], activities=activities)
    with pytest.raises(DataError, match="activities_to_classify"):
        load_actionsense_hdf5(p, steps=None)


def test_actionsense_subject_id_not_utf8(tmp_path):
    """Was UnicodeDecodeError."""
    from fedmfs.core.data.actionsense import load_actionsense_hdf5
    p = _h5(tmp_path, [0, 1], [b"S\xff", b"S\xff"])
    with pytest.raises(DataError, match="not UTF-8"):
        load_actionsense_hdf5(p, steps=None)


def test_actionsense_stream_of_strings(tmp_path):
    """Was ValueError (could not convert string to float) from numpy."""
    from fedmfs.core.data.actionsense import load_actionsense_hdf5
    p = _h5(tmp_path, [0, 1], [b"S00", b"S00"], stream=np.full((2, 3, 2), b"ab", "S2"))
    with pytest.raises(DataError, match="must hold numbers"):
        load_actionsense_hdf5(p, steps=None, modalities=("eye",))


def test_actionsense_group_where_a_dataset_belongs(tmp_path):
    """Was TypeError from h5py (a group indexed with ())."""
    h5py = pytest.importorskip("h5py")
    from fedmfs.core.data.actionsense import load_actionsense_hdf5
    p = tmp_path / "a.hdf5"
    with h5py.File(p, "w") as f:
        f.create_group("example_label_indexes")
        f["example_subject_ids"] = np.array([b"S00"], "S8")
    with pytest.raises(DataError, match="must be a dataset"):
        load_actionsense_hdf5(p)


# ------------------------------------------------------------------------------------------- .npz files

def _npz(compressed: bool = False, **arrays) -> bytes:
    rng = np.random.default_rng(0)
    arrays = arrays or {"x_eye": rng.standard_normal((3, 5, 2)).astype(np.float32), "y": np.array([0, 1, 2]),
                        "train": np.array([True, False, True])}
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _npy(header: bytes, body: bytes = b"\0" * 64) -> bytes:
    """A version 1.0 .npy file with ``header`` as its (unchecked) header text."""
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


def _zip(member: bytes, name: str = "y.npy") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, member)
    return buf.getvalue()


def _members(members: dict) -> bytes:
    """A zip of .npy members (arrays) and other members (bytes), as numpy.savez lays them out."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, v in members.items():
            if isinstance(v, np.ndarray):
                npy = io.BytesIO()
                np.save(npy, v)
                v = npy.getvalue()
            z.writestr(name, v)
    return buf.getvalue()


def _patched(data: bytes, signature: bytes, offset: int, value: bytes) -> bytes:
    """``value`` written at ``offset`` into every zip record that starts with ``signature``."""
    out, i = bytearray(data), data.find(signature)
    while i >= 0:
        out[i + offset:i + offset + len(value)] = value
        i = data.find(signature, i + 1)
    return bytes(out)


def _deflate_damaged() -> bytes:
    data = bytearray(_npz(compressed=True))
    start = 30 + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
    data[start:start + 4] = b"\xff" * 4       # a reserved deflate block type
    return bytes(data)


NPZ_CASES = {   # what escaped load_client before, as the exception that escaped
    "BadZipFile": lambda: _npz()[:300],                                                  # a truncated copy
    "zlib.error": _deflate_damaged,
    "NotImplementedError-method": lambda: _patched(_patched(_npz(), b"PK\x03\x04", 8, b"\x63\x00"),
                                                   b"PK\x01\x02", 10, b"\x63\x00"),       # compression method 99
    "NotImplementedError-version": lambda: _patched(_npz(), b"PK\x01\x02", 6, b"\x6d\x00"),   # zip version 10.9
    "TokenError": lambda: _npy(b"'''"),                                          # numpy tokenizes a 1.0 header
    "IndentationError": lambda: _npy(b"  x\n y"),
    "TypeError": lambda: _zip(_npy(b"{[1]: 2}")),                                # literal_eval: unhashable key
    "MemoryError": lambda: _zip(_npy(b"{'descr': '<f8', 'fortran_order': False, 'shape': (10**12,), }"
                                     .replace(b"10**12", b"1000000000000"))),    # 7.3 TiB claimed
    "AttributeError": lambda: _members({"x_eye.npy": np.zeros((3, 5, 2), np.float32), "y.npy": np.arange(3),
                                        "train.npy": b"not an array"}),    # numpy returns train's raw bytes
    "RuntimeError": lambda: _patched(_npz(), b"PK\x01\x02", 8, b"\x01\x00"),   # flagged encrypted: "password required"
    "ValueError-y": lambda: _npz(x_eye=np.zeros((3, 5, 2), np.float32), y=np.array(["a", "b", "c"]),
                                 train=np.ones(3, bool)),                         # y of strings (astype)
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_a_damaged_npz_is_a_data_error(tmp_path, case):
    p = tmp_path / "c0.npz"
    p.write_bytes(NPZ_CASES[case]())
    with pytest.raises(DataError):
        load_client(p, SPEC)


def test_a_valid_npz_still_loads(tmp_path):
    p = tmp_path / "c0.npz"
    for compressed in (False, True):
        p.write_bytes(_npz(compressed))
        c = load_client(p, SPEC)
        assert c.x["eye"].shape == (3, 5, 2) and c.y.tolist() == [0, 1, 2] and c.n_train == 2


# ------------------------------------------------------------------------------------------------ UCI HAR

def test_uci_har_subject_id_too_large_for_an_integer(tmp_path):
    """Was ValueError ("expected non-negative integer") from numpy's random generator: 1e300 passed the
    whole-number check and became a negative int64 seed."""
    from fedmfs.core.data.ucihar import load_uci_har
    d = tmp_path / "train"
    (d / "Inertial Signals").mkdir(parents=True)
    (d / "y_train.txt").write_text("1\n2\n")
    (d / "subject_train.txt").write_text("1e300\n1e300\n")
    for sig in ("body_acc", "body_gyro", "total_acc"):
        for ax in "xyz":
            (d / "Inertial Signals" / f"{sig}_{ax}_train.txt").write_text((" 0.5" * 128 + "\n") * 2)
    with pytest.raises(DataError, match="below 2"):
        load_uci_har(tmp_path, parts=("train",))


# ------------------------------------------------------------------------------------------ model payloads

def _payload(tensors: dict, codec: str = "fp32") -> bytes:
    """A payload with a right sha256 around any tensors (what encode_model would refuse to write)."""
    from safetensors.numpy import save as st_save

    from fedmfs.core.payload import Codec, dequantise, state_digest
    meta = {"format": "fedmfs-model", "version": "1", "round": "0", "modality": "eye", "samples": "1",
            "codec": codec, "sha256": state_digest(dequantise(tensors, Codec(codec)))}
    return st_save(tensors, metadata=meta)


PAYLOAD_CASES = {
    "no tensors": ({}, "fp32"),
    "an empty name": ({"": np.ones(2, np.float32)}, "fp32"),
    "a scale name in fp32, float64": ({"w": np.ones(2, np.float32), "w.__scale__": np.ones(3)}, "fp32"),
    "an int8 scale without its tensor": ({"w": np.ones(2, np.int8), "w.__scale__": np.ones(1, np.float32),
                                          "v.__scale__": np.ones(1, np.float32)}, "int8"),
    "an int8 scale of float64": ({"w": np.ones(2, np.int8), "w.__scale__": np.ones(1)}, "int8"),
}


@pytest.mark.parametrize("case", sorted(PAYLOAD_CASES))
def test_decode_model_takes_only_what_encode_model_writes(case):
    """Each was decoded (the encoder refuses the first three; the last two were dropped or widened
    silently), found by the round-trip contract of bench/fuzz.py's payload targets."""
    from fedmfs.core.payload import decode_model
    tensors, codec = PAYLOAD_CASES[case]
    with pytest.raises(PayloadError):
        decode_model(_payload(tensors, codec))


def test_every_codec_still_decodes():
    from fedmfs.core.payload import Codec, ModelHeader, decode_model, encode_model
    st = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0, 3), np.float32)}
    for codec in Codec:
        h, out = decode_model(encode_model(st, ModelHeader(2, "eye", 9, codec)))
        assert (h.round, h.samples, h.codec, sorted(out)) == (2, 9, codec, ["b", "w"])
        np.testing.assert_allclose(out["w"], st["w"], atol=0.03)


# ------------------------------------------------------- reported, not fixed here (the owners' modules)

def _fleet_dir(tmp_path, text: str):
    rng = np.random.default_rng(0)
    save_fleet(Fleet(SPEC, [ClientData("c0", {"eye": rng.standard_normal((3, 5, 2)).astype(np.float32)},
                                       np.array([0, 1, 2]), np.array([True, False, True]))]), tmp_path)
    (tmp_path / "fleet.json").write_text(text)
    return tmp_path


def _fleet_json(**spec_changes) -> str:
    return json.dumps({"format": "fedmfs-fleet", "version": 1, "spec": {**SPEC.to_dict(), **spec_changes},
                       "clients": ["c0"], "metadata": {}})


@pytest.mark.parametrize(("text", "escaped"), [
    ('{"format": "fedmfs-fleet", "version": 1, "spec": ' + "[" * 5000 + "]" * 5000 + "}", RecursionError),
    ('{"format": "fedmfs-fleet", "version": 1, "spec": ' + "1" * 5000 + "}", ValueError),   # int max str digits
    (_fleet_json(num_classes=1e999), OverflowError),                                       # int(inf)
    (_fleet_json(steps=-1e999), OverflowError),
], ids=["deep-nesting", "5000-digit-integer", "num_classes-inf", "steps-minus-inf"])
def test_fleet_json_that_json_or_the_spec_cannot_take_is_a_data_error(tmp_path, text, escaped):
    """fsio.read_spec_document parsed with json.loads and caught only JSONDecodeError; DatasetSpec.from_dict
    calls int() on floats (inf). Fixed: safejson.loads, and OverflowError caught."""
    with pytest.raises(DataError):
        load_fleet(_fleet_dir(tmp_path, text))


def test_parse_topic_with_a_superscript_round():
    # parse_topic checked the round with str.isdigit(), which '²' passes and int() refuses; '06' and
    # Arabic-Indic digits gave one upload several topic spellings
    for r in ("\u00b2", "06", "8\u06617"):
        with pytest.raises(PayloadError):
            parse_topic(f"fedmfs/v1/lab/device/d/upload/{r}/eye")
    assert parse_topic("fedmfs/v1/lab/device/d/upload/0/eye").round == 0


def test_reassembler_add_with_an_index_outside_the_upload():
    # Reassembler.add trusted header.index (only decode_chunk checked it): KeyError
    sha = hashlib.sha256(b"abcdef").hexdigest()
    asm = Reassembler(ChunkHeader(0, 2, 3, 6, sha))
    asm.add(ChunkHeader(0, 2, 3, 6, sha), b"abc")
    with pytest.raises(PayloadError):
        asm.add(ChunkHeader(7, 2, 3, 6, sha), b"def")      # index 7 of 2: stored, then chunk 1 looked up
