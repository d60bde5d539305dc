"""fedmfs.sim.report: the run report built from the coordinator's ledger, checked against the ledger
itself, and the files write_report produces. One tiny in-process run (2 clients, 2 rounds) is shared."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import sqlite3

import numpy as np
import pytest

from fedmfs.coordinator.ledger import Ledger
from fedmfs.core.data.format import Fleet
from fedmfs.core.data.synthetic import make_synthetic
from fedmfs.core.payload import decode_model, state_digest
from fedmfs.core.records import RoundRecord
from fedmfs.core.settings import TrainConfig
from fedmfs.core.wire import decode_global
from fedmfs.sim.config import SimConfig
from fedmfs.sim.driver import run_simulation
from fedmfs.sim.report import build_report, summary_markdown, write_report

PNGS = ("accuracy_vs_mb.png", "shapley_per_round.png", "uploads_per_modality.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    f = make_synthetic("small", 0)
    fleet = Fleet(f.spec, f.clients[:2], f.metadata)
    cfg = SimConfig.build("fedmfs", rounds=2, seed=0,
                          train=TrainConfig(min_steps=0, epochs=1, fusion_steps=10, shapley_samples=8))
    work = tmp_path_factory.mktemp("sim") / "w"
    returned = run_simulation(fleet, cfg, "inproc", workdir=work)
    state = work / "coordinator"
    return {"fleet": fleet, "cfg": cfg, "state": state, "returned": returned}


@pytest.fixture(scope="module")
def report(run):
    return build_report(run["fleet"], run["cfg"], run["state"], "inproc")


@pytest.fixture(scope="module")
def ledger(run):
    """What the ledger holds, read once (read-only)."""
    led = Ledger(run["state"], readonly=True)
    try:
        globals_ = []
        for g in led.latest_globals():
            _, payload = decode_global(led.global_frame(g), None)
            globals_.append({**g, "payload": payload})
        return {"rounds": led.rounds(), "uploads": led.uploads(), "reports": led.reports(),
                "evaluations": led.evaluations(), "refusals": led.refusals(), "globals": globals_}
    finally:
        led.close()


def test_the_run_filled_the_ledger(run, ledger):
    """Preconditions of the comparisons below: something to compare."""
    assert [r.round for r in ledger["rounds"]] == [0, 1]
    assert all(r.closed_at is not None for r in ledger["rounds"])
    assert len(ledger["uploads"]) >= 2
    assert {(x.round, x.device) for x in ledger["reports"]} == {(r, c.name) for r in (0, 1)
                                                               for c in run["fleet"].clients}
    assert {(e.round, e.device) for e in ledger["evaluations"]} == {(r, c.name) for r in (0, 1)
                                                                   for c in run["fleet"].clients}


def test_envelope(run, report):
    fleet, cfg = run["fleet"], run["cfg"]
    assert report["fedmfs_report"] == 1
    assert report["transport"] == "inproc"
    assert report["config"] == cfg.to_dict()
    assert report["config"]["method"] == "fedmfs" and report["config"]["rounds"] == 2
    assert report["dataset"]["spec"] == fleet.spec.to_dict()
    assert report["dataset"]["clients"] == {
        c.name: {"modalities": list(c.modalities), "train": c.n_train, "test": len(c) - c.n_train}
        for c in fleet.clients}
    assert report["dataset"]["metadata"] == fleet.metadata
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    json.dumps(report)   # JSON as is


def test_run_simulation_returns_the_same_report(run, report):
    returned = dict(run["returned"])
    assert returned.pop("wall_seconds") > 0
    assert returned == report


def test_upload_bytes_per_round_and_cumulative(report, ledger, run):
    fleet = run["fleet"]
    names = fleet.spec.names
    order = [c.name for c in fleet.clients]
    cumulative = 0
    for row in report["rounds"]:
        ups = [u for u in ledger["uploads"] if u["round"] == row["round"]]
        assert ups, "every round of fedmfs with gamma 1 has uploads"
        want = sorted(ups, key=lambda u: (order.index(u["device"]), names.index(u["modality"])))
        assert row["uploads"] == [{"device": u["device"], "modality": u["modality"], "bytes": u["nbytes"]}
                                  for u in want]
        assert row["upload_bytes"] == sum(u["nbytes"] for u in ups)
        cumulative += row["upload_bytes"]
        assert row["cumulative_bytes"] == cumulative
    assert report["total_upload_bytes"] == cumulative == sum(u["nbytes"] for u in ledger["uploads"])


def test_accuracy_is_the_mean_of_the_evaluations(report, ledger):
    for row in report["rounds"]:
        evs = [e for e in ledger["evaluations"] if e.round == row["round"]]
        assert row["client_accuracy"] == {e.device: e.accuracy for e in evs}
        assert row["accuracy"] == pytest.approx(float(np.mean([e.accuracy for e in evs])), abs=1e-15)
        assert 0.0 <= row["accuracy"] <= 1.0
    assert report["final_accuracy"] == report["rounds"][-1]["accuracy"]


def test_clients_records_are_the_ledgers_reports(report, ledger):
    for row in report["rounds"]:
        reps = {x.device: x for x in ledger["reports"] if x.round == row["round"]}
        assert set(row["clients"]) == set(reps)
        for device, c in row["clients"].items():
            x = reps[device]
            assert c == {**x.record.to_dict(), "accepted": list(x.accepted)}
            rec = RoundRecord.from_dict({k: v for k, v in c.items() if k != "accepted"})
            assert rec == x.record
            # what was accepted is what the ledger holds for that device and round
            assert sorted(c["accepted"]) == sorted(u["modality"] for u in ledger["uploads"]
                                                   if u["round"] == row["round"] and u["device"] == device)
            for u in row["uploads"]:
                if u["device"] == device:
                    assert u["bytes"] == c["sizes"][u["modality"]]


def test_wire_bytes_and_refusals(report, ledger):
    total = 0
    for row in report["rounds"]:
        wire = sum(x.wire_bytes for x in ledger["reports"] if x.round == row["round"])
        assert row["wire_bytes"] == wire
        total += wire
        assert row["refusals"] == [x for x in ledger["refusals"] if x["round"] == row["round"]]
        assert row["aggregated"] == next(r.aggregated for r in ledger["rounds"] if r.round == row["round"])
    assert report["wire_bytes"] == total
    assert total > report["total_upload_bytes"] > 0       # framing costs something
    assert report["wire_over_payload"] == pytest.approx(total / report["total_upload_bytes"])


def test_global_versions_count_aggregations(report, ledger, run):
    names = run["fleet"].spec.names
    counts = dict.fromkeys(names, 0)
    for row, rr in zip(report["rounds"], ledger["rounds"], strict=True):
        for m in rr.aggregated:
            counts[m] += 1
        assert row["global_versions"] == counts
    # the ledger's newest global of each modality has that version (version 0 is the initial model)
    assert {g["modality"]: g["version"] for g in ledger["globals"]} == counts
    assert sum(counts.values()) >= 1


def test_digests_are_the_ledgers_latest_globals(report, ledger, run):
    want = {g["modality"]: state_digest(decode_model(g["payload"])[1]) for g in ledger["globals"]}
    assert report["global_digests"] == want
    assert set(want) == set(run["fleet"].spec.names)
    for g in ledger["globals"]:
        assert hashlib.sha256(g["payload"]).hexdigest() == g["sha256"]


def test_extra_fields_pass_through(run):
    rep = build_report(run["fleet"], run["cfg"], run["state"], "mqtt", note="x", broker="mqtt://127.0.0.1:1")
    assert rep["transport"] == "mqtt"
    assert rep["note"] == "x" and rep["broker"] == "mqtt://127.0.0.1:1"


# ------------------------------------------------------------------------------------ write_report

def test_write_report_with_plots(report, tmp_path):
    rep = copy.deepcopy(report)
    out = tmp_path / "out" / "nested"
    path = write_report(rep, out, plots=True)
    assert path == out / "report.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps({**report, "plots": list(PNGS)}))   # report.json names its plots
    for png in PNGS:
        data = (out / png).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", png
    assert rep["plots"] == list(PNGS)
    md = (out / "summary.md").read_text()
    assert md.startswith("# fedmfs run: fedmfs\n")
    final = f"{report['final_accuracy'] * 100:.2f}%"
    assert f"final mean accuracy: **{final}**" in md
    assert "transport: inproc" in md
    for r in report["rounds"]:
        assert f"| {r['round']} | {r['accuracy'] * 100:.2f}% | {r['upload_bytes'] / 1e6:.4f} | " \
               f"{r['cumulative_bytes'] / 1e6:.4f} |" in md
    for png in PNGS:
        assert f"![{png}]({png})" in md
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.json", "summary.md", *PNGS])


def test_write_report_without_plots(report, tmp_path):
    rep = copy.deepcopy(report)
    write_report(rep, tmp_path, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "summary.md"]
    assert "plots" not in rep
    md = (tmp_path / "summary.md").read_text()
    assert md == summary_markdown(report)
    assert "![" not in md
    assert json.loads((tmp_path / "report.json").read_text())["final_accuracy"] == report["final_accuracy"]


def test_summary_counts_uploads_per_modality(report):
    md = summary_markdown(report)
    counts: dict[str, int] = {}
    for r in report["rounds"]:
        for u in r["uploads"]:
            counts[u["modality"]] = counts.get(u["modality"], 0) + 1
    line = "Uploads per modality: " + ", ".join(f"{m} {n}" for m, n in sorted(counts.items()))
    assert line in md.splitlines()
    total_mb = report["total_upload_bytes"] / 1e6
    assert f"total upload: **{total_mb:.3f} MB**" in md
    names = [m["name"] for m in report["dataset"]["spec"]["modalities"]]
    assert f"- clients: 2, modalities: {', '.join(names)}" in md.splitlines()


# ------------------------------------------------------------------- a round nobody evaluated

@pytest.fixture
def unevaluated_round(run, tmp_path):
    """A copy of the run's ledger in which round 0 has no evaluations (devices that never reported
    their Stage #2 accuracy), and the report build_report makes of it."""
    state = tmp_path / "coordinator"
    shutil.copytree(run["state"], state)
    db = sqlite3.connect(state / "ledger.sqlite")
    with db:
        db.execute("DELETE FROM evaluations WHERE round = 0")
    db.close()
    return build_report(run["fleet"], run["cfg"], state, "inproc")


