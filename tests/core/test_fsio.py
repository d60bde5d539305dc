"""fedmfs.core.fsio: atomic writes (temp file in the same directory, fsync, rename) and the versioned
spec-document reader."""

from __future__ import annotations

import json
import os
import stat

import pytest

from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.errors import ConfigError, DataError
from fedmfs.core.fsio import atomic_write, atomic_write_with, read_spec_document


def _leftovers(d):
    """Anything in ``d`` that looks like one of atomic_write's temp files."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# -------------------------------------------------------------------------------- atomic_write

def test_atomic_write_creates_the_file_whole_and_leaves_no_temp(tmp_path):
    data = bytes(range(256)) * 1000
    target = tmp_path / "out.bin"
    atomic_write(target, data)
    assert target.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_creates_missing_parent_directories(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write(target, b"deep")
    assert target.read_bytes() == b"deep"
    assert _leftovers(target.parent) == []


def test_atomic_write_accepts_a_str_path(tmp_path):
    target = tmp_path / "s.txt"
    atomic_write(str(target), b"x")
    assert target.read_bytes() == b"x"


def test_atomic_write_replaces_an_existing_file(tmp_path):
    target = tmp_path / "f.json"
    target.write_bytes(b"old content that is longer than the new one")
    atomic_write(target, b"new")
    # replaced, not overwritten in place: no tail of the old content survives
    assert target.read_bytes() == b"new"
    assert _leftovers(tmp_path) == []


def test_atomic_write_replaces_by_rename_not_in_place(tmp_path):
    """A reader holding the old file keeps seeing the old bytes: the path now names a new inode."""
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    old_inode = target.stat().st_ino
    with open(target, "rb") as reader:
        atomic_write(target, b"new")
        assert reader.read() == b"old"
    assert target.stat().st_ino != old_inode
    assert target.read_bytes() == b"new"


def test_atomic_write_empty_payload(tmp_path):
    target = tmp_path / "empty"
    target.write_bytes(b"something")
    atomic_write(target, b"")
    assert target.exists() and target.read_bytes() == b""


def test_atomic_write_result_mode_is_owner_read_write(tmp_path):
    """The file is made by mkstemp and renamed: owner read/write only (0600), new or replaced alike.
    (Not widened by the umask, and a replaced 0644 file becomes 0600: documented behaviour of
    tempfile.mkstemp, pinned here so a change is deliberate.)"""
    new = tmp_path / "new.txt"
    atomic_write(new, b"a")
    assert stat.S_IMODE(new.stat().st_mode) == 0o600
    old = tmp_path / "old.txt"
    old.write_bytes(b"b")
    os.chmod(old, 0o644)
    atomic_write(old, b"c")
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
    assert old.read_bytes() == b"c"


# --------------------------------------------------------------------------- atomic_write_with

def test_atomic_write_with_streams_several_writes_into_one_file(tmp_path):
    target = tmp_path / "stream.bin"

    def write(f):
        for i in range(10):
            f.write(bytes([i]) * 100)

    atomic_write_with(target, write)
    assert target.read_bytes() == b"".join(bytes([i]) * 100 for i in range(10))
    assert _leftovers(tmp_path) == []


def test_atomic_write_with_hands_a_writable_binary_file(tmp_path):
    target = tmp_path / "sub" / "t.bin"
    seen = {}

    def write(f):
        seen["mode"] = f.mode
        seen["writable"] = f.writable()
        seen["returned"] = f.write(b"ok")

    atomic_write_with(target, write)
    assert "b" in seen["mode"] and seen["writable"] is True
    assert seen["returned"] == 2
    assert target.read_bytes() == b"ok"


def test_atomic_write_with_temp_file_sits_next_to_the_target(tmp_path):
    """While the writer runs, the only new entry in the directory is a hidden .<name>.*.tmp file
    (same directory, so the rename is atomic), and the target does not exist yet."""
    target = tmp_path / "data.npz"
    during = {}

    def write(f):
        during["entries"] = sorted(p.name for p in tmp_path.iterdir())
        during["target_exists"] = target.exists()
        f.write(b"payload")

    atomic_write_with(target, write)
    assert during["target_exists"] is False
    assert len(during["entries"]) == 1
    tmp_name = during["entries"][0]
    assert tmp_name.startswith(".data.npz.") and tmp_name.endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]


def test_atomic_write_with_str_data_is_refused_and_leaves_nothing(tmp_path):
    """The file is binary: writing str raises TypeError, and neither target nor temp file remain."""
    target = tmp_path / "t.txt"
    with pytest.raises(TypeError):
        atomic_write_with(target, lambda f: f.write("text, not bytes"))
    assert list(tmp_path.iterdir()) == []


class Boom(Exception):
    pass


def test_failing_writer_keeps_the_old_file_intact(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b'{"old": true}')

    def write(f):
        f.write(b'{"new": tr')   # half a document, then a crash
        raise Boom("disk on fire")

    with pytest.raises(Boom, match="disk on fire"):
        atomic_write_with(target, write)
    assert target.read_bytes() == b'{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failing_writer_creates_no_file_when_none_existed(tmp_path):
    target = tmp_path / "new.bin"

    def write(f):
        f.write(b"partial")
        raise Boom()

    with pytest.raises(Boom):
        atomic_write_with(target, write)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_base_exceptions_also_clean_up(tmp_path):
    """KeyboardInterrupt (a BaseException) propagates unchanged and still removes the temp file."""
    target = tmp_path / "k.bin"
    target.write_bytes(b"keep")

    def write(f):
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, write)
    assert target.read_bytes() == b"keep"
    assert _leftovers(tmp_path) == []


def test_target_that_is_a_directory_fails_and_leaves_no_temp(tmp_path):
    target = tmp_path / "adir"
    target.mkdir()
    (target / "inside").write_bytes(b"i")
    with pytest.raises(OSError):
        atomic_write(target, b"data")
    assert (target / "inside").read_bytes() == b"i"
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- read_spec_document

@pytest.fixture(scope="module")
def spec_dict():
    return make_synthetic("small", 0).spec.to_dict()


def _write_doc(path, doc):
    path.write_text(json.dumps(doc))
    return path


def test_read_spec_document_returns_the_document_and_the_parsed_spec(tmp_path, spec_dict):
    p = _write_doc(tmp_path / "fleet.json",
                   {"format": "fedmfs-fleet", "version": 1, "spec": spec_dict, "clients": ["a", "b"]})
    doc, spec = read_spec_document(p, "fedmfs-fleet", 1, DataError, "a fleet directory")
    assert doc["clients"] == ["a", "b"]
    assert doc["format"] == "fedmfs-fleet" and doc["version"] == 1
    assert spec.to_dict() == spec_dict
    assert spec.names == tuple(m["name"] for m in spec_dict["modalities"])


def test_read_spec_document_accepts_str_path(tmp_path, spec_dict):
    p = _write_doc(tmp_path / "m.json", {"format": "F", "version": 3, "spec": spec_dict})
    doc, spec = read_spec_document(str(p), "F", 3, DataError, "x")
    assert doc["version"] == 3 and spec.to_dict() == spec_dict


def test_missing_file_names_the_directory_and_the_file(tmp_path):
    d = tmp_path / "not_a_fleet"
    d.mkdir()
    with pytest.raises(DataError) as ei:
        read_spec_document(d / "fleet.json", "fedmfs-fleet", 1, DataError, "a fleet directory")
    assert str(ei.value) == f"{d} is not a fleet directory: fleet.json is missing"
    assert isinstance(ei.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b""])
def test_unreadable_or_invalid_json_raises_the_given_error(tmp_path, content):
    p = tmp_path / "doc.json"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as ei:
        read_spec_document(p, "F", 1, ConfigError, "a thing")
    assert str(ei.value).startswith(f"{p}: unreadable or invalid JSON")


def test_path_that_is_a_directory_is_unreadable(tmp_path):
    p = tmp_path / "doc.json"
    p.mkdir()
    with pytest.raises(DataError, match="unreadable or invalid JSON"):
        read_spec_document(p, "F", 1, DataError, "a thing")


@pytest.mark.parametrize("doc", [
    {"format": "other", "version": 1},
    {"version": 1},
    [1, 2, 3],
    "fedmfs-fleet",
])
def test_wrong_format_or_not_an_object(tmp_path, doc, spec_dict):
    if isinstance(doc, dict):
        doc = {**doc, "spec": spec_dict}
    p = _write_doc(tmp_path / "doc.json", doc)
    with pytest.raises(DataError) as ei:
        read_spec_document(p, "fedmfs-fleet", 1, DataError, "a fleet directory")
    assert str(ei.value) == f"{p}: 'format' must be 'fedmfs-fleet'"


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_wrong_version_names_it_and_the_supported_one(tmp_path, version, spec_dict):
    doc = {"format": "F", "spec": spec_dict}
    if version is not None:
        doc["version"] = version
    p = _write_doc(tmp_path / "doc.json", doc)
    with pytest.raises(DataError) as ei:
        read_spec_document(p, "F", 1, DataError, "x")
    assert str(ei.value) == f"{p}: unsupported version {version!r}; this fedmfs reads 1"


_ONE = {"name": "a", "feature_shape": [2]}


@pytest.mark.parametrize("spec", [
    "missing", None, 5, {"modalities": "nope"}, {},
    {"modalities": [_ONE], "num_classes": 2},                              # no steps
    {"modalities": [_ONE, _ONE], "num_classes": 2, "steps": 5},             # duplicate modality
    {"modalities": [_ONE], "num_classes": 1, "steps": 5},                   # < 2 classes
    {"modalities": [{"name": "a"}], "num_classes": 2, "steps": 5},          # no feature_shape
    {"modalities": [_ONE], "num_classes": "two", "steps": 5},
])
def test_bad_or_missing_spec(tmp_path, spec):
    doc = {"format": "F", "version": 1}
    if spec != "missing":
        doc["spec"] = spec
    p = _write_doc(tmp_path / "doc.json", doc)
    with pytest.raises(DataError) as ei:
        read_spec_document(p, "F", 1, DataError, "x")
    assert str(ei.value).startswith(f"{p}: bad or missing 'spec'")


def test_error_type_is_the_callers(tmp_path):
    """Whatever exception class the caller passes is the one raised (no DataError leaks)."""

    class MyError(Exception):
        pass

    p = _write_doc(tmp_path / "doc.json", {"format": "G", "version": 1, "spec": {}})
    with pytest.raises(MyError, match="'format' must be 'F'"):
        read_spec_document(p, "F", 1, MyError, "x")
