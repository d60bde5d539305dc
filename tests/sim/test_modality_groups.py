"""Accuracy by modality set and of the rare modalities' clients (issue 17, point 5): the grouping and
the compare summary on hand-computable dicts, old saved runs without the fields, and one small real run
whose new fields must agree with its ``client_accuracy``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import TACTILE_MISSING, make_synthetic
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.compare import SyntheticFleet, accuracy_at_bytes, format_summary, load_runs, summarize
from fedmfs.sim.config import SimConfig
from fedmfs.sim.grid import Job, RunStore, execute, run_job
from fedmfs.sim.report import group_accuracy, modality_groups, report_envelope, report_json, summary_markdown

T2 = 4.302652729911275     # Student t, 97.5% quantile, 2 degrees of freedom
FULL, BARE = "a+b+t", "a+b"


# ------------------------------------------------------------------- the grouping, by hand

def test_groups_by_hand():
    g = modality_groups({"S0": ["a", "b", "t"], "S1": ["t", "b", "a"], "S2": ["b", "a"]}, ["a", "b", "t"])
    assert g["rare_modalities"] == ["t"]                     # 2 of 3 hold it: some lack it, <= 2/3 hold it
    assert g["rare_clients"] == ["S0", "S1"]
    assert g["holders"] == {"a": ["S0", "S1", "S2"], "b": ["S0", "S1", "S2"], "t": ["S0", "S1"]}
    # a set is named in spec order, whatever the order a client lists its modalities in
    assert g["sets"] == {FULL: {"modalities": ["a", "b", "t"], "clients": ["S0", "S1"]},
                         BARE: {"modalities": ["a", "b"], "clients": ["S2"]}}


@pytest.mark.parametrize("holding, rare", [(9, False), (7, False), (6, True), (1, True), (0, False)])
def test_rare_is_lacked_by_some_and_held_by_at_most_two_thirds(holding, rare):
    clients = {f"S{i}": ["a", "t"] if i < holding else ["a"] for i in range(9)}
    g = modality_groups(clients, ["a", "t"])
    assert g["rare_modalities"] == (["t"] if rare else [])
    assert g["rare_clients"] == ([f"S{i}" for i in range(holding)] if rare else [])


def test_one_client_or_a_uniform_fleet_has_no_rare_modality():
    assert modality_groups({"S0": ["a"]}, ["a", "b"])["rare_modalities"] == []
    g = modality_groups({f"S{i}": ["a", "b"] for i in range(4)}, ["a", "b"])
    assert g["rare_modalities"] == [] and list(g["sets"]) == ["a+b"]
    assert g["holders"]["b"] == ["S0", "S1", "S2", "S3"]


def test_the_synthetic_presets_tactile_gloves_are_rare():
    f = make_synthetic("small", 0)
    g = modality_groups({c.name: list(c.modalities) for c in f.clients}, f.spec.names)
    assert g["rare_modalities"] == ["tactile_left", "tactile_right"]              # 5 of 9 hold them
    assert g["rare_clients"] == [c.name for c in f.clients if c.name not in TACTILE_MISSING]
    assert [s["clients"] for s in g["sets"].values()] == [g["rare_clients"], list(TACTILE_MISSING)]


GROUPS = modality_groups({"S0": ["a", "b", "t"], "S1": ["a", "b", "t"], "S2": ["a", "b"]}, ["a", "b", "t"])


def test_group_accuracy_by_hand():
    got = group_accuracy(GROUPS, {"S0": 0.5, "S1": 0.7, "S2": 0.9})
    assert got["modality_set_accuracy"] == {FULL: pytest.approx(0.6), BARE: 0.9}
    assert got["modality_accuracy"] == {"a": pytest.approx(0.7), "b": pytest.approx(0.7), "t": pytest.approx(0.6)}
    assert got["rare_accuracy"] == pytest.approx(0.6)
    # a client without an evaluation is left out of its groups' means; a group with none has no mean
    got = group_accuracy(GROUPS, {"S0": 0.5, "S1": None})
    assert got["modality_set_accuracy"] == {FULL: 0.5, BARE: None} and got["rare_accuracy"] == 0.5
    assert group_accuracy(GROUPS, {})["rare_accuracy"] is None
    uniform = modality_groups({"S0": ["a"], "S1": ["a"]}, ["a"])
    assert group_accuracy(uniform, {"S0": 0.5, "S1": 0.7})["rare_accuracy"] is None   # nothing is rare


# ------------------------------------------------------------------- the report (no training)

def _fleet3():
    """S00 and S02 with the tactile gloves, S06 without: the gloves are rare (2 of 3)."""
    f = make_synthetic("small", 0)
    keep = [c for c in f.clients if c.name in ("S00", "S02", "S06")]
    return Fleet(f.spec, keep, f.metadata)


def _row(r, accs, nbytes=100):
    return {"round": r, "accuracy": float(np.mean(list(accs.values()))) if accs else None,
            "client_accuracy": accs, "uploads": [], "upload_bytes": nbytes, "cumulative_bytes": nbytes * (r + 1)}


def test_envelope_adds_the_group_fields_and_keeps_the_others():
    fleet, cfg = _fleet3(), SimConfig.build("fedmfs", rounds=2, seed=0)
    rows = [_row(0, {"S00": 0.4, "S02": 0.6, "S06": 0.8}), _row(1, {})]
    given = json.loads(json.dumps(rows))
    rep = report_envelope(fleet, cfg, rows, {}, "inproc")
    assert rows == given                                   # the caller's rows are not changed
    for old, new in zip(given, rep["rounds"]):
        assert {k: new[k] for k in old} == old             # every existing field as it was
        assert set(new) - set(old) == {"modality_set_accuracy", "modality_accuracy", "rare_accuracy"}
    g = rep["modality_groups"]
    assert g["rare_modalities"] == ["tactile_left", "tactile_right"] and g["rare_clients"] == ["S00", "S02"]
    r0 = rep["rounds"][0]
    assert r0["rare_accuracy"] == pytest.approx(0.5)
    assert r0["modality_set_accuracy"] == {
        "eye+emg_left+emg_right+tactile_left+tactile_right+xsens": pytest.approx(0.5),
        "eye+emg_left+emg_right+xsens": 0.8}
    assert r0["modality_accuracy"]["eye"] == pytest.approx(0.6) == pytest.approx(r0["accuracy"])
    assert r0["modality_accuracy"]["tactile_left"] == pytest.approx(0.5)
    assert rep["rounds"][1]["rare_accuracy"] is None and rep["final_rare_accuracy"] is None
    assert rep["final_accuracy"] is None
    json.loads(report_json(rep))


def test_summary_shows_the_final_rounds_modality_sets_even_for_an_older_report():
    fleet, cfg = _fleet3(), SimConfig.build("fedmfs", rounds=2, seed=0)
    rep = report_envelope(fleet, cfg, [_row(0, {"S00": 0.1, "S02": 0.2, "S06": 0.3}),
                                       _row(1, {"S00": 0.4, "S02": 0.6, "S06": 0.8})], {}, "inproc")
    md = summary_markdown(rep)
    lines = md.splitlines()
    assert "| eye+emg_left+emg_right+tactile_left+tactile_right+xsens | S00, S02 | yes | 50.00% |" in lines
    assert "| eye+emg_left+emg_right+xsens | S06 | no | 80.00% |" in lines
    assert "- clients holding a rare modality (S00, S02): **50.00%** (all clients: 60.00%)" in lines
    assert any(x.startswith("Final round (1) by modality set") and "tactile_left, tactile_right" in x for x in lines)
    assert "tactile_left 50.00%" in md and "eye 60.00%" in md
    # a report.json written before these fields: the same table, recomputed from its data set
    old = json.loads(json.dumps(rep))
    for k in ("modality_groups", "final_rare_accuracy"):
        del old[k]
    for r in old["rounds"]:
        for k in ("modality_set_accuracy", "modality_accuracy", "rare_accuracy"):
            del r[k]
    assert summary_markdown(old) == md


# ------------------------------------------------------------------- the compare summary

def _run(variant, seed, accs, rare, per_round, with_rare=True):
    rounds = [{"round": i, "accuracy": a, "upload_bytes": per_round, "cumulative_bytes": per_round * (i + 1)}
              for i, a in enumerate(accs)]
    run = {"variant": variant, "method": variant, "family": "method", "seed": seed, "split": "test",
           "rounds": rounds, "final_accuracy": accs[-1], "total_upload_bytes": per_round * len(accs), "seconds": 1.0}
    if with_rare:
        for row, x in zip(rounds, rare):
            row["rare_accuracy"] = x
        run["rare_modalities"] = ["tactile_left", "tactile_right"]
    return run


RUNS = [_run("fedmfs", s, [0.5, 0.8], [0.4, r], 100) for s, r in zip(range(3), (0.7, 0.8, 0.9))] + \
       [_run("random", s, [0.5, 0.7], [0.4, r], 100) for s, r in zip(range(3), (0.6, 0.6, 0.9))] + \
       [_run("all", s, [0.6, 0.8], [0.5, r], 1000) for s, r in zip(range(3), (0.8, 0.8, 0.8))]


def test_summary_reports_the_rare_modalities_clients_at_equal_rounds():
    s = summarize(RUNS)
    f = s["variants"]["fedmfs"]
    assert f["rare_accuracy"]["mean"] == pytest.approx(0.8) and f["rare_accuracy"]["n"] == 3
    assert f["rare_accuracy"]["ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3))
    assert f["final_accuracy"]["mean"] == pytest.approx(0.8)           # the mean's figures as before
    d = s["rare"]["diff"]["random"]                                    # 0.1, 0.2, 0.0
    assert d["mean"] == pytest.approx(0.1) and d["ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3)) and d["n"] == 3
    assert s["rare"]["diff"]["all"]["mean"] == pytest.approx(0.0)      # -0.1, 0.0, 0.1
    assert f["rare_diff_vs_baseline"]["mean"] == pytest.approx(0.0)
    assert s["rare"]["modalities"] == ["tactile_left", "tactile_right"] and s["rare"]["runs_without"] == 0
    text = format_summary(s)
    assert "rare acc %" in text and "tactile_left, tactile_right" in text
    assert "fedmfs - random (rare-modality clients): +10.00 ± 24.84 points (n = 3)" in text


def test_summary_reports_the_rare_modalities_clients_at_equal_bytes():
    s = summarize(RUNS, budgets=[150, 1000])
    e150, e1000 = s["equal_bytes"]
    # 150 B: fedmfs and random stop after round 0 (rare 0.4 each); all overspends in round 0
    assert e150["rare_accuracy"]["fedmfs"]["mean"] == pytest.approx(0.4)
    assert e150["rare_diff"]["random"]["mean"] == pytest.approx(0.0)
    assert e150["rare_diff"]["all"]["n"] == 0 and math.isnan(e150["rare_accuracy"]["all"]["mean"])
    # 1000 B: fedmfs whole (0.8 mean rare), all its round 0 (0.5)
    assert e1000["rare_accuracy"]["all"]["mean"] == pytest.approx(0.5)
    assert e1000["rare_diff"]["all"]["mean"] == pytest.approx(0.3)
    assert accuracy_at_bytes(RUNS[0]["rounds"], 150, "rare_accuracy") == 0.4
    text = format_summary(s)
    assert "fedmfs - all (rare-modality clients): +30.00 ± 24.84 points (n = 3)" in text


def test_runs_saved_without_the_field_are_na():
    old = [{**r, "rounds": [{k: v for k, v in x.items() if k != "rare_accuracy"} for x in r["rounds"]]}
           for r in RUNS]
    for r in old:
        del r["rare_modalities"]
    s = summarize(old)
    assert all(math.isnan(v["rare_accuracy"]["mean"]) and v["rare_accuracy"]["n"] == 0
               for v in s["variants"].values())
    assert s["rare"] == {"modalities": [], "runs_without": 9, "diff": s["rare"]["diff"]}
    assert all(d["n"] == 0 for d in s["rare"]["diff"].values())
    assert s["variants"]["fedmfs"]["final_accuracy"] == summarize(RUNS)["variants"]["fedmfs"]["final_accuracy"]
    text = format_summary(s)
    assert "rare acc %: n/a: 9 runs were saved without the rare-modality accuracy" in text
    # mixed: the old seed is left out of n, the pairs with it too
    mixed = summarize(old[:1] + RUNS[1:])
    assert mixed["variants"]["fedmfs"]["rare_accuracy"]["n"] == 2 and mixed["rare"]["diff"]["random"]["n"] == 2
    assert mixed["rare"]["runs_without"] == 1
    assert "1 runs saved without it count as n/a" in format_summary(mixed)


def test_a_fleet_without_rare_modalities_says_so():
    runs = [{**r, "rare_modalities": [], "rounds": [{**x, "rare_accuracy": None} for x in r["rounds"]]}
            for r in RUNS]
    text = format_summary(summarize(runs))
    assert "rare acc %: n/a: no modality is rare in these fleets" in text


def test_an_old_saved_run_still_stands_for_its_job_and_loads(tmp_path, monkeypatch):
    """A run saved before the group fields is not "saved with other settings": it is resumed, not run
    again, and its summary is n/a for the rare modalities' clients."""
    cfg = SimConfig.build("fedmfs", rounds=2, seed=0)
    job = Job(SyntheticFleet("small", clients=3), "fedmfs", "method", 0, 2, "test", 0.25, cfg)
    old = {"variant": "fedmfs", "method": "fedmfs", "family": "method", "seed": 0, "split": "test",
           "config": cfg.to_dict(), "final_accuracy": 0.5, "total_upload_bytes": 20, "seconds": 1.0,
           "rounds": [{"round": r, "accuracy": 0.5, "upload_bytes": 10, "cumulative_bytes": 10 * (r + 1)}
                      for r in range(2)], "last_shapley": {}, "ran_on": "this process"}
    RunStore(tmp_path).save(job, old)

    def refuse(job):
        raise AssertionError("the saved run should have been loaded")

    monkeypatch.setattr("fedmfs.sim.grid.run_job", refuse)
    assert execute([job], out=tmp_path) == [old]
    runs, meta = load_runs([tmp_path])                  # fedmfs compare --load DIR
    assert runs == [old] and meta["rounds"] == 2
    s = summarize(runs)
    assert s["variants"]["fedmfs"]["rare_accuracy"]["n"] == 0 and s["rare"]["runs_without"] == 1


