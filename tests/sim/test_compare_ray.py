"""The comparison grid as Ray tasks (fedmfs.sim.grid): on a local two-node Ray cluster
(``ray.cluster_utils.Cluster``, head + one worker node, one CPU each, loopback only) a tiny grid gives
the very results of a serial run in this process; a stopped grid resumes where it stopped; a saved
run made with other settings is refused; the local Ray started on demand listens on loopback only.

Real Ray throughout (the ``cluster`` extra, in ``test``): one cluster for the module. The runs are a
small fleet of 3 clients, 2 rounds, 2 seeds, 2 variants, with a light training config so the module
stays near a minute and a half on two cores.
"""

from __future__ import annotations

import json
import shutil

import pytest

from fedmfs.core.errors import ConfigError
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.compare import SyntheticFleet, Variant, run_grid
from fedmfs.sim.grid import WALL_CLOCK_FIELDS, result_differences

LIGHT = TrainConfig(epochs=1, min_steps=10, patience=0, fusion_steps=20, shapley_samples=10, shapley_background=4)
FLEET = SyntheticFleet("small", clients=3)
VARIANTS = [Variant("fedmfs", "fedmfs", {"train": LIGHT}), Variant("all", "all", {"train": LIGHT})]
SEEDS = [0, 1]
ROUNDS = 2
MB = 2**20


def _results(rows: list[dict]) -> list[dict]:
    """Everything a run computed: its row without where and how fast it ran."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds", "ran_on")} for r in rows]


@pytest.fixture(scope="module")
def cluster():
    """A head node and one worker node of one CPU each, on 127.0.0.1, shut down after the module."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "object_store_memory": 100 * MB, "include_dashboard": False,
            "node_ip_address": "127.0.0.1"})
        try:
            c.add_node(num_cpus=1, object_store_memory=100 * MB, node_ip_address="127.0.0.1")
            c.wait_for_nodes(timeout=60)
            yield c
        finally:
            c.shutdown()


@pytest.fixture(scope="module")
def serial():
    """The reference: the grid in this process, one run after another."""
    rows = run_grid(FLEET, VARIANTS, SEEDS, ROUNDS)
    assert [(r["variant"], r["seed"]) for r in rows] == [("fedmfs", 0), ("fedmfs", 1), ("all", 0), ("all", 1)]
    assert {r["ran_on"] for r in rows} == {"this process"}
    for r in rows:     # real runs: two rounds, bytes uploaded, an accuracy
        assert [x["round"] for x in r["rounds"]] == [0, 1]
        assert r["total_upload_bytes"] > 0 and 0.0 < r["final_accuracy"] <= 1.0
        assert r["config"]["train"]["min_steps"] == LIGHT.min_steps
    assert rows[2]["total_upload_bytes"] > rows[0]["total_upload_bytes"]     # all sends more than fedmfs
    return rows


@pytest.fixture(scope="module")
def resumed(cluster, serial, tmp_path_factory):
    """A Ray grid on the two-node cluster stopped after its first saved run, then run again on the
    same results directory: (directory, rows of the second pass, what it loaded, what it ran)."""
    out = tmp_path_factory.mktemp("grid")

    def stop(row):
        raise KeyboardInterrupt("stopped after the first run")

    with pytest.raises(KeyboardInterrupt):
        run_grid(FLEET, VARIANTS, SEEDS, ROUNDS, ray_address=cluster.address, out=out, on_run=stop)
    first = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(first) == 1, first        # saved before on_run was told; the others were cancelled
    before = (out / "runs" / first[0]).read_bytes()
    loaded: list[dict] = []
    ran: list[dict] = []
    rows = run_grid(FLEET, VARIANTS, SEEDS, ROUNDS, ray_address=cluster.address, out=out,
                    on_run=ran.append, on_resume=loaded.extend)
    assert (out / "runs" / first[0]).read_bytes() == before      # loaded, not rerun nor rewritten
    return out, rows, loaded, ran


def test_ray_grid_on_two_nodes_resumes_and_equals_a_serial_run(cluster, serial, resumed):
    out, rows, loaded, ran = resumed
    assert len(loaded) == 1 and len(ran) == 3
    assert {(r["variant"], r["seed"]) for r in loaded} | {(r["variant"], r["seed"]) for r in ran} == \
        {(v.name, s) for v in VARIANTS for s in SEEDS}
    # every run equals its serial twin in every field but the wall clock, in the grid's order
    assert _results(rows) == _results(serial)
    assert result_differences(rows, serial) == []
    # the three new runs were Ray tasks, spread over both nodes
    nodes = {r["ran_on"] for r in ran}
    assert all(n.startswith("ray node ") for n in nodes) and len(nodes) == 2, nodes
    # each saved file holds its row and the settings that made it
    for r in rows:
        doc = json.loads((out / "runs" / f"{r['variant']}.seed{r['seed']}.json").read_text())
        assert doc["run"] == r
        assert doc["settings"]["rounds"] == ROUNDS and doc["settings"]["fleet"] == \
            {"factory": "SyntheticFleet", "preset": "small", "clients": 3}
        assert doc["settings"]["config"] == r["config"]


def test_result_differences_name_what_differs(serial):
    other = json.loads(json.dumps(serial))
    other[1]["rounds"][1]["accuracy"] += 1e-12
    other[3]["seconds"] = 1e9          # the wall clock is not a result
    other[3]["ran_on"] = "elsewhere"
    other[3]["cpu_seconds"] = 1e9      # nor the CPU time
    found = result_differences(serial, other)
    assert len(found) == 1 and found[0].startswith("fedmfs seed 1: rounds differs"), found
    assert result_differences(serial, serial[:3]) == ["all seed 1: only in the first"]
    assert set(WALL_CLOCK_FIELDS) == {"seconds", "cpu_seconds", "ran_on"}


