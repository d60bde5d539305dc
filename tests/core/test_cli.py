"""The `fedmfs` command: simulate end to end (report, plots, summary), config errors, help."""

import json
import subprocess
import sys

import pytest

from fedmfs.cli import main


def test_simulate_writes_report_plots_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["simulate", "--rounds", "1", "--method", "fedmfs", "--gamma", "2", "--seed", "1",
               "--out", str(out), "--quiet"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["gamma"] == 2 and rep["config"]["seed"] == 1 and len(rep["rounds"]) == 1
    r = rep["rounds"][0]
    assert 0 <= r["accuracy"] <= 1 and r["upload_bytes"] == sum(u["bytes"] for u in r["uploads"])
    for c in r["clients"].values():
        # at most gamma, and only modalities whose score shows value (the evidence priority)
        assert 1 <= len(c["chosen"]) <= 2
        best = max(c["shapley"].values())
        assert all(c["shapley"][m] >= 0.2 * best > 0 for m in c["chosen"])
    for png in ("accuracy_vs_mb.png", "shapley_per_round.png", "uploads_per_modality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final mean accuracy" in (out / "summary.md").read_text()
    assert "final accuracy" in capsys.readouterr().out


def test_config_file_and_precedence(tmp_path):
    cfg = tmp_path / "sim.toml"
    cfg.write_text('method = "local"\nrounds = 1\ngamma = 3\n[train]\nepochs = 1\nmin_steps = 0\n')
    out = tmp_path / "o"
    assert main(["simulate", "--config", str(cfg), "--gamma", "1", "--out", str(out), "--quiet", "--no-plots"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["method"] == "local" and rep["config"]["gamma"] == 1  # command line wins
    assert rep["config"]["train"]["epochs"] == 1 and rep["total_upload_bytes"] == 0


@pytest.mark.parametrize("text,needle", [
    ('rounds = 1\nround = 2\n', "unknown key 'round'"),
    ('rounds = "ten"\n', "key 'rounds' must be a int"),
    ('[train]\nepoch = 1\n', "unknown key 'epoch'"),
    ('method = "best"\n', "unknown method 'best'"),
    ('rounds = [1\n', "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    rc = main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_help_explains():
    out = subprocess.run([sys.executable, "-m", "fedmfs.cli", "simulate", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for opt in ("--preset", "--method", "--rounds", "--gamma", "--alpha-s", "--alpha-c", "--alpha-r",
                "--cap-bytes", "--seed", "--out", "--transport", "--broker"):
        assert opt in out
