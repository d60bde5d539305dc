"""Model payloads: round trips per codec, tampering detected, malformed bytes refused (fuzzed)."""

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmfs.core.errors import PayloadError
from fedmfs.core.payload import (
    MAX_HEADER_BYTES,
    MAX_SAMPLES,
    Codec,
    ModelHeader,
    decode_model,
    encode_model,
    encoded_size,
)


def _state():
    rng = np.random.default_rng(0)
    return {"lstm.weight": rng.normal(size=(16, 4)).astype(np.float32), "head.bias": rng.normal(size=5).astype(np.float32)}


@pytest.mark.parametrize("codec,tol", [(Codec.FP32, 0), (Codec.FP16, 2e-3), (Codec.INT8, 3e-2)])
def test_round_trip(codec, tol):
    s = _state()
    data = encode_model(s, ModelHeader(3, "eye", 42, codec))
    h, out = decode_model(data)
    assert (h.round, h.modality, h.samples, h.codec) == (3, "eye", 42, codec)
    for k in s:
        assert np.abs(out[k] - s[k]).max() <= tol
    assert encoded_size(s, codec, "eye") == len(data)


def test_sizes_shrink_with_codec():
    s = {"w": np.ones((64, 64), np.float32)}
    assert encoded_size(s, "fp16") < 0.6 * encoded_size(s, "fp32")
    assert encoded_size(s, "int8") < 0.3 * encoded_size(s, "fp32")


def test_tampered_payload_refused():
    data = bytearray(encode_model(_state(), ModelHeader(1, "eye", 5)))
    data[-3] ^= 0xFF
    with pytest.raises(PayloadError, match="sha256"):
        decode_model(bytes(data))
    with pytest.raises(PayloadError):
        decode_model(bytes(data[:-10]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_crashes(blob):
    with pytest.raises(PayloadError):
        decode_model(blob)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_bit_flips_are_refused_or_harmless(pos, val):
    data = bytearray(encode_model(_state(), ModelHeader(1, "eye", 5)))
    pos %= len(data)
    data[pos] = val
    try:
        h, out = decode_model(bytes(data))
    except PayloadError:
        return
    # if it decodes, it decodes to exactly the original tensors (the flip hit only harmless header bytes)
    ref = _state()
    assert set(out) == set(ref) and all(np.array_equal(out[k], ref[k]) for k in ref)


def forge(data: bytes, header=None, **meta) -> bytes:
    """``data`` with its safetensors JSON header replaced (``header``) or metadata values changed: what a
    hostile peer can send, since the sha256 covers the tensors only."""
    (n,) = struct.unpack("<Q", data[:8])
    head = json.loads(data[8:8 + n])
    head["__metadata__"].update(meta)
    raw = header if header is not None else json.dumps(head).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


@pytest.mark.parametrize("samples", [str(2**63), str(2**64), str(MAX_SAMPLES + 1), "9" * 5000, "0", "-5", "1_000",
                                     " 7", "07", "1e3"])
def test_sample_counts_outside_the_protocol_range_are_refused(samples):
    """Issue 9 point 1: a header claiming 2^63 or more samples decoded, and the ledger's SQLite INTEGER
    could not store it. A count is now plain decimal digits in [1, MAX_SAMPLES]."""
    data = forge(encode_model(_state(), ModelHeader(1, "eye", 5)), samples=samples)
    with pytest.raises(PayloadError, match="samples"):
        decode_model(data)


def test_the_largest_sample_count_decodes_and_the_encoder_refuses_what_the_decoder_would():
    h, _ = decode_model(encode_model(_state(), ModelHeader(1, "eye", MAX_SAMPLES)))
    assert h.samples == MAX_SAMPLES == 2**31 - 1
    for bad in (0, MAX_SAMPLES + 1, 2**64):
        with pytest.raises(PayloadError, match="samples"):
            encode_model(_state(), ModelHeader(1, "eye", bad))


@pytest.mark.parametrize("key, value", [("samples", 5), ("samples", [5]), ("round", {"r": 1}), ("modality", None),
                                        ("codec", 1.5), ("sha256", ["x"]), ("version", True), ("extra", 3),
                                        ("modality", "e" * 300)])
def test_metadata_values_that_are_not_strings_are_refused(key, value):
    """Issue 9 point 4: a metadata value that is not a string raised TypeError out of decode_model."""
    data = forge(encode_model(_state(), ModelHeader(1, "eye", 5)), **{key: value})
    with pytest.raises(PayloadError, match=f"strings.*{key}"):
        decode_model(data)


@pytest.mark.parametrize("header", [b"[" * 100_000 + b"]" * 100_000,
                                    b'{"__metadata__":{"format":"fedmfs-model"},"x":' + b"[" * 5000 + b"]" * 5000 + b"}",
                                    b'{"__metadata__":{"format":"fedmfs-model"},"x":' + b"9" * 5000 + b"}"])
def test_deeply_nested_or_huge_integer_headers_are_refused(header):
    """Issue 9 point 4: a deeply nested header raised RecursionError out of decode_model."""
    data = forge(encode_model(_state(), ModelHeader(1, "eye", 5)), header=header)
    with pytest.raises(PayloadError, match="nests|digits"):
        decode_model(data)


def test_a_header_larger_than_the_limit_is_refused_before_parsing():
    big = b'{"__metadata__":{"format":"fedmfs-model"},"pad":"' + b"x" * MAX_HEADER_BYTES + b'"}'
    with pytest.raises(PayloadError, match="header length"):
        decode_model(forge(encode_model(_state(), ModelHeader(1, "eye", 5)), header=big))