def test_a_saved_run_with_other_settings_is_refused_before_anything_runs(resumed, tmp_path):
    out = tmp_path / "grid"
    shutil.copytree(resumed[0], out)
    ran: list[dict] = []
    # other rounds: every file differs; nothing runs (no Ray address needed: refused before Ray starts)
    with pytest.raises(ConfigError) as e:
        run_grid(FLEET, VARIANTS, SEEDS, ROUNDS + 1, out=out, on_run=ran.append)
    msg = str(e.value)
    assert "\n" not in msg and "fedmfs.seed0.json was saved with other settings" in msg
    assert "rounds saved 2, this grid 3" in msg and "3 more saved runs differ too" in msg and "--out" in msg
    assert ran == []
    # one file whose variant config differs (as if the defaults changed since): named, with the key
    p = out / "runs" / "all.seed1.json"
    doc = json.loads(p.read_text())
    doc["settings"]["config"]["train"]["min_steps"] = 99
    p.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"all\.seed1\.json was saved with other settings than this grid's: "
                                          r"config\.train\.min_steps saved 99, this grid 10\. Fix"):
        run_grid(FLEET, VARIANTS, SEEDS, ROUNDS, out=out, on_run=ran.append)
    # a file that is not a saved run at all
    p.write_bytes(b"\x80\x04K\x01.")      # a pickle: never loaded as one
    with pytest.raises(ConfigError, match=r"all\.seed1\.json: not a readable saved run"):
        run_grid(FLEET, VARIANTS, SEEDS, ROUNDS, out=out, on_run=ran.append)
    assert ran == []


def test_fedmfs_compare_command_refuses_loads_and_explains(resumed, tmp_path, capsys):
    from fedmfs.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    helptext = capsys.readouterr().out
    for words in ("--ray-address", "--serial", "--workers", "resumes", "--check-serial", "loopback only",
                  "pip install 'fedmfs[cluster]'"):
        assert words in " ".join(helptext.split()), words
    # the saved grid summarised without running anything
    assert main(["compare", "--load", str(resumed[0])]) == 0
    printed = capsys.readouterr().out
    assert "seeds [0, 1], rounds [2], split test" in printed and "fedmfs" in printed
    # the command's own settings differ from the saved runs' (default training): one line, exit 2
    out = tmp_path / "grid"
    shutil.copytree(resumed[0], out)
    rc = main(["compare", "--preset", "small", "--clients", "3", "--rounds", "2", "--seeds", "0", "1",
               "--variants", "fedmfs", "all", "--serial", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == ConfigError.exit_code and "\n" not in err
    assert "fedmfs.seed0.json was saved with other settings" in err and "config.train.min_steps saved 10, this grid 100" \
        in err
    assert main(["compare", "--serial", "--ray-address", "127.0.0.1:1"]) == ConfigError.exit_code
    assert "--ray-address runs the grid on that cluster" in capsys.readouterr().err


def test_fedmfs_compare_on_a_cluster_checks_itself_against_a_serial_run(cluster, tmp_path, capsys):
    """The command end to end on the two-node cluster: one run (the command's own default training),
    saved, summarised, then run again here by --check-serial and found equal."""
    from fedmfs.cli import main

    out = tmp_path / "grid"
    rc = main(["compare", "--preset", "small", "--clients", "3", "--rounds", "1", "--seeds", "0", "--variants",
               "fedmfs", "--ray-address", cluster.address, "--out", str(out), "--check-serial"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"on the Ray cluster at {cluster.address}" in printed
    assert "serial check: 1 of 1 runs equal their serial run in every field but the wall clock" in printed
    assert "; 0 differences" in printed
    saved = json.loads((out / "runs" / "fedmfs.seed0.json").read_text())
    assert saved["run"]["ran_on"].startswith("ray node ") and saved["settings"]["config"]["train"]["min_steps"] == \
        TrainConfig().min_steps
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == [saved["run"]] and summary["summary"]["seeds"] == [0]
    assert (out / "summary.txt").read_text().startswith("seeds [0], rounds [1], split test")


def test_local_ray_is_started_on_demand_on_loopback_and_stopped(tmp_path):
    """The default runner: a local Ray of ``workers`` CPUs, loopback only, gone after the grid."""
    import ray

    seen = []

    def look(row):
        nodes = [n for n in ray.nodes() if n["Alive"]]
        seen.append(([n["NodeManagerAddress"] for n in nodes], ray.cluster_resources().get("CPU")))

    rows = run_grid(FLEET, VARIANTS[:1], [0], 1, workers=2, on_run=look)
    assert seen == [(["127.0.0.1"], 2.0)]
    assert rows[0]["ran_on"].startswith("ray node ") and len(rows[0]["rounds"]) == 1
    assert not ray.is_initialized()


def test_ray_is_forbidden_outside_the_simulation_and_the_cli():
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    from pathlib import Path

    from test_architecture import violations

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    rules = project["tool"]["fedmfs"]["architecture"]
    rooms = [r.strip() for layer in rules["layers"] for r in layer.split("|")]
    free = {r for r in rooms if "ray" not in rules["forbidden"].get(r, [])}
    assert free == {"fedmfs.sim", "fedmfs.cli"}
    fake = {"fedmfs.edge.x": "def f():\n    import ray\n", "fedmfs.sim.y": "import ray.cluster_utils\n"}
    assert violations(fake, rules) == ["fedmfs.edge.x imports ray, which fedmfs.edge must never import"]
    assert "ray" in project["project"]["optional-dependencies"]["cluster"][0]
    assert not any("ray" in d for d in project["project"]["optional-dependencies"]["full"])
