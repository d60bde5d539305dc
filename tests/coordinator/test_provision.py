"""`enrol` / `revoke` on files (coordinator/provision.py): what each writes, modes, idempotence, and the
refusals. The broker reading these files is tests/coordinator/test_enrol_tls.py."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from fedmfs.coordinator.config import load_provision_config
from fedmfs.coordinator.provision import (
    ACL_BEGIN,
    ACL_END,
    acl_lines,
    check_password,
    enrol,
    password_line,
    revoke,
)
from fedmfs.core.errors import ConfigError
from fedmfs.core.wire import generate_keypair
from fedmfs.core.wire.signing import write_private_key

ROOT = Path(__file__).resolve().parents[2]
FLEET_FILE = """# the kitchen fleet
[defaults]
gamma = 1

[[device]]
id = "s00"
cap_bytes = 200000      # payload bytes per round

# a smaller device
[[device]]
id = "s06"
cap_bytes = 80000
"""


@pytest.fixture
def gw(tmp_path):
    from test_broker_config import _make_pki

    (tmp_path / "pki").mkdir()
    _make_pki(tmp_path / "pki")
    priv, pub = generate_keypair()
    write_private_key(tmp_path / "coordinator.key", priv)
    (tmp_path / "fleet.toml").write_text(FLEET_FILE)
    (tmp_path / "fedmfs.acl").write_text((ROOT / "systemd" / "mosquitto-fedmfs.acl").read_text())
    (tmp_path / "fedmfs.passwd").write_text(password_line("coordinator", "c") + "\n")
    (tmp_path / "fedmfs.passwd").chmod(0o640)
    (tmp_path / "coordinator.toml").write_text(
        'fleet = "kitchen"\nstate_dir = "state"\nspec = "fleet.json"\nfleet_file = "fleet.toml"\n'
        'signing_key = "coordinator.key"\n[broker]\nhost = "127.0.0.1"\nport = 8883\nusername = "coordinator"\n'
        'tls_ca = "pki/ca.crt"\n[provision]\nhost = "gateway.local"\npassword_file = "fedmfs.passwd"\n'
        'acl_file = "fedmfs.acl"\nca_key = "pki/ca.key"\ncrl_file = "fedmfs.crl"\ncert_days = 30\n')
    return tmp_path, load_provision_config(tmp_path / "coordinator.toml"), pub


def _users(path: Path) -> list[str]:
    return [ln.split(":")[0] for ln in path.read_text().splitlines()]


def _section(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return lines[lines.index(ACL_BEGIN) + 1:lines.index(ACL_END)]


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd not installed")
def test_password_line_is_what_mosquitto_passwd_writes(tmp_path):
    f = tmp_path / "p"
    f.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(f), "dev1", "pa55"], check=True, timeout=30)
    line = f.read_text().strip()
    _, _, iterations, salt, _ = line.split("$")
    assert line == password_line("dev1", "pa55", base64.b64decode(salt), int(iterations))
    assert check_password(line, "pa55") and not check_password(line, "pa56")
    assert check_password(password_line("dev1", "x"), "x")


def test_enrol_writes_the_device_and_the_gateway_files(gw):
    d, cfg, pub = gw
    res = enrol(cfg, "s07", d / "out")
    out = d / "out"
    assert sorted(p.name for p in res.files) == ["ca.crt", "edge.password", "edge.toml"]
    assert (out / "edge.password").stat().st_mode & 0o777 == 0o600
    password = (out / "edge.password").read_text().strip()
    assert len(password) >= 40
    line = [ln for ln in (d / "fedmfs.passwd").read_text().splitlines() if ln.startswith("s07:")]
    assert len(line) == 1 and check_password(line[0], password)
    assert (d / "fedmfs.passwd").stat().st_mode & 0o777 == 0o640      # the broker's file keeps its mode
    assert _section(d / "fedmfs.acl") == acl_lines("kitchen", "s07") + [""]
    assert "topic write fedmfs/v1/kitchen/device/s07/upload/+/+" in acl_lines("kitchen", "s07")
    assert (d / "fleet.toml").read_text() == FLEET_FILE + '\n[[device]]\nid = "s07"\n'
    assert (out / "ca.crt").read_bytes() == (d / "pki" / "ca.crt").read_bytes()
    from fedmfs.edge.config import load_edge_config

    e = load_edge_config(out / "edge.toml")
    assert (e.device, e.fleet, e.coordinator_key) == ("s07", "kitchen", pub)
    b = e.broker
    assert (b.host, b.port, b.username, b.password, b.tls_ca, b.tls_cert) == \
           ("gateway.local", 8883, "s07", password, str(out / "ca.crt"), None)


def test_enrol_again_rotates_the_password_and_changes_nothing_else(gw):
    d, cfg, _ = gw
    enrol(cfg, "s07", d / "out")
    first = (d / "out" / "edge.password").read_text()
    acl, fleet = (d / "fedmfs.acl").read_text(), (d / "fleet.toml").read_text()
    res = enrol(cfg, "s07", d / "out")
    assert (d / "out" / "edge.password").read_text() != first
    assert (d / "fedmfs.acl").read_text() == acl and (d / "fleet.toml").read_text() == fleet
    assert _users(d / "fedmfs.passwd") == ["coordinator", "s07"]
    assert res.changed == [f"password of s07 set in {d / 'fedmfs.passwd'}"]


def test_enrol_a_listed_device_keeps_its_table_and_warns_of_a_hand_written_block(gw):
    d, cfg, _ = gw
    res = enrol(cfg, "s00", d / "out")
    assert (d / "fleet.toml").read_text() == FLEET_FILE
    assert any("hand-written `user s00` block" in w for w in res.warnings)


def test_revoke_undoes_enrol_and_is_idempotent(gw):
    d, cfg, _ = gw
    acl0 = (d / "fedmfs.acl").read_text()
    enrol(cfg, "s07", d / "out")
    enrol(cfg, "s08", d / "out8")
    res = revoke(cfg, "s07")
    assert len(res.changed) == 3, res.changed
    assert _users(d / "fedmfs.passwd") == ["coordinator", "s08"]
    assert _section(d / "fedmfs.acl") == acl_lines("kitchen", "s08") + [""]
    assert (d / "fleet.toml").read_text() == FLEET_FILE + '\n[[device]]\nid = "s08"\n'
    assert revoke(cfg, "s07").changed == []
    revoke(cfg, "s08")
    assert (d / "fedmfs.acl").read_text() == acl0.rstrip("\n") + f"\n\n{ACL_BEGIN}\n{ACL_END}\n"
    assert _users(d / "fedmfs.passwd") == ["coordinator"]
    # a device written by hand in the fleet file: its table goes, the comments of the next one stay
    revoke(cfg, "s00")
    assert (d / "fleet.toml").read_text() == FLEET_FILE.replace(
        '[[device]]\nid = "s00"\ncap_bytes = 200000      # payload bytes per round\n\n', "")


def test_certificates_are_issued_and_revoked_in_the_crl(gw):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    d, cfg, _ = gw
    ca = x509.load_pem_x509_certificate((d / "pki" / "ca.crt").read_bytes())
    first = enrol(cfg, "s07", d / "out", cert=True)
    crt = x509.load_pem_x509_certificate((d / "out" / "client.crt").read_bytes())
    key = serialization.load_pem_private_key((d / "out" / "client.key").read_bytes(), None)
    assert (d / "out" / "client.key").stat().st_mode & 0o777 == 0o600
    assert crt.subject.rfc4514_string() == "CN=s07" and crt.serial_number == first.serial
    assert key.public_key() == crt.public_key()
    ca.public_key().verify(crt.signature, crt.tbs_certificate_bytes, ec.ECDSA(crt.signature_hash_algorithm))
    assert 29 <= (crt.not_valid_after_utc - crt.not_valid_before_utc).days <= 31
    crl = x509.load_pem_x509_crl((d / "fedmfs.crl").read_bytes())
    assert list(crl) == [] and crl.is_signature_valid(ca.public_key())      # created empty for the broker
    from fedmfs.edge.config import load_edge_config

    b = load_edge_config(d / "out" / "edge.toml").broker
    assert (b.tls_cert, b.tls_key) == (str(d / "out" / "client.crt"), str(d / "out" / "client.key"))
    second = enrol(cfg, "s07", d / "out", cert=True)              # a new certificate revokes the older one
    crl = x509.load_pem_x509_crl((d / "fedmfs.crl").read_bytes())
    assert [r.serial_number for r in crl] == [first.serial]
    revoke(cfg, "s07")
    crl = x509.load_pem_x509_crl((d / "fedmfs.crl").read_bytes())
    assert sorted(r.serial_number for r in crl) == sorted([first.serial, second.serial])
    assert not (d / "pki" / "issued" / "s07.crt").exists()


def test_refusals(gw):
    d, cfg, _ = gw
    with pytest.raises(ConfigError, match="is the coordinator's broker user"):
        enrol(cfg, "coordinator", d / "out")
    with pytest.raises(ConfigError, match="must match"):
        enrol(cfg, "a/b", d / "out")
    with pytest.raises(ConfigError, match="must match"):
        revoke(cfg, "+")
    (d / "fedmfs.acl").write_text(f"{ACL_BEGIN}\n{ACL_END}\ntopic read fedmfs/v1/kitchen/round\n")
    with pytest.raises(ConfigError, match="a `topic` line follows the fedmfs enrol section"):
        enrol(cfg, "s07", d / "out")
    (d / "coordinator.toml").write_text((d / "coordinator.toml").read_text().replace(
        'password_file = "fedmfs.passwd"\n', ""))
    with pytest.raises(ConfigError, match=r"\[provision\] password_file is not set"):
        enrol(load_provision_config(d / "coordinator.toml"), "s07", d / "out")
    (d / "coordinator.toml").write_text((d / "coordinator.toml").read_text() + "bogus = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_provision_config(d / "coordinator.toml")


def test_the_cli(gw, capsys):
    from fedmfs.coordinator.cli import main

    d, _, _ = gw
    assert main(["enrol", "s07", "--config", str(d / "coordinator.toml"), "--out", str(d / "o")]) == 0
    out = capsys.readouterr().out
    assert "systemctl reload mosquitto" in out and "edge.toml, edge.password, ca.crt" in out
    assert main(["revoke", "s07", "--config", str(d / "coordinator.toml")]) == 0
    assert main(["revoke", "s07", "--config", str(d / "coordinator.toml")]) == 0
    assert "nothing to revoke" in capsys.readouterr().out
    assert main(["enrol", "coordinator", "--config", str(d / "coordinator.toml")]) == 2


@pytest.mark.integration
def test_a_revoked_certificate_is_refused_after_a_broker_reload(tmp_path):
    """With ``require_certificate true`` and ``crlfile``: enrol --cert connects; after revoke (its
    password put back, so that only the CRL refuses it) and SIGHUP, the same certificate is refused."""
    import re
    import signal

    from test_broker_config import _wait, connect, start_broker

    from fedmfs.coordinator.provision import _crl_add

    b = tmp_path / "broker"
    b.mkdir()
    priv, _ = generate_keypair()
    write_private_key(tmp_path / "coordinator.key", priv)
    (tmp_path / "coordinator.toml").write_text(
        'fleet = "kitchen"\nstate_dir = "state"\nspec = "fleet.json"\nfleet_file = "fleet.toml"\n'
        'signing_key = "coordinator.key"\n[broker]\nusername = "coordinator"\ntls_ca = "broker/ca.crt"\n'
        '[provision]\npassword_file = "broker/fedmfs.passwd"\nacl_file = "broker/fedmfs.acl"\n'
        'ca_key = "broker/ca.key"\ncrl_file = "broker/fedmfs.crl"\n')

    def edit(text: str) -> str:
        _crl_add(load_provision_config(tmp_path / "coordinator.toml"), [])     # the broker needs the file
        return re.sub(r"(?m)^require_certificate false$", f"require_certificate true\ncrlfile {b / 'fedmfs.crl'}",
                      text)

    broker = start_broker(b, edit)
    try:
        cfg = load_provision_config(tmp_path / "coordinator.toml")
        enrol(cfg, "s07", tmp_path / "out", cert=True)
        password = (tmp_path / "out" / "edge.password").read_text().strip()
        broker.pki["s07-client.crt"] = tmp_path / "out" / "client.crt"
        broker.pki["s07-client.key"] = tmp_path / "out" / "client.key"
        broker.proc.send_signal(signal.SIGHUP)
        _wait(lambda: broker.log.read_text().count("Reloading config") == 1, "the reload")
        ok = connect(broker, "s07", password, cert="s07")
        ok.stop()
        line = next(ln for ln in (b / "fedmfs.passwd").read_text().splitlines() if ln.startswith("s07:"))
        revoke(cfg, "s07")
        with (b / "fedmfs.passwd").open("a") as f:
            f.write(line + "\n")
        broker.proc.send_signal(signal.SIGHUP)
        _wait(lambda: broker.log.read_text().count("Reloading config") == 2, "the reload")
        refused = connect(broker, "s07", password, cert="s07", expect=False)
        assert not refused.connected.is_set() and not refused.connack, refused.connack   # refused in TLS
    finally:
        broker.stop()