# ------------------------------------------------------------------- one small real run

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from fedmfs.sim.driver import run_simulation

    fleet = _fleet3()
    cfg = SimConfig.build("fedmfs", rounds=1, seed=0,    # one round: several seconds on a busy machine
                          train=TrainConfig(min_steps=0, epochs=1, fusion_steps=10, shapley_samples=8))
    rep = run_simulation(fleet, cfg, "inproc", workdir=tmp_path_factory.mktemp("sim") / "w")
    return fleet, cfg, rep


def test_a_real_runs_group_fields_agree_with_its_client_accuracy(real):
    fleet, _, rep = real
    assert [c.name for c in fleet.clients] == ["S00", "S02", "S06"]
    g = rep["modality_groups"]
    assert g["rare_modalities"] == ["tactile_left", "tactile_right"] and g["rare_clients"] == ["S00", "S02"]
    assert len(rep["rounds"]) == 1
    for r in rep["rounds"]:
        ca = r["client_accuracy"]
        assert set(ca) == {"S00", "S02", "S06"}
        assert r["rare_accuracy"] == pytest.approx((ca["S00"] + ca["S02"]) / 2, abs=1e-15)
        sets = r["modality_set_accuracy"]
        assert sets["eye+emg_left+emg_right+xsens"] == ca["S06"]
        assert sets["eye+emg_left+emg_right+tactile_left+tactile_right+xsens"] == r["rare_accuracy"]
        # the sets partition the clients: their size-weighted mean is the mean over all clients
        sizes = {k: len(s["clients"]) for k, s in g["sets"].items()}
        assert sum(sizes[k] * a for k, a in sets.items()) / 3 == pytest.approx(r["accuracy"], abs=1e-12)
        assert r["modality_accuracy"]["eye"] == pytest.approx(r["accuracy"], abs=1e-15)
        assert r["modality_accuracy"]["tactile_right"] == r["rare_accuracy"]
    assert rep["final_rare_accuracy"] == rep["rounds"][-1]["rare_accuracy"]


def test_a_real_runs_compare_row_keeps_the_group_fields(real, monkeypatch):
    fleet, cfg, rep = real
    monkeypatch.setattr("fedmfs.sim.driver.run_simulation", lambda *a, **kw: rep)
    job = Job(lambda seed: fleet, "fedmfs", "method", 0, 1, "test", 0.25, cfg)
    row = run_job(job)
    assert row["rare_modalities"] == ["tactile_left", "tactile_right"]
    for saved, r in zip(row["rounds"], rep["rounds"]):
        assert saved["rare_accuracy"] == r["rare_accuracy"]
        assert saved["modality_set_accuracy"] == r["modality_set_accuracy"]
        assert saved["accuracy"] == r["accuracy"]
    s = summarize([row])
    assert s["variants"]["fedmfs"]["rare_accuracy"]["mean"] == rep["final_rare_accuracy"]
