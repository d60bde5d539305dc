"""The example broker config (systemd/mosquitto-fedmfs.conf + mosquitto-fedmfs.acl) on a real Mosquitto.

The files are used as they are, with only the listener port and the file paths rewritten, included
from a main config shaped like Debian's /etc/mosquitto/mosquitto.conf (persistence on), over TLS with
a throw-away CA. What is shown: the broker starts; anonymous clients, wrong passwords and plain TCP
are refused; a device reads and writes only its own topics of its fleet; a device presenting the
coordinator's client id neither takes over nor disconnects the coordinator; a largest chunk frame
fits the packet limit and the largest global frame is within it; the per-client queue is bounded.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from netutil import free_port

from fedmfs.core.wire.limits import MAX_CHUNK_BYTES, MAX_UPLOAD_BYTES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "systemd" / "mosquitto-fedmfs.conf"
ACL = ROOT / "systemd" / "mosquitto-fedmfs.acl"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
FLEET = "kitchen"                    # the example fleet (examples/*.toml), fixed in the example ACL
BASE = f"fedmfs/v1/{FLEET}"
COORDINATOR_ID = f"fedmfs-coordinator-{FLEET}"     # coordinator/service.py's fixed client id
PASSWORDS = {"coordinator": "c-secret", "s00": "s00-secret", "s06": "s06-secret", "s99": "s99-secret"}
WAIT = 10.0


def conf_values(key: str) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in CONF.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#") and line.split()[0] == key]


# --- certificates, passwords, the broker ------------------------------------------------------------

def _make_pki(d: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, ca, sans=()):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
             .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(stem, key, crt):
        (d / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        (d / f"{stem}.crt").write_bytes(crt.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmfs test CA")])
    ca = cert("fedmfs test CA", ca_key, ca_name, ca_key, True)
    write("ca", ca_key, ca)
    key = ec.generate_private_key(ec.SECP256R1())
    write("broker", key, cert("localhost", key, ca_name, ca_key, False,
                              [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]))
    key = ec.generate_private_key(ec.SECP256R1())
    write("s00-client", key, cert("s00", key, ca_name, ca_key, False))
    return {n: d / n for n in ("ca.crt", "broker.crt", "broker.key", "s00-client.crt", "s00-client.key")}


def _password_line(user: str, password: str) -> str:
    """A Mosquitto password file line ($6$: salted SHA-512, what mosquitto_passwd 1.x wrote; 2.x reads it)."""
    salt = os.urandom(12)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return f"{user}:$6${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass
class Broker:
    port: int
    proc: subprocess.Popen
    pki: dict[str, Path]
    log: Path
    conf: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_broker(d: Path, edit=lambda text: text) -> Broker:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    pki = _make_pki(d)
    passwd = d / "fedmfs.passwd"
    passwd.write_text("".join(_password_line(u, p) + "\n" for u, p in PASSWORDS.items()))
    passwd.chmod(0o600)
    (d / "fedmfs.acl").write_text(ACL.read_text())
    (d / "conf.d").mkdir()
    (d / "data").mkdir()
    log = d / "mosquitto.log"
    for _ in range(5):
        port = free_port()
        text = CONF.read_text()
        for old, new in (("listener 8883\n", f"listener {port} 127.0.0.1\n"),
                         ("\ncafile /etc/mosquitto/certs/ca.crt\n", f"\ncafile {pki['ca.crt']}\n"),
                         ("\ncertfile /etc/mosquitto/certs/broker.crt\n", f"\ncertfile {pki['broker.crt']}\n"),
                         ("\nkeyfile /etc/mosquitto/certs/broker.key\n", f"\nkeyfile {pki['broker.key']}\n"),
                         ("\npassword_file /etc/mosquitto/fedmfs.passwd\n", f"\npassword_file {passwd}\n"),
                         ("\nacl_file /etc/mosquitto/fedmfs.acl\n", f"\nacl_file {d / 'fedmfs.acl'}\n")):
            assert text.count(old) == 1, f"{CONF.name} no longer has {old!r} once"
            text = text.replace(old, new)
        conf = d / "conf.d" / "fedmfs.conf"
        conf.write_text(edit(text))
        # Debian's /etc/mosquitto/mosquitto.conf, paths rewritten; `user`: a broker started as root
        # would switch to the user mosquitto, who cannot reach pytest's temporary directories
        main = d / "mosquitto.conf"
        main.write_text(("user root\n" if os.geteuid() == 0 else "")
                        + f"pid_file {d / 'mosquitto.pid'}\npersistence true\npersistence_location {d / 'data'}/\n"
                        f"log_dest file {log}\nlog_type all\ninclude_dir {d / 'conf.d'}\n")
        proc = subprocess.Popen([MOSQUITTO, "-c", str(main)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        end = time.monotonic() + WAIT
        while time.monotonic() < end and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return Broker(port, proc, pki, log, conf)
            except OSError:
                time.sleep(0.05)
        err = proc.stderr.read().decode() if proc.poll() is not None else ""
        proc.kill()
        proc.wait(5)
        if "Address already in use" not in err + (log.read_text() if log.exists() else ""):
            pytest.fail(f"mosquitto did not start with {CONF.name}: {err}\n{log.read_text() if log.exists() else ''}")
    pytest.fail("mosquitto did not start (no free port)")


@pytest.fixture
def broker(tmp_path):
    b = start_broker(tmp_path)
    yield b
    b.stop()


# --- clients -----------------------------------------------------------------------------------------

@dataclass
class Client:
    """A paho client (MQTT 5, TLS) that records what happens to it."""
    c: object
    connected: threading.Event = field(default_factory=threading.Event)
    connack: list = field(default_factory=list)
    disconnects: list = field(default_factory=list)
    messages: list = field(default_factory=list)
    subacks: dict = field(default_factory=dict)
    pubacks: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def subscribe(self, topic: str) -> str:
        rc, mid = self.c.subscribe(topic, 1)
        assert rc == 0
        _wait(lambda: mid in self.subacks, f"SUBACK for {topic}")
        return str(self.subacks[mid][0])

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> str:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        _wait(lambda: info.mid in self.pubacks, f"PUBACK for {topic}", timeout=60)
        return str(self.pubacks[info.mid])

    def stop(self) -> None:
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


def _wait(pred, what: str, timeout: float = WAIT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def connect(broker: Broker, user: str | None, password: str | None = None, client_id: str = "",
            persistent: bool = False, tls: bool = True, cert: str | None = None, expect: bool = True) -> Client:
    import paho.mqtt.client as mqtt
    from paho.mqtt.client import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    cl = Client(c)
    if user is not None:
        c.username_pw_set(user, PASSWORDS.get(user) if password is None else password)
    if tls:
        c.tls_set(ca_certs=str(broker.pki["ca.crt"]),
                  certfile=str(broker.pki[f"{cert}-client.crt"]) if cert else None,
                  keyfile=str(broker.pki[f"{cert}-client.key"]) if cert else None)

    def on_connect(client, userdata, flags, rc, props):
        cl.connack.append(str(rc))
        if not rc.is_failure:
            cl.connected.set()

    def on_disconnect(client, userdata, flags, rc, props):
        cl.disconnects.append(str(rc))

    def on_message(client, userdata, msg):
        with cl.lock:
            cl.messages.append((msg.topic, len(msg.payload)))

    def on_subscribe(client, userdata, mid, rcs, props):
        cl.subacks[mid] = rcs

    def on_publish(client, userdata, mid, rc, props):
        cl.pubacks[mid] = rc

    c.on_connect, c.on_disconnect, c.on_message = on_connect, on_disconnect, on_message
    c.on_subscribe, c.on_publish = on_subscribe, on_publish
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if persistent else 0
    try:
        c.connect("127.0.0.1", broker.port, 30, clean_start=not persistent, properties=props)
    except OSError:
        if expect:
            raise
        cl.connack.append("socket error")
        return cl
    c.loop_start()
    if expect:
        _wait(cl.connected.is_set, f"{user} connected ({cl.connack})")
    else:
        _wait(lambda: cl.connack or cl.disconnects, f"{user} refused")
        c.loop_stop()
    return cl


# --- the tests ---------------------------------------------------------------------------------------

def test_the_config_is_current_mosquitto_2():
    assert not conf_values("message_size_limit"), "deprecated in Mosquitto 2: max_packet_size"
    assert conf_values("use_username_as_clientid") == ["true"]
    assert conf_values("allow_anonymous") == ["false"]
    assert int(conf_values("max_queued_bytes")[0]) > 0 and int(conf_values("max_queued_messages")[0]) > 0
    assert not conf_values("persistence_location"), "Debian's mosquitto.conf sets it; a second one stops mosquitto"
    for key in ("cafile", "certfile", "keyfile", "require_certificate", "password_file", "acl_file"):
        assert conf_values(key), key
    acl = [ln for ln in ACL.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for line in acl:   # everything is under the one fleet; every device topic is the device's own
        assert line.split()[-1].startswith(f"{BASE}/") or line.startswith("user "), line
        if "/device/" in line:
            assert line.startswith("pattern ") and f"{BASE}/device/%u/" in line, line
        if line.startswith("pattern "):
            assert "%u" in line, line


def test_largest_frames_fit_the_packet_limit(broker):
    limit = int(conf_values("max_packet_size")[0])
    mqtt_overhead = 5 + 2 + 512 + 2 + 64          # fixed header, topic, packet id, properties
    assert 4 + 2 + 65535 + MAX_UPLOAD_BYTES + mqtt_overhead <= limit   # a signed global frame, header at most
    assert 56 + MAX_CHUNK_BYTES + mqtt_overhead <= limit                 # a chunk frame
    coord = connect(broker, "coordinator", client_id=COORDINATOR_ID)
    dev = connect(broker, "s00")
    try:
        assert coord.subscribe(f"{BASE}/device/+/upload/#") == "Granted QoS 1"
        assert dev.publish(f"{BASE}/device/s00/upload/0/eye", bytes(56 + MAX_CHUNK_BYTES)) == "Success"
        _wait(lambda: (f"{BASE}/device/s00/upload/0/eye", 56 + MAX_CHUNK_BYTES) in coord.messages, "the chunk",
              timeout=60)
    finally:
        dev.stop()
        coord.stop()


def test_anonymous_wrong_password_and_plain_tcp_are_refused(broker):
    assert connect(broker, None, expect=False).connack[0] == "Not authorized"
    assert connect(broker, "s00", "wrong", expect=False).connack[0] in ("Bad user name or password", "Not authorized")
    plain = connect(broker, "s00", tls=False, expect=False)
    assert not plain.connected.is_set()
    # the client id does not stand in for a user name
    assert connect(broker, None, client_id="s00", expect=False).connack[0] == "Not authorized"


def test_a_device_reads_and_writes_only_its_own_topics_of_its_fleet(broker):
    coord = connect(broker, "coordinator", client_id=COORDINATOR_ID, persistent=True)
    dev = connect(broker, "s00", client_id=f"fedmfs-edge-{FLEET}-s00")
    other = connect(broker, "s06")
    stranger = connect(broker, "s99")
    try:
        assert coord.subscribe(f"{BASE}/#") == "Granted QoS 1"
        assert coord.publish("fedmfs/v1/other/round") == "Not authorized"      # the coordinator: its fleet only
        ok = [f"{BASE}/device/s00/upload/0/eye", f"{BASE}/device/s00/report", f"{BASE}/device/s00/status"]
        refused = [f"{BASE}/device/s06/report", f"{BASE}/device/s06/upload/0/eye", f"{BASE}/device/s06/status",
                   f"{BASE}/round", f"{BASE}/global/eye", f"{BASE}/device/s00/config", f"{BASE}/device/s00/ack",
                   f"{BASE}/device/s00/upload/0/eye/extra", f"{BASE}/device/s00",
                   "fedmfs/v1/other/device/s00/report", "fedmfs/v1/other/device/s00/upload/0/eye",
                   "fedmfs/v1/other/round", "elsewhere/s00"]
        for t in ok:
            assert dev.publish(t) == "Success", t
        for t in refused:
            assert dev.publish(t) == "Not authorized", t
        _wait(lambda: {m[0] for m in coord.messages} >= set(ok), "the device's own messages")
        time.sleep(0.5)
        assert {m[0] for m in coord.messages} == set(ok)
        # reading (Mosquitto grants any subscription and filters what it delivers): the round, the
        # globals and its own config and acks; nothing of another device or another fleet
        for t in ("#", "fedmfs/v1/+/round", f"{BASE}/device/+/report"):
            assert dev.subscribe(t) == "Granted QoS 1", t
        for t in (f"{BASE}/round", f"{BASE}/global/eye", f"{BASE}/device/s00/config", f"{BASE}/device/s00/ack",
                  f"{BASE}/device/s06/config", f"{BASE}/device/s06/ack"):
            assert coord.publish(t) == "Success", t
        for t in (f"{BASE}/device/s06/report", f"{BASE}/device/s06/upload/0/eye", f"{BASE}/device/s06/status"):
            assert other.publish(t) == "Success", t
        mine = {f"{BASE}/round", f"{BASE}/global/eye", f"{BASE}/device/s00/config", f"{BASE}/device/s00/ack"}
        _wait(lambda: {m[0] for m in dev.messages} >= mine, "the device's messages")
        time.sleep(0.5)
        assert {m[0] for m in dev.messages} == mine
        # a user with a password but no block in the ACL file reads no round and no globals
        assert stranger.subscribe("#") == "Granted QoS 1"
        assert coord.publish(f"{BASE}/round", retain=True) == "Success"
        assert coord.publish(f"{BASE}/global/eye", retain=True) == "Success"
        assert stranger.subscribe(f"{BASE}/round") == "Granted QoS 1"
        _wait(lambda: len(dev.messages) >= len(mine) + 2, "the device to get the round and global again")
        time.sleep(0.5)
        assert stranger.messages == []
    finally:
        stranger.stop()
        other.stop()
        dev.stop()
        coord.stop()


def _impersonate(broker: Broker) -> tuple[Client, Client]:
    """The coordinator connects with its fixed client id; then device s00 presents the same client id."""
    coord = connect(broker, "coordinator", client_id=COORDINATOR_ID, persistent=True)
    assert coord.subscribe(f"{BASE}/device/+/report") == "Granted QoS 1"
    rogue = connect(broker, "s00", client_id=COORDINATOR_ID, persistent=True)
    time.sleep(1.0)
    return coord, rogue


def test_a_device_with_the_coordinators_client_id_cannot_disconnect_it(broker):
    coord, rogue = _impersonate(broker)
    try:
        assert coord.connected.is_set() and not coord.disconnects, coord.disconnects
        # the rogue got its user name as client id: it is just s00, with s00's rights
        assert rogue.publish(f"{BASE}/device/s00/report") == "Success"
        assert rogue.publish(f"{BASE}/device/s06/report") == "Not authorized"
        _wait(lambda: (f"{BASE}/device/s00/report", 1) in coord.messages, "the report")
        assert not coord.disconnects
        log = broker.log.read_text()
        assert "already connected, closing old connection" not in log
        assert re.search(r"New client connected from \S+ as s00 \(.*u's00'\)", log), log
    finally:
        rogue.stop()
        coord.stop()


def test_without_use_username_as_clientid_the_coordinator_would_be_disconnected(tmp_path):
    """The control: the same scenario on the config without that line takes the coordinator's session."""
    b = start_broker(tmp_path, lambda t: t.replace("use_username_as_clientid true", "use_username_as_clientid false"))
    try:
        coord, rogue = _impersonate(b)
        try:
            _wait(lambda: coord.disconnects, "the coordinator to be disconnected")
            assert f"Client {COORDINATOR_ID} already connected, closing old connection" in b.log.read_text()
        finally:
            rogue.stop()
            coord.stop()
    finally:
        b.stop()