def test_a_round_without_evaluations_has_no_accuracy(unevaluated_round, report):
    rep = unevaluated_round
    assert rep["rounds"][0]["accuracy"] is None
    assert rep["rounds"][0]["client_accuracy"] == {}
    assert rep["rounds"][1]["accuracy"] == report["rounds"][1]["accuracy"]
    assert rep["rounds"][0]["upload_bytes"] == report["rounds"][0]["upload_bytes"]


@pytest.mark.parametrize("plots", [False, True])
def test_write_report_accepts_a_round_without_accuracy(unevaluated_round, tmp_path, plots):
    write_report(unevaluated_round, tmp_path, plots=plots)
    assert (tmp_path / "summary.md").exists()


# ------------------------------------------------------------------- broker passwords stay out of files

SECRET = "s3cret-pw"


def test_write_report_redacts_a_broker_password(report, tmp_path):
    rep = {**copy.deepcopy(report), "broker": f"mqtt://alice:{SECRET}@broker.lan:1884"}
    write_report(rep, tmp_path, plots=False)
    assert json.loads((tmp_path / "report.json").read_text())["broker"] == "mqtt://alice:***@broker.lan:1884"
    for p in tmp_path.iterdir():
        assert SECRET.encode() not in p.read_bytes(), p


class _Exited:
    """A service process that has already exited 0 (the run itself is not what this test is about)."""

    returncode = 0

    def poll(self):
        return 0

    def kill(self):
        pass

    def wait(self, timeout=None):
        return 0


