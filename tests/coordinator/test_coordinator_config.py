"""TOML config errors name the key and the fix; the example configs parse."""

import json
from pathlib import Path

import pytest

from fedmfs.coordinator.config import load_coordinator_config, load_fleet_file
from fedmfs.core.errors import ConfigError
from fedmfs.core.modality import ACTIONSENSE_MODALITIES, DatasetSpec
from fedmfs.core.selection import SelectionPolicy
from fedmfs.core.wire import DEFAULT_MAX_SAMPLES
from fedmfs.edge.config import load_edge_config

ROOT = Path(__file__).resolve().parents[2]


def test_example_fleet_file_parses():
    devs = load_fleet_file(ROOT / "examples" / "devices.toml")
    assert [(d.device, d.policy.cap_bytes, d.policy.gamma, d.policy.alphas.c, d.max_samples) for d in devs] == [
        ("s00", 200000, 1, SelectionPolicy().alphas.c, 2000), ("s06", 80000, 2, 0.5, 1000)]


def test_max_samples_from_the_device_the_defaults_or_the_protocol_default(tmp_path):
    p = tmp_path / "fleet.toml"
    p.write_text('[defaults]\nmax_samples = 500\n[[device]]\nid = "a"\n[[device]]\nid = "b"\nmax_samples = 70\n')
    assert [(d.device, d.max_samples) for d in load_fleet_file(p)] == [("a", 500), ("b", 70)]
    p.write_text('[[device]]\nid = "a"\n')
    assert load_fleet_file(p)[0].max_samples == DEFAULT_MAX_SAMPLES == 10_000
    for bad, words in [("0", "max_samples must be an integer in"), ("2147483648", "max_samples must be"),
                       ('"many"', "'max_samples' must be a int")]:
        p.write_text(f'[[device]]\nid = "a"\nmax_samples = {bad}\n')
        with pytest.raises(ConfigError, match=words):
            load_fleet_file(p)


@pytest.mark.parametrize("text, words", [
    ('[[device]]\nid = "a"\ncap = 5\n', "unknown key 'cap'"),
    ('[[device]]\ngamma = 1\n', "missing key 'id'"),
    ('[[device]]\nid = "a"\ngamma = "two"\n', "'gamma' must be a int"),
    ('[[device]]\nid = "a/b"\n', "device 'a/b' must match"),
    ('[[device]]\nid = "a"\n[[device]]\nid = "a"\n', "duplicate device ids"),
    ('[defaults]\ngamma = 1\n', "no devices"),
    ('[[device]]\nid = "a"\nmethod = "best"\n', "unknown method 'best'"),
    ('[[device]\n', "not valid TOML"),
])
def test_fleet_file_errors(tmp_path, text, words):
    p = tmp_path / "fleet.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_fleet_file(p)


def _coordinator(tmp_path, extra=""):
    (tmp_path / "spec.json").write_text(json.dumps(DatasetSpec(ACTIONSENSE_MODALITIES, 20, 100).to_dict()))
    (tmp_path / "fleet.toml").write_text('[[device]]\nid = "a"\n')
    p = tmp_path / "c.toml"
    p.write_text('fleet = "lab"\nstate_dir = "s"\nspec = "spec.json"\nfleet_file = "fleet.toml"\n'
                 'signing_key = "k"\n' + extra)
    return p


def test_coordinator_config_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMFS_BROKER", raising=False)
    cfg = load_coordinator_config(_coordinator(tmp_path, "[rounds]\ntotal = 3\nseconds = 5\n[broker]\nport = 1999\n"))
    assert (cfg.policy.rounds_total, cfg.policy.round_seconds, cfg.broker.port) == (3, 5.0, 1999)
    assert cfg.state_dir == tmp_path / "s"
    assert (cfg.policy.aggregation, cfg.policy.max_update_ratio, cfg.policy.min_update_rms) == ("weighted_mean", 1.0, 0.01)
    cfg = load_coordinator_config(_coordinator(
        tmp_path, '[rounds]\naggregation = "median"\nmax_update_ratio = 0.5\nmin_update_rms = 0\n'))
    assert (cfg.policy.aggregation, cfg.policy.max_update_ratio, cfg.policy.min_update_rms) == ("median", 0.5, 0.0)
    assert load_coordinator_config(_coordinator(tmp_path, "[rounds]\nmax_update_ratio = inf\n")
                                   ).policy.max_update_ratio == float("inf")
    monkeypatch.setenv("FEDMFS_BROKER", "mqtt://10.0.0.1:1884")   # env beats the file
    assert load_coordinator_config(_coordinator(tmp_path)).broker.port == 1884
    for extra, words in [("[rounds]\nquorum = 0\n", "quorum must be >= 1"),
                         ("[rounds]\ntotl = 3\n", "unknown key 'totl'"),
                         ("[rounds]\nmax_update_ratio = -1\n", "max_update_ratio must be a number >= 0"),
                         ("[rounds]\nmax_update_ratio = nan\n", "max_update_ratio must be"),
                         ('[rounds]\naggregation = "mode"\n', "unknown aggregation rule 'mode'"),
                         ("[broker]\nprotocol = \"4\"\n", "protocol must be"),
                         ('fleet_name = "x"\n', "unknown key 'fleet_name'")]:
        with pytest.raises(ConfigError, match=words):
            load_coordinator_config(_coordinator(tmp_path, extra))


def test_edge_config_errors(tmp_path):
    p = tmp_path / "edge.toml"
    p.write_text('device = "a"\nfleet = "lab"\ndata = "a.npz"\nspec = "s.json"\nstate_dir = "st"\n')
    with pytest.raises(ConfigError, match="coordinator_key"):
        load_edge_config(p)
    p.write_text(p.read_text() + 'coordinator_key = "' + "ab" * 32 + '"\n')
    cfg = load_edge_config(p)
    assert cfg.data == tmp_path / "a.npz" and cfg.ack_timeout == 10.0
