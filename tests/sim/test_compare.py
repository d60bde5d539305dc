"""The comparison protocol (fedmfs.sim.compare) on hand-computable figures; runs are faked, not trained."""

from __future__ import annotations

import json
import math

import pytest

from fedmfs.core.data.synthetic import PRESETS
from fedmfs.sim import compare
from fedmfs.sim.compare import (
    SyntheticFleet,
    Variant,
    accuracy_at_bytes,
    default_variants,
    format_summary,
    mean_ci,
    modality_payload_sizes,
    paired_diff_ci,
    pareto_front,
    pareto_plot,
    run_grid,
    summarize,
)
from fedmfs.sim.config import SimConfig

T2 = 4.302652729911275     # Student t, 97.5% quantile, 2 degrees of freedom


def test_mean_ci_by_hand():
    m, h = mean_ci([1.0, 2.0, 3.0])                    # s = 1, n = 3
    assert m == pytest.approx(2.0) and h == pytest.approx(T2 / math.sqrt(3), rel=1e-9)
    m, h = mean_ci([0.5, 0.7])                         # s = 0.1414.., t(0.975, 1) = 12.7062..
    assert m == pytest.approx(0.6) and h == pytest.approx(12.706204736174707 * math.sqrt(0.02) / math.sqrt(2))
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 0.0)
    m, h = mean_ci([5.0])
    assert m == 5.0 and math.isnan(h)
    m, h = mean_ci([None, float("nan")])
    assert math.isnan(m) and math.isnan(h)
    assert mean_ci([1.0, None, 2.0, 3.0]) == mean_ci([1.0, 2.0, 3.0])      # missing values are left out
    m90, h90 = mean_ci([1.0, 2.0, 3.0], level=0.90)                      # t(0.95, 2) = 2.91999
    assert h90 == pytest.approx(2.919985580355516 / math.sqrt(3), rel=1e-9)


def test_paired_diff_ci_by_hand():
    m, h = paired_diff_ci([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])             # differences 2, 3, 4
    assert m == pytest.approx(3.0) and h == pytest.approx(T2 / math.sqrt(3), rel=1e-9)
    m, h = paired_diff_ci([3.0, None, 5.0], [1.0, 1.0, 2.0])            # the pair with None is dropped: 2, 3
    assert m == pytest.approx(2.5)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_diff_ci([1.0], [1.0, 2.0])


def _rows(accs, per_round):
    return [{"round": i, "accuracy": a, "upload_bytes": per_round} for i, a in enumerate(accs)]


def test_accuracy_at_bytes_table_ii_rule():
    rows = _rows([0.1, 0.2, 0.3], 10)                  # cumulative 10, 20, 30
    assert accuracy_at_bytes(rows, 9) is None         # round 0 alone overspends
    assert accuracy_at_bytes(rows, 10) == 0.1          # at most the budget: equal fits
    assert accuracy_at_bytes(rows, 25) == 0.2
    assert accuracy_at_bytes(rows, 30) == 0.3
    assert accuracy_at_bytes(rows, 1e9) == 0.3         # a run that did not spend the budget: its final round
    uneven = [{"accuracy": 0.5, "upload_bytes": 5}, {"accuracy": 0.9, "upload_bytes": 100},
              {"accuracy": 0.4, "upload_bytes": 0}]
    assert accuracy_at_bytes(uneven, 104) == 0.5 and accuracy_at_bytes(uneven, 105) == 0.4


def _run(variant, seed, accs, per_round, method=None, family="method"):
    return {"variant": variant, "method": method or variant, "family": family, "seed": seed, "split": "test",
            "rounds": _rows(accs, per_round), "final_accuracy": accs[-1],
            "total_upload_bytes": per_round * len(accs), "seconds": 1.0}


RUNS = [
    _run("fedmfs", 0, [0.5, 0.6, 0.7], 100), _run("fedmfs", 1, [0.5, 0.6, 0.8], 100),
    _run("fedmfs", 2, [0.5, 0.7, 0.9], 100),
    _run("all", 0, [0.6, 0.7, 0.8], 1000), _run("all", 1, [0.6, 0.8, 0.8], 1000),
    _run("all", 2, [0.6, 0.8, 0.9], 1000),
]