def test_mqtt_simulation_keeps_the_broker_password_out_of_report_and_workdir(run, tmp_path, monkeypatch):
    from fedmfs.coordinator.config import load_coordinator_config
    from fedmfs.edge.config import load_edge_config
    from fedmfs.sim import processes

    monkeypatch.setenv("FEDMFS_BROKER", "mqtt://elsewhere:1")    # --broker beats the environment
    spawned, cleared = [], []

    def popen(args, stdout=None, stderr=None, env=None):
        spawned.append((args, env))
        return _Exited()

    monkeypatch.setattr(processes.subprocess, "Popen", popen)
    monkeypatch.setattr(processes, "build_report", lambda *a, **kw: {})
    monkeypatch.setattr(processes, "_clear_retained", lambda url, *a: cleared.append(url))
    url = f"mqtt://alice:{SECRET}@127.0.0.1:1884"
    work = tmp_path / "work"
    rep = processes.run_mqtt_simulation(run["fleet"], run["cfg"], url, workdir=work)
    assert rep["broker"] == "mqtt://alice:***@127.0.0.1:1884"
    assert cleared == [url]                      # the cleanup still logs in with the password
    assert spawned and SECRET not in json.dumps([a for a, _ in spawned])   # nor on a command line (ps)
    assert all("FEDMFS_BROKER" not in env for _, env in spawned)         # the services use the URL given
    monkeypatch.delenv("FEDMFS_BROKER")
    holders = [p for p in work.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert [p.name for p in holders] == ["broker.password"]
    assert holders[0].stat().st_mode & 0o777 == 0o600
    # and the services still get it: the URL gives host, port and user, the password file the rest
    coord = load_coordinator_config(work / "coordinator.toml").broker
    assert (coord.host, coord.port, coord.username, coord.password) == ("127.0.0.1", 1884, "alice", SECRET)
    for edge_toml in work.glob("edge-*.toml"):
        b = load_edge_config(edge_toml).broker
        assert (b.username, b.password) == ("alice", SECRET)


def test_mqtt_simulation_without_a_password_writes_no_password_file(run, tmp_path, monkeypatch):
    from fedmfs.sim import processes

    monkeypatch.setattr(processes, "_spawn", lambda args, log: _Exited())
    monkeypatch.setattr(processes, "build_report", lambda *a, **kw: {})
    monkeypatch.setattr(processes, "_clear_retained", lambda url, *a: None)
    rep = processes.run_mqtt_simulation(run["fleet"], run["cfg"], "mqtt://127.0.0.1:1884", workdir=tmp_path)
    assert rep["broker"] == "mqtt://127.0.0.1:1884"
    assert not (tmp_path / "broker.password").exists()
    assert "password_file" not in (tmp_path / "coordinator.toml").read_text()
