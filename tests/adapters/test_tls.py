"""TLS settings of the broker link: each unusable file is refused before connecting with one line that
names the file and the fix (ConfigError, exit 2); a broker whose certificate does not verify with
tls_ca, or that refuses our certificate, is a permanent failure (BrokerUnavailable, exit 6) naming the
CA file and the broker. Certificates are made under tmp_path; the handshake cases run against a real
Mosquitto TLS listener (the example config, tests/test_broker_config.py)."""

from __future__ import annotations

import datetime
import queue
import re
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedmfs.adapters.mqtt import BrokerConfig, BrokerUnavailable, MqttLink, _tls_failure, check_tls_files
from fedmfs.core.errors import ConfigError

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(d: Path, stem: str = "ca") -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(_name(stem)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - DAY).not_valid_after(NOW + 100 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / f"{stem}.crt", key


def make_client(d: Path, ca: tuple[Path, ec.EllipticCurvePrivateKey], stem: str = "client",
                before: datetime.datetime = NOW - DAY, after: datetime.datetime = NOW + DAY) -> tuple[Path, Path]:
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(stem)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(before).not_valid_after(after).sign(ca[1], hashes.SHA256()))
    (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return d / f"{stem}.crt", d / f"{stem}.key"


@pytest.fixture
def pki(tmp_path):
    ca = make_ca(tmp_path)
    crt, key = make_client(tmp_path, ca)
    return {"ca": ca[0], "ca_pair": ca, "crt": crt, "key": key, "dir": tmp_path}


def _cfg(pki, **kw) -> BrokerConfig:
    base = {"host": "127.0.0.1", "port": 8883, "tls_ca": str(pki["ca"]), "tls_cert": str(pki["crt"]),
            "tls_key": str(pki["key"])}
    return BrokerConfig(**{**base, **kw})


def _refused(cfg: BrokerConfig) -> str:
    with pytest.raises(ConfigError) as e:
        check_tls_files(cfg)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg, msg
    print(msg)
    return msg


def test_good_files_pass(pki):
    check_tls_files(_cfg(pki))
    check_tls_files(_cfg(pki, tls_cert=None, tls_key=None))     # CA only: password clients
    check_tls_files(BrokerConfig())                               # no TLS at all


def test_missing_files_are_named_with_the_fix(pki):
    gone = str(pki["dir"] / "nope.crt")
    msg = _refused(_cfg(pki, tls_ca=gone))
    assert msg.startswith(f"broker CA file (tls_ca) {gone} does not exist; set [broker] tls_ca"), msg
    msg = _refused(_cfg(pki, tls_cert=gone))
    assert msg.startswith(f"client certificate (tls_cert) {gone} does not exist; set [broker] tls_cert"), msg
    msg = _refused(_cfg(pki, tls_key=gone))
    assert msg.startswith(f"client key (tls_key) {gone} does not exist; set [broker] tls_key"), msg
    msg = _refused(_cfg(pki, tls_ca=str(pki["key"])))      # a key where the CA should be
    assert f"tls_ca) {pki['key']} holds no PEM certificate" in msg, msg
    msg = _refused(_cfg(pki, tls_ca=None))
    assert "without tls_ca" in msg


def test_a_key_that_is_not_the_certificates(pki):
    _, other_key = make_client(pki["dir"], pki["ca_pair"], "other")
    msg = _refused(_cfg(pki, tls_key=str(other_key)))
    assert msg.startswith(f"client key (tls_key) {other_key} does not match client certificate (tls_cert) "
                          f"{pki['crt']} (their public keys differ)"), msg


def test_an_expired_or_not_yet_valid_client_certificate(pki):
    crt, key = make_client(pki["dir"], pki["ca_pair"], "old", before=NOW - 10 * DAY, after=NOW - 2 * DAY)
    msg = _refused(_cfg(pki, tls_cert=str(crt), tls_key=str(key)))
    assert msg.startswith(f"client certificate (tls_cert) {crt} expired on {(NOW - 2 * DAY):%Y-%m-%d}"), msg
    assert "fedmfs-coordinator enrol DEVICE --cert" in msg
    crt, key = make_client(pki["dir"], pki["ca_pair"], "new", before=NOW + 2 * DAY, after=NOW + 10 * DAY)
    assert "is not valid before" in _refused(_cfg(pki, tls_cert=str(crt), tls_key=str(key)))
    # the same certificate is fine while it is valid (the clock is the only difference)
    check_tls_files(_cfg(pki, tls_cert=str(crt), tls_key=str(key)), now=(NOW + 3 * DAY).timestamp())


def test_an_expired_ca(pki):
    with pytest.raises(ConfigError, match=r"broker CA file \(tls_ca\) .* the CA certificate 'CN=ca' expired on"):
        check_tls_files(_cfg(pki, tls_cert=None, tls_key=None), now=(NOW + 200 * DAY).timestamp())


def test_the_link_checks_before_connecting(pki):
    """MqttLink.start refuses bad files without trying the broker (nothing listens on the port)."""
    link = MqttLink(_cfg(pki, tls_key=str(pki["dir"] / "nope.key"), port=1), "x", [], queue.Queue())
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="does not exist"):
        link.start(timeout=30)
    assert time.monotonic() - t0 < 5


