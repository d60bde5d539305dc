"""`fedmfs simulate` checks its data and options before any work (issue 10, point 8).

Every refusal is one line on stderr, naming the file and key (or the option) and the fix, with the
exit code of its kind (2 a bad option or config value, 3 bad data), and no traceback. The simulation
itself is replaced by a sentinel here: a refusal must come before it, and a value the checks accept
must reach it, so each test takes well under a second.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmfs.cli import main
from fedmfs.core.data.format import ClientData, Fleet, load_fleet, save_fleet
from fedmfs.core.data.synthetic import PRESETS, make_synthetic
from fedmfs.core.errors import DataError
from fedmfs.core.payload import Codec, ModelHeader, encode_model
from fedmfs.learner.models import build_modality_models, state_to_numpy
from fedmfs.sim.compare import modality_payload_sizes


class Reached(Exception):
    """The run (or the synthetic generator) was started: every check had passed."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small fleet directory: two clients of the `small` preset, 40 windows each (~2 MB a file)."""
    f = make_synthetic("small", 0)
    clients = []
    for c in f.clients[:2]:
        train = np.ones(40, bool)
        train[::4] = False
        clients.append(ClientData(c.name, {k: v[:40] for k, v in c.x.items()}, c.y[:40].copy(), train))
    return save_fleet(Fleet(f.spec, clients, {}), tmp_path_factory.mktemp("fleet") / "base")