def test_the_broker_starts_without_warnings_and_only_on_its_tls_listener(broker):
    log = broker.log.read_text()
    assert "Warning" not in log and "Error" not in log, log
    ports = set(re.findall(r"Opening ipv[46] listen socket on port (\d+)", log))
    assert ports == {str(broker.port)}, log          # no default listener on 1883


def test_the_queue_of_an_absent_coordinator_is_bounded(broker):
    """An absent coordinator's persistent session keeps at most about max_queued_bytes of chunks."""
    limit = int(conf_values("max_queued_bytes")[0])
    size = 1 << 20
    sent = limit // size + 16
    coord = connect(broker, "coordinator", client_id=COORDINATOR_ID, persistent=True)
    assert coord.subscribe(f"{BASE}/device/+/upload/#") == "Granted QoS 1"
    coord.stop()
    dev = connect(broker, "s00")
    try:
        for i in range(sent):
            assert dev.publish(f"{BASE}/device/s00/upload/0/m{i % 10}", bytes(size)) == "Success"
    finally:
        dev.stop()
    coord = connect(broker, "coordinator", client_id=COORDINATOR_ID, persistent=True)
    try:
        last = -1
        end = time.monotonic() + 60
        while time.monotonic() < end:     # until nothing more arrives for a second
            n = len(coord.messages)
            if n == last and n:
                break
            last = n
            time.sleep(1.0)
        got = len(coord.messages)
        print(f"queued for the absent coordinator: {got} of {sent} chunks of {size} bytes (max_queued_bytes {limit})")
        assert 0 < got <= limit // size + 1 < sent, (got, sent)
    finally:
        coord.stop()


def test_the_optional_client_certificate(tmp_path):
    """``require_certificate true``: a client without a certificate signed by cafile is refused."""
    b = start_broker(tmp_path, lambda t: re.sub(r"(?m)^require_certificate false$", "require_certificate true", t))
    try:
        assert not connect(b, "s00", expect=False).connected.is_set()
        ok = connect(b, "s00", cert="s00")
        ok.stop()
    finally:
        b.stop()