def test_hostname_message():
    e = ssl.SSLCertVerificationError(1, "certificate verify failed")
    e.verify_message = "Hostname mismatch, certificate is not valid for 'gw'."
    msg = _tls_failure(BrokerConfig(host="gw", port=8883, tls_ca="/x/ca.crt"), e)
    assert msg.startswith("the broker's certificate at gw:8883 is not for the name 'gw'"), msg


# --- against a real Mosquitto TLS listener ----------------------------------------------------------

@pytest.mark.integration
def test_a_broker_not_signed_by_tls_ca_is_a_permanent_failure(tmp_path):
    from test_broker_config import PASSWORDS, start_broker

    (tmp_path / "b").mkdir()
    broker = start_broker(tmp_path / "b")
    try:
        good = BrokerConfig(host="127.0.0.1", port=broker.port, username="s00", password=PASSWORDS["s00"],
                            tls_ca=str(broker.pki["ca.crt"]), protocol="5")
        link = MqttLink(good, "t", [], queue.Queue())
        link.start(timeout=20)         # the control: the right CA connects
        link.stop()
        wrong, _ = make_ca(tmp_path, "other-ca")
        link = MqttLink(BrokerConfig(host="127.0.0.1", port=broker.port, username="s00", password=PASSWORDS["s00"],
                                     tls_ca=str(wrong), protocol="5"), "t", [], queue.Queue())
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable) as e:
            link.start(timeout=60)
        msg = str(e.value)
        print(msg)
        assert time.monotonic() - t0 < 10, "a wrong CA must not be retried until the timeout"
        assert e.value.exit_code == 6 and "\n" not in msg
        assert re.match(re.escape(f"the broker's certificate at 127.0.0.1:{broker.port} does not verify with "
                                  f"tls_ca {wrong} (") + r"[a-z -]+\): "
                        + re.escape("tls_ca must be the CA that signed the broker's certificate"), msg), msg
    finally:
        broker.stop()


@pytest.mark.integration
def test_a_broker_that_requires_a_client_certificate(tmp_path):
    from test_broker_config import PASSWORDS, start_broker

    (tmp_path / "b").mkdir()
    broker = start_broker(tmp_path / "b", lambda t: re.sub(r"(?m)^require_certificate false$",
                                                           "require_certificate true", t))
    try:
        cfg = BrokerConfig(host="127.0.0.1", port=broker.port, username="s00", password=PASSWORDS["s00"],
                           tls_ca=str(broker.pki["ca.crt"]), protocol="5")
        with pytest.raises(BrokerUnavailable) as e:
            MqttLink(cfg, "t", [], queue.Queue()).start(timeout=60)
        msg = str(e.value)
        print(msg)
        assert msg.startswith(f"the broker at 127.0.0.1:{broker.port} refused the TLS handshake"), msg
        assert "with no client certificate" in msg and "tls_cert" in msg
        ok = MqttLink(BrokerConfig(host="127.0.0.1", port=broker.port, username="s00", password=PASSWORDS["s00"],
                                   tls_ca=str(broker.pki["ca.crt"]), tls_cert=str(broker.pki["s00-client.crt"]),
                                   tls_key=str(broker.pki["s00-client.key"]), protocol="5"),
                      "t", [], queue.Queue())
        ok.start(timeout=20)
        ok.stop()
    finally:
        broker.stop()
