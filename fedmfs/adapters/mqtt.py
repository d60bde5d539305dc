"""A thin paho-mqtt 2.x adapter shared by the coordinator and the edge daemon.

Policy, not mechanism, lives here: MQTT 5 first and 3.1.1 when the broker refuses it; subscriptions
are desired state re-applied on every connect; the first connection retries with exponential back-off
and jitter (later ones through paho's own back-off); bad credentials or TLS are permanent failures;
every callback catches everything (nothing may escape paho's network thread) and only enqueues, so
heavy work runs on the owner's thread; publishes can wait for the broker's PUBACK with a deadline.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import random
import re
import ssl
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fedmfs.core.config import check_keys
from fedmfs.core.errors import ConfigError, FedMFSError

__all__ = [
    "BROKER_KEYS",
    "Backoff",
    "BrokerConfig",
    "BrokerUnavailable",
    "Inbound",
    "MqttLink",
    "broker_from_table",
    "check_tls_files",
    "parse_broker_url",
    "redact_url",
    "strip_password",
]

log = logging.getLogger("fedmfs.adapters.mqtt")


class BrokerUnavailable(FedMFSError):
    """The broker could not be reached in time, or refused us for good (credentials, TLS)."""

    exit_code = 6


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)    # never in a log line or a traceback
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    keepalive: int = 30
    protocol: str = "auto"     # "auto" (5, then 3.1.1), "5" or "3.1.1"

    def __post_init__(self) -> None:
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"broker protocol must be 'auto', '5' or '3.1.1', got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker port must be in 1..65535, got {self.port}")


def redact_url(url: str) -> str:
    """``url`` with its password (if any) shown as ``***``: what may go into a report, a log or an error."""
    try:
        u = urlsplit(url)
        if u.password is None:
            return url
        host = u.netloc.rpartition("@")[2]
        return urlunsplit(u._replace(netloc=f"{u.username or ''}:***@{host}"))
    except ValueError:   # unparseable: keep nothing that might be a secret
        return "<unparseable broker URL>"


def strip_password(url: str) -> str:
    """``url`` without its password (the user name stays): what a config file may hold when the
    password goes to a ``password_file``."""
    u = urlsplit(url)
    if u.password is None:
        return url
    host = u.netloc.rpartition("@")[2]
    return urlunsplit(u._replace(netloc=f"{u.username}@{host}" if u.username else host))


def parse_broker_url(url: str) -> BrokerConfig:
    """``mqtt://[USER[:PASSWORD]@]HOST:PORT`` (or ``mqtts://`` for TLS with the system CAs)."""
    shown = redact_url(url)
    try:
        u = urlparse(url)
    except ValueError as e:
        raise ConfigError(f"broker URL {shown!r} must look like mqtt://HOST:PORT ({e})") from e
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"broker URL {shown!r} must look like mqtt://HOST:PORT")
    try:
        port = u.port
    except ValueError as e:   # not a number, or outside 0..65535 (urllib's message shows the port only)
        raise ConfigError(f"broker URL {shown!r}: the port must be a number in 1..65535 ({e})") from e
    if port is None:
        port = 8883 if u.scheme == "mqtts" else 1883
    return BrokerConfig(host=u.hostname, port=port,
                        username=u.username, password=u.password,
                        tls_ca="system" if u.scheme == "mqtts" else None)


@dataclass(frozen=True, slots=True)
class Inbound:
    """A message from the broker, as the owner's thread sees it."""

    topic: str
    payload: bytes
    retain: bool


