"""A broker URL (``--broker``, ``FEDMFS_BROKER``, the table's ``url``) overrides where to connect and,
if it carries them, who to be; it never drops the table's credentials file or TLS settings.
Precedence: command line > environment > file (``url``, then the other keys) > defaults."""

import pytest

from fedmfs.adapters.mqtt import broker_from_table, parse_broker_url, redact_url
from fedmfs.core.errors import ConfigError


@pytest.fixture
def table(tmp_path):
    (tmp_path / "pki").mkdir()
    (tmp_path / "broker.pw").write_text("from-file\n")
    return {"host": "file.host", "port": 8883, "username": "coordinator", "password_file": "broker.pw",
            "tls_ca": "pki/ca.pem", "tls_cert": "pki/c.pem", "tls_key": "pki/c.key", "keepalive": 12,
            "protocol": "5"}


def _tls(base) -> tuple:
    return str(base / "pki" / "ca.pem"), str(base / "pki" / "c.pem"), str(base / "pki" / "c.key")


def test_env_url_keeps_the_tables_tls_and_password_file(monkeypatch, tmp_path, table):
    monkeypatch.setenv("FEDMFS_BROKER", "mqtt://env.host:2001")
    b = broker_from_table(table, "[broker]", tmp_path)
    assert (b.host, b.port) == ("env.host", 2001)
    assert (b.username, b.password) == ("coordinator", "from-file")
    assert (b.tls_ca, b.tls_cert, b.tls_key) == _tls(tmp_path)
    assert (b.keepalive, b.protocol) == (12, "5")


def test_url_key_keeps_the_tables_tls_and_password_file(monkeypatch, tmp_path, table):
    monkeypatch.delenv("FEDMFS_BROKER", raising=False)
    b = broker_from_table({**table, "url": "mqtt://url.host:1999"}, "[broker]", tmp_path)
    assert (b.host, b.port, b.username, b.password) == ("url.host", 1999, "coordinator", "from-file")
    assert (b.tls_ca, b.tls_cert, b.tls_key) == _tls(tmp_path)


def test_command_line_url_beats_env_and_keeps_the_table(monkeypatch, tmp_path, table):
    monkeypatch.setenv("FEDMFS_BROKER", "mqtt://env.host:2001")
    b = broker_from_table({**table, "url": "mqtt://url.host:1999"}, "[broker]", tmp_path,
                          url="mqtt://cli.host:3001")
    assert (b.host, b.port, b.password) == ("cli.host", 3001, "from-file")
    assert b.tls_ca == str(tmp_path / "pki" / "ca.pem")


def test_url_user_and_password_override_the_tables(monkeypatch, tmp_path, table):
    monkeypatch.setenv("FEDMFS_BROKER", "mqtt://alice:s3cret@env.host:2001")
    b = broker_from_table(table, "[broker]", tmp_path)
    assert (b.username, b.password) == ("alice", "s3cret")
    assert b.tls_ca == str(tmp_path / "pki" / "ca.pem")      # TLS still from the table
    # a user without a password in the URL: the password file still supplies it
    monkeypatch.setenv("FEDMFS_BROKER", "mqtt://alice@env.host:2001")
    b = broker_from_table(table, "[broker]", tmp_path)
    assert (b.username, b.password) == ("alice", "from-file")


def test_mqtts_url_uses_the_tables_ca_if_it_has_one(monkeypatch, tmp_path, table):
    monkeypatch.setenv("FEDMFS_BROKER", "mqtts://env.host")
    assert broker_from_table(table, "[broker]", tmp_path).tls_ca == str(tmp_path / "pki" / "ca.pem")
    assert broker_from_table({}, "[broker]", tmp_path).tls_ca == "system"
    assert broker_from_table({}, "[broker]", tmp_path).port == 8883


def test_table_host_and_port_apply_without_a_url(monkeypatch, tmp_path, table):
    monkeypatch.delenv("FEDMFS_BROKER", raising=False)
    b = broker_from_table(table, "[broker]", tmp_path)
    assert (b.host, b.port, b.password) == ("file.host", 8883, "from-file")


def test_an_unreadable_password_file_is_an_error_even_with_a_url(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDMFS_BROKER", "mqtt://env.host:2001")
    with pytest.raises(ConfigError, match="password_file 'nope.pw' unreadable"):
        broker_from_table({"password_file": "nope.pw"}, "[broker]", tmp_path)


@pytest.mark.parametrize("url, shown", [
    ("mqtt://alice:s3cret@h:1884", "mqtt://alice:***@h:1884"),
    ("mqtts://alice:s3cret@[::1]", "mqtts://alice:***@[::1]"),
    ("mqtt://alice@h", "mqtt://alice@h"),
    ("mqtt://h:1883", "mqtt://h:1883"),
    ("mqtt://:p%40ss@h", "mqtt://:***@h"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_errors_and_reprs_do_not_show_the_password(tmp_path):
    with pytest.raises(ConfigError) as ei:
        parse_broker_url("mqtt://alice:s3cret@h:notaport")
    assert "s3cret" not in str(ei.value) and "alice:***@h" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        parse_broker_url("http://alice:s3cret@h")
    assert "s3cret" not in str(ei.value)
    assert "s3cret" not in repr(parse_broker_url("mqtt://alice:s3cret@h"))
