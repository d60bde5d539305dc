"""Secrets and file modes on the coordinator: the signing key is written 0600 (also over an existing
looser file), the ledger and its state dir are private, and a key the service cannot read or parse
is a configuration error (exit 2) that names the file, its mode and owner, and the fix."""

from __future__ import annotations

import json
import os
import pathlib
import stat

import pytest

from fedmfs.coordinator.cli import main
from fedmfs.coordinator.ledger import Ledger
from fedmfs.coordinator.service import load_signer
from fedmfs.core.errors import ConfigError
from fedmfs.core.modality import ACTIONSENSE_MODALITIES, DatasetSpec
from fedmfs.core.wire import Signer, generate_keypair
from fedmfs.core.wire.signing import load_private_key, write_private_key


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)    # what a shell outside systemd usually has
    try:
        yield
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------- keygen

def test_keygen_force_over_a_world_readable_file_leaves_it_0600(tmp_path, umask_022, capsys):
    out = tmp_path / "coordinator.key"
    out.write_text("old key\n")
    os.chmod(out, 0o644)
    assert main(["keygen", "--out", str(out), "--force"]) == 0
    assert _mode(out) == 0o600
    priv = out.read_text().strip()
    assert Signer(priv).public_hex() == (tmp_path / "coordinator.key.pub").read_text().strip()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []    # no temp file left


def test_keygen_new_file_is_0600_and_refuses_to_overwrite_without_force(tmp_path, umask_022, capsys):
    out = tmp_path / "etc" / "coordinator.key"
    assert main(["keygen", "--out", str(out)]) == 0
    assert _mode(out) == 0o600
    first = out.read_text()
    assert main(["keygen", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == first


def test_write_private_key_is_0600_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        p = tmp_path / "k"
        p.write_text("x")
        os.chmod(p, 0o666)
        priv, _ = generate_keypair()
        write_private_key(p, priv)
    finally:
        os.umask(old)
    assert _mode(p) == 0o600 and p.read_text().strip() == priv


# ------------------------------------------------------------------------------------------- ledger

def test_ledger_and_its_wal_files_are_private(tmp_path, umask_022):
    state = tmp_path / "state"
    led = Ledger(state)
    try:
        led.put_meta("fleet", "lab")             # a write: the -wal and -shm files exist now
        assert _mode(state) == 0o700
        for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
            assert (state / name).exists(), name
            assert _mode(state / name) == 0o600, name
    finally:
        led.close()


def test_an_existing_world_readable_ledger_is_made_private(tmp_path, umask_022):
    led = Ledger(tmp_path)
    led.put_meta("fleet", "lab")
    led.close()
    os.chmod(tmp_path / "ledger.sqlite", 0o644)
    led = Ledger(tmp_path)
    try:
        assert _mode(tmp_path / "ledger.sqlite") == 0o600
        assert led.get_meta("fleet") == "lab"
    finally:
        led.close()


# ----------------------------------------------------------------------------- loading the signing key

def _coordinator_toml(tmp_path) -> os.PathLike:
    (tmp_path / "spec.json").write_text(json.dumps(DatasetSpec(ACTIONSENSE_MODALITIES, 20, 100).to_dict()))
    (tmp_path / "fleet.toml").write_text('[[device]]\nid = "a"\n')
    p = tmp_path / "c.toml"
    p.write_text('fleet = "lab"\nstate_dir = "s"\nspec = "spec.json"\nfleet_file = "fleet.toml"\n'
                 'signing_key = "coordinator.key"\n')
    return p


def _deny_reading(monkeypatch, path) -> None:
    """The service user cannot read ``path`` (also when the tests run as root, who can read anything)."""
    real_open, real_path_open = os.open, pathlib.Path.open

    def denied(p):
        return PermissionError(13, "Permission denied", os.fspath(p))

    def fake_open(p, flags, *a, **kw):
        if os.fspath(p) == os.fspath(path) and not flags & (os.O_WRONLY | os.O_RDWR):
            raise denied(p)
        return real_open(p, flags, *a, **kw)

    def fake_path_open(self, mode="r", *a, **kw):
        if os.fspath(self) == os.fspath(path) and not any(c in mode for c in "wax+"):
            raise denied(self)
        return real_path_open(self, mode, *a, **kw)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(pathlib.Path, "open", fake_path_open)


def test_unreadable_key_is_a_config_error_naming_file_mode_owner_and_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FEDMFS_BROKER", raising=False)
    cfg = _coordinator_toml(tmp_path)
    key = tmp_path / "coordinator.key"
    write_private_key(key, generate_keypair()[0])
    _deny_reading(monkeypatch, key)
    rc = main(["run", "--config", str(cfg), "--connect-timeout", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert str(key) in err and "mode 600" in err
    assert f"uid {os.getuid()}" in err or "owner" in err
    assert "chown" in err and "chmod 600" in err
    assert not (tmp_path / "s" / "ledger.sqlite").exists()     # refused before any state was touched


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_really_unreadable_key_is_a_config_error(tmp_path):
    key = tmp_path / "k"
    write_private_key(key, generate_keypair()[0])
    os.chmod(key, 0)
    with pytest.raises(ConfigError, match="mode 000"):
        load_signer(key)


@pytest.mark.parametrize("text", ["not hex\n", "ab" * 31 + "\n", "", "\xff\xfe"])
def test_malformed_key_names_the_file_and_the_fix(tmp_path, text):
    key = tmp_path / "k"
    key.write_text(text, encoding="latin-1")
    with pytest.raises(ConfigError) as ei:
        load_private_key(key)
    msg = str(ei.value)
    assert str(key) in msg and "keygen" in msg and "64 hex digits" in msg


def test_missing_key_names_keygen(tmp_path):
    with pytest.raises(ConfigError, match="fedmfs-coordinator keygen --out"):
        load_signer(tmp_path / "nope.key")


def test_a_directory_as_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_signer(tmp_path)


def test_load_private_key_round_trip(tmp_path):
    priv, pub = generate_keypair()
    write_private_key(tmp_path / "k", priv)
    assert load_private_key(tmp_path / "k").public_hex() == pub