class Backoff:
    """Exponential back-off with full jitter on the monotonic clock; reset after a real connection."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0, rng: random.Random | None = None):
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        # capped before the power can overflow: after ~1000 attempts factor ** attempt is not a float
        cap = self.maximum
        if self.factor <= 1 or self.attempt < math.log(self.maximum / self.initial, self.factor) + 1:
            cap = min(self.maximum, self.initial * self.factor ** self.attempt)
        self.attempt += 1
        return self._rng.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempt = 0


_PERMANENT = {"Bad user name or password", "Not authorized", "Client identifier not valid", "Banned"}


def _pem_certs(path: str, what: str, fix: str) -> list:
    from cryptography import x509

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(f"{what} {path} does not exist; {fix}") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{what} {path} is a directory; {fix}") from e
    except OSError as e:
        raise ConfigError(f"{what} {path} is not readable ({e.strerror or e}); make it readable by the "
                          "service user: chown fedmfs: FILE or chmod 644 FILE") from e
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"{what} {path} holds no PEM certificate ({e}); {fix}") from e


def check_tls_files(cfg: BrokerConfig, now: float | None = None) -> None:
    """Refuse unusable TLS settings before connecting, with one line naming the file and the fix: a
    missing or unreadable CA, client certificate or key; a key that is not the certificate's; a client
    certificate (or CA) that has expired or is not valid yet. ``now``: seconds since the epoch."""
    import datetime

    from cryptography.hazmat.primitives import serialization

    if not cfg.tls_ca:
        if cfg.tls_cert or cfg.tls_key:
            raise ConfigError("[broker] tls_cert/tls_key without tls_ca: set tls_ca to the CA that signed the "
                              "broker's certificate (TLS is on only with it)")
        return
    t = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    fix_ca = "set [broker] tls_ca to the CA certificate that signed the broker's certificate (ca.crt from enrol)"
    if cfg.tls_ca != "system":
        cas = _pem_certs(cfg.tls_ca, "broker CA file (tls_ca)", fix_ca)
        if all(c.not_valid_after_utc < t for c in cas):   # a bundle may keep an old CA beside the new one
            ca = cas[0]
            raise ConfigError(f"broker CA file (tls_ca) {cfg.tls_ca}: the CA certificate "
                              f"{ca.subject.rfc4514_string()!r} expired on {ca.not_valid_after_utc:%Y-%m-%d %H:%M} "
                              "UTC; install the fleet's current CA certificate")
    if cfg.tls_key and not cfg.tls_cert:
        raise ConfigError(f"[broker] tls_key {cfg.tls_key} without tls_cert: set tls_cert to its client certificate")
    if not cfg.tls_cert:
        return
    fix = "set [broker] tls_cert to the client certificate from `fedmfs-coordinator enrol DEVICE --cert`"
    cert = _pem_certs(cfg.tls_cert, "client certificate (tls_cert)", fix)[0]
    if cert.not_valid_after_utc < t:
        raise ConfigError(f"client certificate (tls_cert) {cfg.tls_cert} expired on "
                          f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; issue a new one "
                          "(`fedmfs-coordinator enrol DEVICE --cert` on the gateway) and install it with its key")
    if cert.not_valid_before_utc > t:
        raise ConfigError(f"client certificate (tls_cert) {cfg.tls_cert} is not valid before "
                          f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock")
    key_path = cfg.tls_key or cfg.tls_cert    # without tls_key the key is in the certificate's file
    fix_key = "set [broker] tls_key to the key written with this certificate (client.key from enrol --cert)"
    try:
        key_pem = Path(key_path).read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(f"client key (tls_key) {key_path} does not exist; {fix_key}") from e
    except OSError as e:
        raise ConfigError(f"client key (tls_key) {key_path} is not readable ({e.strerror or e}); give it to the "
                          f"service user: chown fedmfs: {key_path} && chmod 600 {key_path}") from e
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as e:
        raise ConfigError(f"client key (tls_key) {key_path} is encrypted; the daemons need it unencrypted "
                          "(mode 600): openssl pkey -in KEY -out KEY.plain") from e
    except ValueError as e:
        raise ConfigError(f"client key (tls_key) {key_path} holds no PEM private key; {fix_key}") from e
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != \
            cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise ConfigError(f"client key (tls_key) {key_path} does not match client certificate (tls_cert) "
                          f"{cfg.tls_cert} (their public keys differ); install the key written with this "
                          "certificate, or both from a new `fedmfs-coordinator enrol DEVICE --cert`")


def _tls_failure(cfg: BrokerConfig, e: ssl.SSLError) -> str:
    """One line for a failed TLS handshake: what went wrong, which files and host, and the fix."""
    where = f"{cfg.host}:{cfg.port}"
    ca = "the system CAs" if cfg.tls_ca == "system" else f"tls_ca {cfg.tls_ca}"
    if isinstance(e, ssl.SSLCertVerificationError):
        msg = e.verify_message or str(e)
        if "hostname" in msg.lower() or "ip address mismatch" in msg.lower():
            return (f"the broker's certificate at {where} is not for the name {cfg.host!r} ({msg}); connect with "
                    f"a name in its certificate ([broker] host) or reissue it with {cfg.host} as a subject "
                    "alternative name")
        if "expired" in msg.lower():
            return f"the broker's certificate at {where} has expired ({msg}); renew it on the broker"
        return (f"the broker's certificate at {where} does not verify with {ca} ({msg}): tls_ca must be the CA "
                f"that signed the broker's certificate (check: openssl s_client -connect {where} -CAfile "
                f"{cfg.tls_ca})")
    reason = str(getattr(e, "reason", None) or e)
    if "ALERT" in reason.upper():
        return _tls_alert(cfg, reason)
    return f"TLS handshake with {where} failed ({reason}) using {ca}"


def _tls_alert(cfg: BrokerConfig, reason: str) -> str:
    """The broker closed the TLS session with an alert (TLS 1.2 in the handshake, TLS 1.3 at the first
    read): it did not accept our client certificate, or we sent none."""
    cert = f"client certificate {cfg.tls_cert}" if cfg.tls_cert else "no client certificate"
    return (f"the broker at {cfg.host}:{cfg.port} refused the TLS handshake ({reason}) with {cert}: it needs a "
            "client certificate signed by its cafile, valid and not revoked ([broker] tls_cert and tls_key; "
            "`fedmfs-coordinator enrol DEVICE --cert`)")


class MqttLink:
    """One MQTT connection. Inbound messages go to ``inbox`` (a queue the owner drains)."""

    def __init__(self, cfg: BrokerConfig, client_id: str, subscriptions: list[tuple[str, int]],
                 inbox: queue.Queue[Inbound], will: tuple[str, bytes, int, bool] | None = None,
                 persistent: bool = False, on_connected=None):
        self.cfg = cfg
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.inbox = inbox
        self.will = will
        self.persistent = persistent
        self.on_connected = on_connected
        self.connected = threading.Event()
        self.fatal: str | None = None
        self.protocol_used: str | None = None
        self.connects = 0
        self._client: mqtt.Client | None = None
        self._refused_protocol = False
        self._last_error: str | None = None   # paho's last error log line (a TLS alert at the first read)
        self._tls_eofs = 0   # TLS sessions closed without an alert before CONNACK, in a row (see _try)
        self._unacked: collections.deque = collections.deque()   # (MQTTMessageInfo, bytes) of QoS 1 publishes

    # -- construction ------------------------------------------------------------------------------
    def _make(self, v5: bool) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                        clean_session=None if v5 else not self.persistent)
        c.max_queued_messages_set(0)
        c.max_inflight_messages_set(100)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        if self.cfg.username:
            c.username_pw_set(self.cfg.username, self.cfg.password)
        if self.cfg.tls_ca:
            try:
                if self.cfg.tls_ca == "system":
                    c.tls_set()
                else:
                    c.tls_set(ca_certs=self.cfg.tls_ca, certfile=self.cfg.tls_cert, keyfile=self.cfg.tls_key,
                              tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as e:
                raise ConfigError(f"broker TLS files unusable (tls_ca {self.cfg.tls_ca}, tls_cert "
                                  f"{self.cfg.tls_cert}, tls_key {self.cfg.tls_key}): {e}") from e
        if self.will:
            t, p, q, r = self.will
            c.will_set(t, p, q, r)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_log = self._on_log
        return c

    def _connect_args(self, v5: bool) -> dict:
        if not v5:
            return {}
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 24 * 3600 if self.persistent else 0
        return {"clean_start": not self.persistent, "properties": props}

    # -- callbacks: never raise ------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                name = str(reason_code)
                log.warning("broker refused the connection: %s", name)
                if "protocol" in name.lower():
                    self._refused_protocol = True
                elif name in _PERMANENT:
                    self.fatal = f"broker refused the connection: {name}"
                    client.disconnect()
                return
            self.connects += 1
            for topic, qos in self.subscriptions:
                client.subscribe(topic, qos)
            self.connected.set()
            log.info("connected to %s:%d (MQTT %s)", self.cfg.host, self.cfg.port, self.protocol_used)
            if self.on_connected is not None:
                self.on_connected()
        except Exception:  # nothing may escape paho's thread
            log.exception("error in on_connect")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self.connected.clear()
            log.info("disconnected from the broker: %s", reason_code)
        except Exception:
            log.exception("error in on_disconnect")

    def _on_log(self, client, userdata, level, buf) -> None:
        try:
            if level == mqtt.MQTT_LOG_ERR and (self._last_error is None or "ssl" not in self._last_error.lower()):
                self._last_error = str(buf)   # the first TLS error of an attempt, not what follows it
        except Exception:
            log.exception("error in on_log")

    def _on_message(self, client, userdata, msg) -> None:
        try:
            self.inbox.put(Inbound(msg.topic, bytes(msg.payload), bool(msg.retain)))
        except Exception:
            log.exception("error in on_message")

    # -- lifecycle ---------------------------------------------------------------------------------
    def _try(self, v5: bool, timeout: float) -> mqtt.Client | None:
        c = self._make(v5)
        self._refused_protocol = False
        self._last_error = None
        self.protocol_used = "5" if v5 else "3.1.1"
        try:
            c.connect(self.cfg.host, self.cfg.port, self.cfg.keepalive, **self._connect_args(v5))
        except (OSError, ssl.SSLError) as e:
            if isinstance(e, ssl.SSLError):     # bad certificates do not get better by retrying
                self.fatal = _tls_failure(self.cfg, e)
            log.info("cannot reach the broker at %s:%d: %s", self.cfg.host, self.cfg.port, e)
            return None
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.connected.is_set() and not self._refused_protocol \
                and self.fatal is None:
            if c.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
        if self.connected.is_set():
            return c
        if self.cfg.tls_ca and self._last_error and "alert" in self._last_error.lower():
            # "failed to receive on socket: [SSL: X] tlsv13 alert certificate required (_ssl.c:2580)"
            m = re.search(r"\] (.+?)(?: \(_ssl\.c:\d+\))?$", self._last_error)
            self.fatal = _tls_alert(self.cfg, m.group(1) if m else self._last_error)
        elif self.cfg.tls_ca and not self.cfg.tls_cert and self._last_error \
                and "eof occurred in violation of protocol" in self._last_error.lower():
            # A broker that requires a client certificate sends its TLS 1.3 alert and closes; the close
            # often wins the race and the client reads a bare EOF instead of the alert. Three in a row,
            # before any CONNACK and with no certificate to offer, is the same refusal.
            self._tls_eofs += 1
            if self._tls_eofs >= 3:
                self.fatal = _tls_alert(self.cfg, "the session was closed during the handshake, "
                                                  f"{self._tls_eofs} times in a row")
        else:
            self._tls_eofs = 0
        try:
            c.disconnect()
        except Exception:  # best effort on a half-open connection
            pass
        if v5 and self.cfg.protocol == "auto":
            self._refused_protocol = True   # closed without a CONNACK: an MQTT 3.1.1-only broker
        return None

    def start(self, timeout: float = 30.0) -> None:
        """Connect (blocking, bounded by ``timeout``) and start the network thread. Unusable TLS files
        are a :class:`ConfigError` before any attempt (:func:`check_tls_files`)."""
        check_tls_files(self.cfg)
        self._tls_eofs = 0
        backoff = Backoff()
        end = time.monotonic() + timeout
        order = {"auto": [True, False], "5": [True], "3.1.1": [False]}[self.cfg.protocol]
        while True:
            for v5 in order:
                c = self._try(v5, min(5.0, max(0.5, end - time.monotonic())))
                if c is not None:
                    self._client = c
                    c.loop_start()
                    return
                if self.fatal:
                    raise BrokerUnavailable(self.fatal)
                if v5 and not self._refused_protocol:
                    break   # unreachable, not a protocol problem: back off
            delay = backoff.next_delay()
            if time.monotonic() + delay > end:
                raise BrokerUnavailable(f"no connection to {self.cfg.host}:{self.cfg.port} within {timeout:.0f} s")
            time.sleep(delay)

    def alive(self) -> bool:
        """paho's network thread is running (the edge daemon's watchdog heartbeat)."""
        t = getattr(self._client, "_thread", None)
        return t is not None and t.is_alive()

    def stop(self) -> None:
        c = self._client
        if c is not None:
            try:
                c.disconnect()
            finally:
                c.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                timeout: float | None = None) -> bool:
        """Publish; with ``timeout`` wait for the broker's acknowledgement (True if it came)."""
        c = self._client
        if c is None:
            raise BrokerUnavailable("not started")
        info = c.publish(topic, payload, qos, retain)
        if qos and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):   # queued by paho either way
            self._unacked.append((info, len(payload)))
        if timeout is None or qos == 0:
            return info.rc == mqtt.MQTT_ERR_SUCCESS
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):   # not connected / queue full: the caller retries
            return False
        return info.is_published()

    def backlog_bytes(self) -> int:
        """Payload bytes of QoS 1 publishes the broker has not acknowledged yet (sent, or queued in paho
        while the link is down). The edge daemon feeds chunk frames only while this is small."""
        q = self._unacked
        while q and _acked(q[0][0]):
            q.popleft()
        if len(q) > 64:     # acknowledged out of order: keep only what is still waiting
            q = self._unacked = collections.deque(x for x in q if not _acked(x[0]))
        return sum(n for info, n in q if not _acked(info))

    def disconnect_abruptly(self) -> None:
        """Drop the TCP connection without DISCONNECT (tests: the broker then sends the last will)."""
        sock = self._client.socket() if self._client is not None else None
        if sock is not None:
            sock.close()


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    """The broker acknowledged this QoS 1 publish. (``is_published`` raises for a message published
    while the link was down, which paho queued and sends after the reconnect: its ``rc`` stays
    MQTT_ERR_NO_CONN, so the flag itself is read.)"""
    with info._condition:
        return bool(info._published)