def test_summary_at_equal_rounds():
    s = summarize(RUNS)
    f, a = s["variants"]["fedmfs"], s["variants"]["all"]
    assert f["final_accuracy"]["mean"] == pytest.approx(0.8)
    assert f["final_accuracy"]["ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3))
    assert f["final_accuracy"]["n"] == 3 and f["seeds"] == [0, 1, 2]
    assert f["total_mb"]["mean"] == pytest.approx(300e-6) and f["total_mb"]["ci"] == 0.0
    assert f["bytes_ratio"] == pytest.approx(0.1) and a["bytes_ratio"] == pytest.approx(1.0)
    d = f["diff_vs_baseline"]                           # -0.1, 0, 0: mean -1/30, s = 0.057735
    assert d["mean"] == pytest.approx(-1 / 30) and d["n"] == 3
    assert d["ci"] == pytest.approx(T2 * math.sqrt(0.02 / 6) / math.sqrt(3))
    assert a["diff_vs_baseline"]["mean"] == 0.0
    # the default budgets: FedMFS's mean total (300 B) and half of it; `all` spends 1000 B in round 0
    b1, b2 = s["equal_bytes"]
    assert b1["budget_bytes"] == 300 and b2["budget_bytes"] == 150
    assert b1["accuracy"]["fedmfs"]["mean"] == pytest.approx(0.8) and b2["accuracy"]["fedmfs"]["mean"] == 0.5
    assert math.isnan(b1["accuracy"]["all"]["mean"]) and b1["accuracy"]["all"]["n"] == 0
    assert b1["rounds_used"] == {"fedmfs": 3.0, "all": 0.0} and b2["rounds_used"]["fedmfs"] == 1.0
    assert b1["diff"]["all"]["n"] == 0 and "holistic" not in b1["diff"]
    h = s["headline"][0]                                # ratio 0.1 is <= 1/10, -3.3 points is not within 1
    assert h["variant"] == "fedmfs" and h["bytes_ok"] and not h["met"] and not h["met_ci"]
    text = format_summary(s)
    assert "80.00 ± 24.84" in text and "-3.33 ± 14.34" in text and "NOT met" in text


def test_default_budget_is_the_largest_reference_total():
    runs = [_run("fedmfs", 0, [0.5, 0.6, 0.7], 100), _run("fedmfs", 1, [0.5, 0.6, 0.8], 120), *RUNS[3:5]]
    s = summarize(runs)
    assert [e["budget_bytes"] for e in s["equal_bytes"]] == [360, 180]
    assert s["equal_bytes"][0]["rounds_used"]["fedmfs"] == 3.0        # every FedMFS run fits whole


def test_summary_at_explicit_budgets():
    s = summarize(RUNS, budgets=[1000, 2500])
    e1, e2 = s["equal_bytes"]
    assert e1["accuracy"]["all"]["mean"] == pytest.approx(0.6) and e1["accuracy"]["all"]["ci"] == 0.0
    d = e1["diff"]["all"]                               # 0.7-0.6, 0.8-0.6, 0.9-0.6
    assert d["mean"] == pytest.approx(0.2) and d["ci"] == pytest.approx(T2 * 0.1 / math.sqrt(3)) and d["n"] == 3
    assert e2["accuracy"]["all"]["mean"] == pytest.approx((0.7 + 0.8 + 0.8) / 3)   # round 1 fits 2500
    assert e2["rounds_used"]["all"] == 2.0


def test_headline_met_when_close_and_cheap():
    runs = [_run("fedmfs", s, [0.8 + 0.001 * s], 10) for s in range(3)] + \
           [_run("all", s, [0.8 + 0.002 * s], 1000) for s in range(3)] + \
           [_run("fedmfs-int8", s, [0.7], 10) for s in range(3)]
    h = {x["variant"]: x for x in summarize(runs)["headline"]}
    assert h["fedmfs"]["met"] and h["fedmfs"]["met_ci"] and h["fedmfs"]["bytes_ratio"] == pytest.approx(0.01)
    assert h["fedmfs-int8"]["bytes_ok"] and not h["fedmfs-int8"]["met"]


def test_pareto_front_and_plot(tmp_path):
    pts = [(1, 50), (2, 60), (2, 55), (3, 58), (0.5, 40), (4, 70), (math.nan, 99), (4, 70)]
    assert pareto_front(pts) == [4, 0, 1, 5]
    assert pareto_front([]) == []
    p = pareto_plot(summarize(RUNS), tmp_path / "sub" / "pareto.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_variants_build_for_the_small_fleet():
    vs = default_variants()
    names = [v.name for v in vs]
    assert len(set(names)) == len(names)
    for need in ("fedmfs", "all", "random", "holistic", "fedmfs-g2", "fedmfs-g3", "fedmfs-fp16", "fedmfs-int8"):
        assert need in names
    fams = {v.family for v in vs}
    assert fams == {"method", "gamma", "codec", "alpha", "cap", "priority", "evidence", "compute"}
    # the paper's priority formula and the evidence gate's share, around the default (issue 17)
    assert {"fedmfs-paper", "fedmfs-ev0.1", "fedmfs-ev0.35"} <= set(names)
    spec = PRESETS["small"].spec()
    sizes = modality_payload_sizes(spec)
    largest = max(sizes.values())
    assert max(sizes, key=lambda m: sizes[m]).startswith("tactile")
    assert modality_payload_sizes(spec, "int8")["eye"] < sizes["eye"]
    for v in vs:
        cfg = SimConfig.build(v.method, rounds=1, seed=0, **v.sim_kwargs(spec))
        assert cfg.method == v.method
        if v.family == "cap":
            assert cfg.policy.gamma == len(spec.names)
            assert v.cap_of_largest is not None
            assert cfg.policy.cap_bytes == int(v.cap_of_largest * largest)
            assert cfg.policy.cap_bytes < sum(sizes.values())       # the cap binds
    byname = {v.name: v for v in vs}
    assert SimConfig.build("random", **byname["random"].sim_kwargs(spec)).policy.gamma == \
        SimConfig.build("fedmfs", **byname["fedmfs"].sim_kwargs(spec)).policy.gamma
    assert byname["fedmfs-int8"].sim_kwargs(spec) == {"codec": "int8"}
    cap8 = Variant("c", "fedmfs", {"codec": "int8"}, cap_of_largest=1.0).sim_kwargs(spec)
    assert cap8["cap_bytes"] == max(modality_payload_sizes(spec, "int8").values())


def test_run_grid_plumbing(monkeypatch):
    """Splits, order, settings and callbacks, with the simulation itself faked."""
    seen = []

    def fake(fleet, cfg, transport="inproc", **kw):
        seen.append((fleet, cfg, transport))
        acc = 0.5 + 0.01 * (cfg.seed % 100)
        rows = [{"round": r, "accuracy": acc, "upload_bytes": 7, "cumulative_bytes": 7 * (r + 1), "extra": 1}
                for r in range(cfg.rounds)]
        return {"rounds": rows, "final_accuracy": acc, "total_upload_bytes": 7 * cfg.rounds}

    monkeypatch.setattr("fedmfs.sim.driver.run_simulation", fake)
    factory = SyntheticFleet("small", clients=2)
    vs = [Variant("fedmfs", "fedmfs"), Variant("int8", "fedmfs", {"codec": "int8", "gamma": 2}, "codec")]
    told: list[dict] = []
    rows = run_grid(factory, vs, [100, 101], 2, "validation", on_run=told.append)
    assert [(r["variant"], r["seed"]) for r in rows] == [("fedmfs", 100), ("fedmfs", 101), ("int8", 100), ("int8", 101)]
    assert told == rows
    fleet, cfg, transport = seen[2]
    assert transport == "inproc" and len(fleet.clients) == 2
    assert fleet.metadata["split"] == "validation" and fleet.metadata["validation"]["seed"] == 100
    assert cfg.policy.codec == "int8" and cfg.policy.gamma == 2 and cfg.seed == 100 and cfg.rounds == 2
    orig = factory(100)
    assert sum(len(c) for c in fleet.clients) == sum(c.n_train for c in orig.clients)
    r = rows[2]
    assert r["split"] == "validation" and r["family"] == "codec" and r["config"]["codec"] == "int8"
    assert r["rounds"][1] == {"round": 1, "accuracy": 0.5, "upload_bytes": 7, "cumulative_bytes": 14, "uploaded": {},
                              "skipped": {}}
    assert r["total_upload_bytes"] == 14 and r["final_accuracy"] == 0.5
    seen.clear()
    run_grid(factory, vs[:1], [0], 1, "test")
    assert "split" not in seen[0][0].metadata
    with pytest.raises(ValueError, match="split"):
        run_grid(factory, vs, [0], 1, "train")
    with pytest.raises(ValueError, match="unique"):
        run_grid(factory, [vs[0], vs[0]], [0], 1)
    assert compare.REPORTING_SEEDS == (0, 1, 2, 3, 4) and not set(compare.TUNING_SEEDS) & set(compare.REPORTING_SEEDS)


def test_ranking_checks_count_separation_and_spearman_against_the_truth():
    from fedmfs.sim.compare import ranking_checks

    meta = {"noise_modalities": ["n1", "n2"],
            "shapley_truth": {"A": {"a": 0.3, "b": 0.1, "n1": 0.0, "n2": 0.0},
                              "B": {"a": 0.3, "b": 0.1, "n1": 0.0, "n2": 0.0}}}
    runs = [{"variant": "fedmfs", "method": "fedmfs", "seed": 0,
             "last_shapley": {"A": {"a": 2.0, "b": 1.0, "n1": -0.1, "n2": 0.0},     # separated, rho 1
                              "B": {"a": 2.0, "b": -0.5, "n1": 0.2, "n2": -0.3}}},  # n1 above b
            {"variant": "all", "method": "all", "seed": 0, "last_shapley": {"A": {"a": 1.0}}}]
    got = ranking_checks(runs, lambda seed: meta)
    assert list(got) == ["fedmfs"]
    r = got["fedmfs"]
    assert r["separated"] == 0.5 and r["clients"] == 2
    assert r["misses"] == ["seed 0 B: n1 +0.2 >= b -0.5"]
    # A: ranks (4,3,1,2) vs truth (4,3,1.5,1.5): rho = 0.9487; B: ranks (4,1,3,2) vs the same truth: 0.3162
    assert r["spearman"]["mean"] == pytest.approx((0.948683 + 0.316228) / 2, abs=1e-5)


def test_saved_grids_load_as_one_and_refuse_to_mix(tmp_path):
    from fedmfs.sim.compare import load_runs

    def grid(name, rounds, variants_seeds):
        runs = [{"variant": v, "seed": s, "final_accuracy": 0.5, "rounds": []} for v, s in variants_seeds]
        p = tmp_path / name
        p.write_text(json.dumps({"args": {"preset": "headroom", "rounds": rounds, "split": "test"}, "runs": runs}))
        return p

    a = grid("a.json", 8, [("fedmfs", 0), ("all", 0)])
    b = grid("b.json", 8, [("fedmfs-g3", 0), ("fedmfs-g3", 1)])
    runs, meta = load_runs([a, b])
    assert [(r["variant"], r["seed"]) for r in runs] == [("fedmfs", 0), ("all", 0), ("fedmfs-g3", 0), ("fedmfs-g3", 1)]
    assert meta["seeds"] == [0, 1] and meta["variants"] == ["fedmfs", "all", "fedmfs-g3"]
    with pytest.raises(ValueError, match="rounds 20"):
        load_runs([a, grid("c.json", 20, [("random", 0)])])
    with pytest.raises(ValueError, match="fedmfs seed 0 is also in"):
        load_runs([a, grid("d.json", 8, [("fedmfs", 0)])])


def test_the_summary_counts_noise_uploads_cpu_and_skipped_trainings():
    """Issue 17: the share of uploads that were pure noise, CPU per round and idle trainings skipped, per
    variant (mean ± CI over seeds); runs saved without them read as n/a."""
    from fedmfs.sim.compare import format_summary, summarize

    def run(variant, seed, ups, skipped, cpu):
        rows = [{"round": r, "accuracy": 0.5, "upload_bytes": 10, "cumulative_bytes": 10 * (r + 1),
                 "uploaded": ups[r], "skipped": skipped[r]} for r in range(2)]
        return {"variant": variant, "method": "fedmfs", "seed": seed, "rounds": rows, "final_accuracy": 0.5,
                "total_upload_bytes": 20, "seconds": 1.0, "cpu_seconds": cpu}

    runs = [run("fedmfs", 0, [{"eye": 3, "noise3": 1}, {"eye": 4}], [{"noise3": 2}, {"noise3": 2}], 4.0),
            run("fedmfs", 1, [{"eye": 4}, {"xsens": 4}], [{}, {"noise64": 1}], 6.0),
            run("all", 0, [{"eye": 2, "noise3": 2}, {"eye": 2, "noise3": 2}], [{}, {}], 8.0),
            run("all", 1, [{"eye": 2, "noise3": 2}, {"eye": 2, "noise3": 2}], [{}, {}], 8.0)]
    old = run("random", 0, [{}, {}], [{}, {}], 1.0)
    for r in old["rounds"]:
        del r["uploaded"], r["skipped"]
    del old["cpu_seconds"]
    s = summarize(runs + [old], baseline="all", reference="fedmfs")
    v = s["variants"]
    assert v["fedmfs"]["noise_upload_share"]["mean"] == pytest.approx((1 / 8 + 0) / 2)
    assert v["all"]["noise_upload_share"]["mean"] == pytest.approx(0.5)
    assert v["fedmfs"]["cpu_per_round"]["mean"] == pytest.approx((2.0 + 3.0) / 2)
    assert v["fedmfs"]["skipped_per_round"]["mean"] == pytest.approx((2.0 + 0.5) / 2)
    assert v["random"]["noise_upload_share"]["n"] == 0 and v["random"]["cpu_per_round"]["n"] == 0
    text = format_summary(s)
    assert "noise uploads %" in text and "6.25" in text
