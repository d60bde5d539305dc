"""`fedmfs data`: the processed ActionSense HDF5 to a fleet directory, the synthetic fleet (both forms),
and the errors a user meets (missing file, not HDF5, datasets lacking), each naming the file and the fix.

Before `fedmfs data actionsense` existed, the real data set had a loader but no command: a user could
only write synthetic fleets from the command line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from actionsense_files import write_actionsense

from fedmfs.cli import main
from fedmfs.core.data import load_actionsense_hdf5, load_fleet
from fedmfs.core.data.actionsense import STREAMS
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_simulation


def _write_actionsense(path: Path, **kw):
    """A file with something to learn (tests/actionsense_files.py)."""
    return write_actionsense(path, **{"per_class": 5, "signal": 0.5, **kw})


def test_actionsense_hdf5_to_fleet_directory_that_simulates(tmp_path, capsys):
    h5 = tmp_path / "as.hdf5"
    y, sid = _write_actionsense(h5)
    out = tmp_path / "fleet"
    assert main(["data", "actionsense", "--hdf5", str(h5), "--out", str(out), "--steps", "0", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 clients (S00, S02, S06), 6 modalities, 4 classes, 10 steps" in printed
    assert "S06: 20 windows (16 train), lacks tactile_left, tactile_right" in printed

    fleet = load_fleet(out)
    assert [c.name for c in fleet.clients] == ["S00", "S02", "S06"]
    spec = fleet.spec
    assert spec.names == ("eye", "emg_left", "emg_right", "tactile_left", "tactile_right", "xsens")
    assert spec.num_classes == 4 and spec.steps == 10 and spec.class_names == ("act0", "act1", "act2", "act3")
    assert {m.name: m.feature_shape for m in spec.modalities} == {
        "eye": (2,), "emg_left": (8,), "emg_right": (8,), "tactile_left": (4, 4), "tactile_right": (4, 4),
        "xsens": (66,)}
    s00, s06 = fleet.clients[0], fleet.clients[2]
    assert set(s00.x) == set(STREAMS) and set(s06.x) == {"eye", "emg_left", "emg_right", "xsens"}
    assert s00.x["xsens"].shape == (20, 10, 66) and s00.x["tactile_left"].shape == (20, 10, 4, 4)
    np.testing.assert_array_equal(np.sort(s00.y), np.repeat(np.arange(4), 5))  # 1-based -> 0-based
    with h5py.File(h5, "r") as f:  # the rows of S00 are the file's, unchanged (--steps 0)
        np.testing.assert_array_equal(s00.x["emg_right"], f[STREAMS["emg_right"]][()][sid == "S00"])
    for c in fleet.clients:  # stratified 80/20: 5 per class -> 4 train, 1 test
        assert np.all(np.bincount(c.y[c.train], minlength=4) == 4)
    # the options reach the loader: the same fleet as the loader's with the same settings
    direct = load_actionsense_hdf5(h5, steps=None, seed=1)
    for a, b in zip(fleet.clients, direct.clients, strict=True):
        np.testing.assert_array_equal(a.train, b.train)
        np.testing.assert_array_equal(a.y, b.y)

    rep = run_simulation(fleet, SimConfig.build(rounds=1, train=TrainConfig(min_steps=0, epochs=1, fusion_steps=10,
                                                                          shapley_samples=8)),
                         "inproc", workdir=tmp_path / "w")
    assert len(rep["rounds"]) == 1
    r = rep["rounds"][0]
    assert sorted(r["clients"]) == ["S00", "S02", "S06"]
    assert sorted(u["device"] for u in r["uploads"]) == ["S00", "S02", "S06"]  # gamma = 1
    for u in r["uploads"]:
        assert u["modality"] in next(c for c in fleet.clients if c.name == u["device"]).modalities
    assert set(r["clients"]["S06"]["shapley"]) == {"eye", "emg_left", "emg_right", "xsens"}
    assert set(r["clients"]["S00"]["shapley"]) == set(STREAMS)
    assert set(r["client_accuracy"]) == {"S00", "S02", "S06"}


def test_actionsense_options_steps_subjects_modalities_split(tmp_path):
    h5 = tmp_path / "as.hdf5"
    _write_actionsense(h5, t=8)
    out = tmp_path / "fleet"
    assert main(["data", "actionsense", "--hdf5", str(h5), "--out", str(out), "--subjects", "S02,S06",
                 "--modalities", "eye,xsens", "--split", "0.6"]) == 0
    fleet = load_fleet(out)
    assert [c.name for c in fleet.clients] == ["S02", "S06"]
    assert fleet.spec.names == ("eye", "xsens") and fleet.spec.steps == 100  # the loader's default resampling
    assert fleet.clients[0].x["eye"].shape == (20, 100, 2)
    for c in fleet.clients:  # 5 per class, 60% train -> round(5 * 0.4) = 2 test, 3 train
        assert np.all(np.bincount(c.y[c.train], minlength=4) == 3)


def test_synthetic_both_forms_write_the_same_fleet(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    assert main(["data", "--preset", "small", "--seed", "2", "--out", str(old)]) == 0  # the older form
    assert main(["data", "synthetic", "--preset", "small", "--seed", "2", "--out", str(new)]) == 0
    a, b = load_fleet(old), load_fleet(new)
    assert a.spec == b.spec and len(a.clients) == 9 and a.metadata["seed"] == 2
    assert (old / "S00.npz").read_bytes() == (new / "S00.npz").read_bytes()
    assert (old / "fleet.json").read_text() == (new / "fleet.json").read_text()


def _junk(p: Path) -> Path:
    p.write_bytes(b"x_eye,y\n0.1,3\n" * 20)
    return p


def _no_labels(p: Path) -> Path:
    with h5py.File(p, "w") as f:
        f.create_dataset("example_subject_ids", data=np.array([b"S00"]))
    return p


def _no_emg_right(p: Path) -> Path:
    _write_actionsense(p, drop="emg_right")
    return p


def _no_streams(p: Path) -> Path:
    with h5py.File(p, "w") as f:
        f.create_dataset("example_label_indexes", data=np.array([1, 2]))
        f.create_dataset("example_subject_ids", data=np.array([b"S00", b"S00"]))
        f.create_dataset("features", data=np.zeros((2, 3)))
    return p


@pytest.mark.parametrize("make,needles", [
    (lambda p: p, ["no such file", "--hdf5 takes the processed ActionSense file",
                   "data_processed_allStreams_10s_10hz_5subj_ex20-20_allActs.hdf5"]),
    (lambda p: (p.mkdir(), p)[1], ["is a directory, not a file", "fedmfs simulate --data DIR"]),
    (_junk, ["is not an HDF5 file", "Fix: --hdf5 takes the processed ActionSense file"]),
    (_no_labels, ["lacks the dataset(s) ['example_label_indexes']", "it has ['example_subject_ids']",
                  "Fix: --hdf5 takes the processed ActionSense file"]),
    (_no_emg_right, ["lacks the stream dataset(s) ['example_matrices_myo-right_emg']",
                     "Fix: read the streams it has with --modalities "
                     "eye,emg_left,tactile_left,tactile_right,xsens"]),
    (_no_streams, ["lacks the stream dataset(s) ['example_matrices_eye-tracking-gaze_position'",
                   "it has ['example_label_indexes', 'example_subject_ids', 'features']",
                   "Fix: --hdf5 takes the processed ActionSense file"]),
], ids=["missing", "directory", "not_hdf5", "no_labels", "one_stream_missing", "no_streams"])
def test_bad_file_names_the_file_and_the_fix(tmp_path, capsys, make, needles):
    p = make(tmp_path / "data.hdf5")
    out = tmp_path / "fleet"
    rc = main(["data", "actionsense", "--hdf5", str(p), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 3, err  # DataError's exit code
    assert err.startswith(f"fedmfs: error: {p}")
    for n in needles:
        assert n in err, err
    assert not out.exists()


def test_the_fix_it_suggests_works(tmp_path):
    p = _no_emg_right(tmp_path / "as.hdf5")
    assert main(["data", "actionsense", "--hdf5", str(p), "--out", str(tmp_path / "f"),
                 "--modalities", "eye,emg_left,tactile_left,tactile_right,xsens"]) == 0
    assert load_fleet(tmp_path / "f").spec.names == ("eye", "emg_left", "tactile_left", "tactile_right", "xsens")


@pytest.mark.parametrize("args,needle", [
    (["--modalities", "eye,gps"], "--modalities: unknown ['gps']"),
    (["--split", "1.5"], "--split must be between 0 and 1"),
    (["--steps", "-3"], "--steps must be >= 0"),
])
def test_bad_options_are_config_errors(tmp_path, capsys, args, needle):
    p = tmp_path / "as.hdf5"
    _write_actionsense(p)
    assert main(["data", "actionsense", "--hdf5", str(p), "--out", str(tmp_path / "f"), *args]) == 2
    assert needle in capsys.readouterr().err


def test_command_line_error_is_a_message_not_a_traceback(tmp_path):
    missing = tmp_path / "nope.hdf5"
    run = subprocess.run([sys.executable, "-m", "fedmfs.cli", "data", "actionsense", "--hdf5", str(missing),
                          "--out", str(tmp_path / "f")], capture_output=True, text=True)
    assert run.returncode == 3
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [
        f"fedmfs: error: {missing}: no such file. Fix: --hdf5 takes the processed ActionSense file "
        "(data_processed_allStreams_10s_10hz_5subj_ex20-20_allActs.hdf5, the layout in docs/data.md, section "
        "ActionSense); check the path"]
    helped = subprocess.run([sys.executable, "-m", "fedmfs.cli", "data", "--help"], capture_output=True,
                            text=True, check=True).stdout
    assert "synthetic" in helped and "actionsense" in helped and "fedmfs data --preset P" in helped
