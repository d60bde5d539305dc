"""Minimal reproducers of what fuzzing found (bench/fuzz.py, tests/fuzz/test_parsers_fuzz.py; the list and
the fixes: docs/reliability-fuzz.md). Each failed before its fix.

Defects in modules another change owns (the wire, fsio) are reported, not fixed here: their reproducers
are ``xfail(strict=True)``, so the fix makes them pass and the marker must then go.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from fedmfs.core.data.format import ClientData, Fleet, load_client, load_fleet, save_fleet
from fedmfs.core.errors import DataError, PayloadError
from fedmfs.core.modality import DatasetSpec, ModalitySpec

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