@pytest.fixture
def fleet_dir(base, tmp_path) -> Path:
    d = tmp_path / "fleet"
    shutil.copytree(base, d)
    return d


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Starting the run or generating the synthetic fleet raises Reached."""
    import fedmfs.core.data as data
    import fedmfs.sim.driver as driver

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(driver, "run_simulation", reached)
    monkeypatch.setattr(data, "make_synthetic", reached)


def simulate(tmp_path, *args: str) -> list[str]:
    return ["simulate", "--rounds", "1", "--quiet", "--no-plots", "--transport", "inproc",
            "--out", str(tmp_path / "out"), *args]


def refusal(capsys, rc: int, code: int) -> str:
    """The one stderr line of a refusal, checked for its form."""
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedmfs: error: ")
    return lines[0]


def rewrite(path: Path, **arrays) -> None:
    z = dict(np.load(path))
    z.update(arrays)
    np.savez(path, **z)


# ------------------------------------------------------------------------------- 1. truncated .npz

def test_a_truncated_npz_is_refused_naming_the_file(fleet_dir, tmp_path, capsys):
    p = fleet_dir / "S00.npz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    line = refusal(capsys, main(simulate(tmp_path, "--data", str(fleet_dir))), 3)
    assert str(p) in line and "truncated" in line and "save_fleet" in line


def test_a_damaged_npz_member_is_refused_naming_the_file(fleet_dir):
    p = fleet_dir / "S02.npz"
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 64] = bytes(64)         # the central directory survives, an array's bytes do not
    p.write_bytes(bytes(b))
    with pytest.raises(DataError, match="S02.npz"):
        load_fleet(fleet_dir)


def test_a_npy_file_is_not_an_npz(fleet_dir):
    p = fleet_dir / "S00.npz"
    with open(p, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DataError, match=r"S00\.npz.*not an \.npz archive"):
        load_fleet(fleet_dir)


# ------------------------------------------------------------------------------- 2., 3. labels

def test_float_labels_with_fractions_are_refused(fleet_dir, tmp_path, capsys):
    p = fleet_dir / "S00.npz"
    y = np.load(p)["y"]
    rewrite(p, y=y.astype(np.float64) + 0.5)
    line = refusal(capsys, main(simulate(tmp_path, "--data", str(fleet_dir))), 3)
    assert str(p) in line and "'y' must hold integer class labels" in line and f"y[0] = {y[0] + 0.5}" in line


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_float_labels_are_refused(fleet_dir, bad):
    p = fleet_dir / "S02.npz"
    y = np.load(p)["y"].astype(np.float32)
    y[3] = bad
    rewrite(p, y=y)
    with pytest.raises(DataError, match=r"S02\.npz: 'y'"):
        load_fleet(fleet_dir)


def test_integral_float_labels_are_read_as_integers(fleet_dir):
    p = fleet_dir / "S00.npz"
    y = np.load(p)["y"]
    rewrite(p, y=y.astype(np.float32))
    c = load_fleet(fleet_dir).clients[0]
    assert c.y.dtype == np.int64 and np.array_equal(c.y, y)


@pytest.mark.parametrize("labels", [["walk"], ["3"], [b"3"], [True]])
def test_labels_that_are_not_numbers_are_refused(fleet_dir, tmp_path, capsys, labels):
    p = fleet_dir / "S02.npz"
    n = len(np.load(p)["y"])
    rewrite(p, y=np.array(labels * n))
    line = refusal(capsys, main(simulate(tmp_path, "--data", str(fleet_dir))), 3)
    assert str(p) in line and "'y'" in line and "integer" in line


# ------------------------------------------------------------------------------- 4. client names

@pytest.mark.parametrize("name", ["../outside", "sub/c1", "c+0", "dev 0", "#", ".hidden", "x" * 65, 7])
def test_a_client_name_that_is_not_a_device_id_is_refused(fleet_dir, tmp_path, capsys, name):
    meta = json.loads((fleet_dir / "fleet.json").read_text())
    meta["clients"][1] = name
    (fleet_dir / "fleet.json").write_text(json.dumps(meta))
    if isinstance(name, str) and len(name) < 65:    # a valid file where the name points, even outside
        target = fleet_dir / f"{name}.npz"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fleet_dir / "S02.npz", target)
    line = refusal(capsys, main(simulate(tmp_path, "--data", str(fleet_dir))), 3)
    assert str(fleet_dir / "fleet.json") in line and "'clients'[1]" in line and repr(name) in line
    assert "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}" in line


def test_a_listed_client_twice_is_refused(fleet_dir):
    meta = json.loads((fleet_dir / "fleet.json").read_text())
    meta["clients"] = ["S00", "S02", "S00"]
    (fleet_dir / "fleet.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"fleet\.json: 'clients' lists 'S00' twice"):
        load_fleet(fleet_dir)


@pytest.mark.parametrize("name", ["../outside", "sub/c1", "c+0", "dev 0"])
def test_a_fleet_with_such_a_name_is_neither_saved_nor_run(base, tmp_path, name):
    f = load_fleet(base)
    f.clients[0].name = name
    with pytest.raises(DataError, match="must match"):
        save_fleet(f, tmp_path / "d" / "fleet")
    assert not (tmp_path / "d" / "outside.npz").exists()
    with pytest.raises(DataError, match="must match"):
        f.check_runnable()


# ------------------------------------------------------------------------------- 5. alphas, strict JSON

@pytest.mark.parametrize("opt,value", [("--alpha-s", "nan"), ("--alpha-c", "inf"), ("--alpha-r", "-1"),
                                       ("--alpha-s", "-inf"), ("--alpha-r", "NaN")])
def test_a_non_finite_or_negative_alpha_is_refused(tmp_path, capsys, opt, value):
    line = refusal(capsys, main(simulate(tmp_path, f"{opt}={value}")), 2)   # "=": argparse takes -inf for an option
    assert f"{opt} {float(value)}" in line and "finite number >= 0" in line


def test_an_alpha_from_the_config_file_names_the_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "sim.toml"
    cfg.write_text("alpha_c = nan\n")
    line = refusal(capsys, main(simulate(tmp_path, "--config", str(cfg))), 2)
    assert f"{cfg}: alpha_c nan" in line


def test_all_alphas_zero_is_refused(tmp_path, capsys):
    line = refusal(capsys, main(simulate(tmp_path, "--alpha-s", "0", "--alpha-c", "0", "--alpha-r", "0")), 2)
    assert "--alpha-s, --alpha-c, --alpha-r" in line


def test_report_json_is_strict_json(tmp_path):
    from fedmfs.sim.report import write_report

    report = {"config": {"method": "fedmfs", "rounds": 1, "gamma": 1, "alphas": {}, "cap_bytes": None, "seed": 0},
              "dataset": {"spec": {"modalities": [{"name": "eye"}]}, "clients": {},
                          "metadata": {"x": math.nan, "y": [math.inf, -math.inf], "z": 3}},
              "rounds": [{"round": 0, "accuracy": math.nan, "upload_bytes": 0, "cumulative_bytes": 0,
                          "uploads": []}],
              "final_accuracy": math.nan, "total_upload_bytes": 0}
    path = write_report(report, tmp_path / "r", plots=False)

    def refuse(token):
        raise AssertionError(f"{token} in report.json")

    back = json.loads(path.read_text(), parse_constant=refuse)
    assert back["dataset"]["metadata"] == {"x": None, "y": [None, None], "z": 3}
    assert back["rounds"][0]["accuracy"] is None and back["final_accuracy"] is None


# ------------------------------------------------------------------------------- 6. uploads of nothing

def smallest(codec: str) -> tuple[str, int]:
    sizes = modality_payload_sizes(PRESETS["small"].spec(), codec)
    m = min(sizes, key=lambda k: sizes[k])
    return m, sizes[m]


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_a_cap_below_every_model_is_refused_with_the_cap_that_works(tmp_path, capsys, codec):
    m, size = smallest(codec)
    line = refusal(capsys, main(simulate(tmp_path, "--cap-bytes", str(size - 1), "--codec", codec)), 2)
    assert f"--cap-bytes {size - 1} is smaller" in line and f"{m}, is {size} bytes with codec {codec}" in line
    # the cap it proposes lets the model through with any round and sample count in its header
    works = int(re.search(r"Fix: --cap-bytes (\d+) or more", line).group(1))
    state = state_to_numpy(build_modality_models(PRESETS["small"].spec())[m])
    assert size <= works <= size + 64
    assert len(encode_model(state, ModelHeader(0, m, 10**6, Codec(codec)))) <= works


def test_the_cap_check_reads_the_fleets_spec(fleet_dir, tmp_path, capsys):
    m, size = smallest("fp32")
    line = refusal(capsys, main(simulate(tmp_path, "--data", str(fleet_dir), "--cap-bytes", "10")), 2)
    assert f"{m}, is {size} bytes" in line


def test_a_cap_that_fits_the_smallest_model_runs(tmp_path):
    _, size = smallest("fp32")
    with pytest.raises(Reached):
        main(simulate(tmp_path, "--cap-bytes", str(size)))


def test_the_holistic_cap_is_checked_against_its_one_model(tmp_path, capsys):
    _, size = smallest("fp32")
    line = refusal(capsys, main(simulate(tmp_path, "--method", "holistic", "--cap-bytes", str(size))), 2)
    assert "holistic" in line and "--cap-bytes" in line


def test_gamma_zero_is_refused(tmp_path, capsys):
    line = refusal(capsys, main(simulate(tmp_path, "--gamma", "0")), 2)
    assert "--gamma 0" in line and "--gamma 1" in line and "--method local" in line


@pytest.mark.parametrize("method", ["all", "local"])
def test_gamma_zero_is_accepted_where_gamma_is_not_used(tmp_path, method):
    with pytest.raises(Reached):
        main(simulate(tmp_path, "--gamma", "0", "--method", method))


# ------------------------------------------------------------------------------- 7. --out

def test_out_naming_a_file_is_refused_before_any_work(tmp_path, fleet_dir, capsys):
    (tmp_path / "out").write_text("results of another run\n")
    line = refusal(capsys, main(simulate(tmp_path, "--data", str(fleet_dir))), 2)
    assert f"--out {tmp_path / 'out'} is a file" in line
    assert (tmp_path / "out").read_text() == "results of another run\n"


def test_out_below_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    rc = main(["simulate", "--quiet", "--out", str(tmp_path / "f" / "run")])
    line = refusal(capsys, rc, 2)
    assert f"{tmp_path / 'f'} is a file" in line


def test_out_from_the_config_file_names_the_file_and_key(tmp_path, capsys):
    (tmp_path / "o").write_text("")
    cfg = tmp_path / "sim.toml"
    cfg.write_text(f"out = {json.dumps(str(tmp_path / 'o'))}\n")
    line = refusal(capsys, main(["simulate", "--quiet", "--config", str(cfg)]), 2)
    assert f"{cfg}: out {tmp_path / 'o'} is a file" in line


def test_an_existing_out_directory_is_fine(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(Reached):
        main(simulate(tmp_path))