BROKER_KEYS = {"host": str, "port": int, "username": str, "password_file": str, "tls_ca": str, "tls_cert": str,
               "tls_key": str, "protocol": str, "keepalive": int, "url": str}


def _rel(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (base / q)


def broker_from_table(t: dict, where: str, base: Path, url: str | None = None) -> BrokerConfig:
    """The broker settings of a config's ``[broker]`` table, with a broker URL laid over them.

    The URL is the first of ``url`` (the command line), ``FEDMFS_BROKER`` (the environment) and the
    table's ``url`` key: command line > environment > file > defaults. It sets the host and port, and
    the user name and password only if it has them; the table's ``password_file``, TLS files,
    ``keepalive`` and ``protocol`` still apply. ``mqtts://`` turns TLS on with the system CAs unless the
    table names a ``tls_ca``.
    """
    check_keys(t, BROKER_KEYS, where)
    password = None
    if "password_file" in t:
        try:
            password = _rel(base, t["password_file"]).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{where}: password_file {t['password_file']!r} unreadable: {e}") from e
    cfg = BrokerConfig(host=t.get("host", "127.0.0.1"), port=t.get("port", 1883), username=t.get("username"),
                       password=password,
                       tls_ca=str(_rel(base, t["tls_ca"])) if "tls_ca" in t else None,
                       tls_cert=str(_rel(base, t["tls_cert"])) if "tls_cert" in t else None,
                       tls_key=str(_rel(base, t["tls_key"])) if "tls_key" in t else None,
                       protocol=t.get("protocol", "auto"), keepalive=t.get("keepalive", 30))
    url = url or os.environ.get("FEDMFS_BROKER") or t.get("url")
    if not url:
        return cfg
    u = parse_broker_url(url)
    return replace(cfg, host=u.host, port=u.port,
                   username=u.username if u.username is not None else cfg.username,
                   password=u.password if u.password is not None else cfg.password,
                   tls_ca=cfg.tls_ca or u.tls_ca)
