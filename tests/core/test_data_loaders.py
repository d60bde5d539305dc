"""The ActionSense HDF5 and UCI HAR loaders, on tiny files written by the tests in the real layouts."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from actionsense_files import write_actionsense

from fedmfs.core.data import load_actionsense_hdf5, load_fleet, load_uci_har, save_fleet
from fedmfs.core.data.actionsense import STREAMS, resample_steps
from fedmfs.core.errors import DataError

# ---------------------------------------------------------------- ActionSense

# the writer of small files in the processed layout: tests/actionsense_files.py


def test_actionsense_layout_mapping_and_missing(tmp_path):
    p = tmp_path / "as.hdf5"
    y, sid = write_actionsense(p)
    fleet = load_actionsense_hdf5(p, steps=10, split=0.75, seed=1)
    assert [c.name for c in fleet.clients] == ["S00", "S02", "S06"]
    assert fleet.spec.num_classes == 4 and fleet.spec.steps == 10
    assert fleet.spec.class_names == ("act0", "act1", "act2", "act3")
    assert fleet.spec["xsens"].feature_shape == (66,)
    assert fleet.spec["tactile_left"].feature_shape == (4, 4)
    s06 = fleet.clients[2]
    assert set(s06.x) == {"eye", "emg_left", "emg_right", "xsens"}  # zeroed tactile -> absent
    s00 = fleet.clients[0]
    assert set(s00.x) == set(STREAMS)
    assert s00.x["xsens"].shape == (12, 10, 66) and s00.x["xsens"].dtype == np.float32
    np.testing.assert_array_equal(np.sort(s00.y), np.repeat(np.arange(4), 3))  # 1-based -> 0-based
    # The rows really are S00's: compare with the file.
    with h5py.File(p, "r") as f:
        raw = f[STREAMS["emg_right"]][()][sid == "S00"]
    np.testing.assert_array_equal(s00.x["emg_right"], raw)
    for c in fleet.clients:  # stratified: 3 per class -> 2 train, 1 test
        assert np.all(np.bincount(c.y[c.train], minlength=4) == 2)
    back = load_fleet(save_fleet(fleet, tmp_path / "out"))
    assert back.spec == fleet.spec and [c.name for c in back.clients] == ["S00", "S02", "S06"]


def test_actionsense_subjects_steps_and_zero_based(tmp_path):
    p = tmp_path / "as.hdf5"
    write_actionsense(p, one_based=False, attrs=False, t=8)
    fleet = load_actionsense_hdf5(p, subjects=["S02"], steps=16)
    assert [c.name for c in fleet.clients] == ["S02"]
    assert fleet.spec.steps == 16 and fleet.clients[0].x["eye"].shape == (12, 16, 2)
    assert sorted(set(fleet.clients[0].y.tolist())) == [0, 1, 2, 3]
    with pytest.raises(DataError, match=r"subjects \['S01'\] not in the file"):
        load_actionsense_hdf5(p, subjects=["S01"])


def test_actionsense_baseline_windows_are_dropped(tmp_path):
    p = tmp_path / "as.hdf5"
    write_actionsense(p, one_based=False, attrs=False)
    with h5py.File(p, "a") as f:  # ActionNet numbering: 0 is the 'None' baseline
        f.attrs["activities_to_classify"] = repr(["None", "a", "b", "c"])
    fleet = load_actionsense_hdf5(p, steps=None)
    assert fleet.spec.num_classes == 3 and fleet.spec.class_names == ("a", "b", "c")
    assert all(len(c) == 9 for c in fleet.clients)


def test_actionsense_missing_stream_names_what_is_expected(tmp_path):
    p = tmp_path / "as.hdf5"
    write_actionsense(p, drop="emg_right")
    with pytest.raises(DataError, match=r"missing dataset\(s\) \['example_matrices_myo-right_emg'\]"):
        load_actionsense_hdf5(p)
    # Restricting the modalities makes the same file loadable.
    fleet = load_actionsense_hdf5(p, modalities=("eye", "xsens"))
    assert fleet.spec.names == ("eye", "xsens")


def test_actionsense_broken_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_actionsense_hdf5(tmp_path / "nope.hdf5")
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(DataError, match="not a readable HDF5"):
        load_actionsense_hdf5(junk)
    nolabels = tmp_path / "nolabels.hdf5"
    with h5py.File(nolabels, "w") as f:
        f.create_dataset("example_subject_ids", data=np.array([b"S00"]))
    with pytest.raises(DataError, match="missing dataset 'example_label_indexes'"):
        load_actionsense_hdf5(nolabels)
    short = tmp_path / "short.hdf5"
    write_actionsense(short)
    with h5py.File(short, "a") as f:
        del f[STREAMS["eye"]]
        f.create_dataset(STREAMS["eye"], data=np.zeros((5, 10, 2), np.float32))
    with pytest.raises(DataError, match=r"eye-tracking-gaze_position must be \(N=36"):
        load_actionsense_hdf5(short)


def test_actionsense_concatenated_actionnet_layout(tmp_path):
    p = tmp_path / "actionnet.hdf5"
    rng = np.random.default_rng(1)
    n, t = 8, 5
    x = rng.uniform(-1, 1, (n, t, 2 + 8 + 8 + 16 + 16 + 66)).astype(np.float32)
    with h5py.File(p, "w") as f:
        f.create_dataset("example_matrices", data=x)
        f.create_dataset("example_label_indexes", data=np.array([1, 2, 1, 2, 1, 2, 1, 2]))
        f.create_dataset("example_subject_ids", data=np.array([b"S00"] * n))
    fleet = load_actionsense_hdf5(p, steps=None)
    c = fleet.clients[0]
    np.testing.assert_array_equal(c.x["eye"], x[:, :, 0:2])
    np.testing.assert_array_equal(c.x["tactile_right"].reshape(n, t, 16), x[:, :, 34:50])
    np.testing.assert_array_equal(c.x["xsens"], x[:, :, 50:])


def test_resample_steps_linear():
    x = np.arange(2 * 5, dtype=np.float32).reshape(2, 5, 1)
    y = resample_steps(x, 9)
    np.testing.assert_allclose(y[0, :, 0], np.linspace(0, 4, 9))
    np.testing.assert_allclose(resample_steps(y, 5), x)
    assert resample_steps(x, 5) is x


# ---------------------------------------------------------------- UCI HAR

def _write_uci(root: Path, subjects_by_part=None, per_class=3, steps=128, ragged: str | None = None):
    subjects_by_part = subjects_by_part or {"train": [1, 3], "test": [2]}
    d0 = root / "UCI HAR Dataset"
    rng = np.random.default_rng(0)
    truth = {}
    for part, subs in subjects_by_part.items():
        d = d0 / part
        (d / "Inertial Signals").mkdir(parents=True)
        y = np.tile(np.repeat(np.arange(1, 7), per_class), len(subs))
        s = np.repeat(subs, 6 * per_class)
        (d / f"y_{part}.txt").write_text("".join(f"{v}\n" for v in y))
        (d / f"subject_{part}.txt").write_text("".join(f"{v}\n" for v in s))
        for sig in ("body_acc", "body_gyro", "total_acc"):
            for ax in "xyz":
                a = rng.normal(size=(len(y), steps))
                truth[(part, sig, ax)] = a
                lines = ["  " + "  ".join(f"{v: .7e}" for v in row) for row in a]
                name = f"{sig}_{ax}_{part}.txt"
                if name == ragged:
                    lines[3] = lines[3].rsplit("  ", 1)[0]
                (d / "Inertial Signals" / name).write_text("\n".join(lines) + "\n")
    (d0 / "activity_labels.txt").write_text(
        "1 WALKING\n2 WALKING_UPSTAIRS\n3 WALKING_DOWNSTAIRS\n4 SITTING\n5 STANDING\n6 LAYING\n")
    return truth


def test_uci_har_loads_subjects_as_clients(tmp_path):
    truth = _write_uci(tmp_path)
    fleet = load_uci_har(tmp_path, split=0.8, seed=0)
    assert [c.name for c in fleet.clients] == ["subject01", "subject02", "subject03"]
    assert fleet.spec.names == ("body_acc", "body_gyro", "total_acc")
    assert fleet.spec.steps == 128 and fleet.spec.num_classes == 6
    assert fleet.spec.class_names[0] == "WALKING"
    c1 = fleet.clients[0]
    assert c1.x["body_gyro"].shape == (18, 128, 3) and c1.x["body_gyro"].dtype == np.float32
    np.testing.assert_array_equal(c1.y, np.repeat(np.arange(6), 3))  # labels 1..6 -> 0..5
    # subject01 is the first 18 rows of train; the y axis of body_gyro is feature 1.
    np.testing.assert_allclose(c1.x["body_gyro"][:, :, 1], truth[("train", "body_gyro", "y")][:18], rtol=1e-6)
    np.testing.assert_allclose(fleet.clients[1].x["total_acc"][:, :, 2], truth[("test", "total_acc", "z")],
                               rtol=1e-6)
    for c in fleet.clients:  # 3 per class -> 2 train / 1 test, per class
        assert np.all(np.bincount(c.y[c.train], minlength=6) == 2)
    # Pointing at the inner folder works too, and the seed changes only the split.
    other = load_uci_har(tmp_path / "UCI HAR Dataset", seed=1)
    assert not np.array_equal(other.clients[0].train, c1.train)
    np.testing.assert_array_equal(other.clients[0].x["body_acc"], c1.x["body_acc"])


def test_uci_har_ragged_row_is_named(tmp_path):
    _write_uci(tmp_path, ragged="body_acc_y_train.txt")
    with pytest.raises(DataError, match=r"body_acc_y_train.txt, line 4: 127 values, expected 128 \(ragged row\)"):
        load_uci_har(tmp_path)


def test_uci_har_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_uci_har(tmp_path / "absent")
    _write_uci(tmp_path, subjects_by_part={"train": [1]})
    with pytest.raises(DataError, match="missing folder 'test'"):
        load_uci_har(tmp_path)
    fleet = load_uci_har(tmp_path, parts=("train",))
    assert [c.name for c in fleet.clients] == ["subject01"]
    (tmp_path / "UCI HAR Dataset" / "train" / "Inertial Signals" / "total_acc_z_train.txt").unlink()
    with pytest.raises(DataError, match="missing file .*total_acc_z_train.txt"):
        load_uci_har(tmp_path, parts=("train",))


def test_uci_har_bad_labels_and_numbers(tmp_path):
    _write_uci(tmp_path, subjects_by_part={"train": [1]})
    d = tmp_path / "UCI HAR Dataset" / "train"
    (d / "y_train.txt").write_text("7\n" * 18)
    with pytest.raises(DataError, match=r"labels must be integers 1..6"):
        load_uci_har(tmp_path, parts=("train",))
    (d / "y_train.txt").write_text("1\n" * 18)
    sig = d / "Inertial Signals" / "body_acc_x_train.txt"
    sig.write_text(sig.read_text().replace("e", "q", 1))
    with pytest.raises(DataError, match="not a number"):
        load_uci_har(tmp_path, parts=("train",))


@pytest.mark.parametrize("which", ["train", "test"])
def test_a_client_without_training_or_test_windows_is_refused_up_front(tmp_path, which, capsys):
    """Issue 8: such a client passed validation and crashed the run in evaluation. It is still a valid
    fleet (a partition may produce it), but no run starts on it."""
    from fedmfs.cli import main
    from fedmfs.core.data.format import Fleet, save_fleet
    from fedmfs.core.data.synthetic import make_synthetic
    from fedmfs.core.errors import DataError
    from fedmfs.sim.config import SimConfig
    from fedmfs.sim.driver import run_simulation

    f = make_synthetic("small", 0)
    bad = f.clients[1]
    bad.train[:] = which == "test"          # all windows train (no test), or none train
    fleet = Fleet(f.spec, [f.clients[0], bad], f.metadata)
    with pytest.raises(DataError, match=f"{bad.name}.*at least one of each"):
        run_simulation(fleet, SimConfig.build(rounds=1), "inproc", workdir=tmp_path / "run")
    save_fleet(fleet, tmp_path / "fleet")
    assert main(["simulate", "--data", str(tmp_path / "fleet"), "--transport", "inproc", "--rounds", "1",
                 "--out", str(tmp_path / "out"), "--quiet", "--no-plots"]) == DataError.exit_code
    assert f"client {bad.name!r}" in capsys.readouterr().err
