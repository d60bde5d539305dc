import socket

from fedmfs.adapters.sdnotify import Notifier, Watchdog


def test_noop_without_socket():
    n = Notifier({})
    assert not n.enabled and n.ready("x") is False and n.watchdog_seconds is None


def test_datagrams_and_health_gated_watchdog(tmp_path):
    path = str(tmp_path / "notify")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(2)
    try:
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
        assert n.watchdog_seconds == 2.0
        assert n.ready("connected")
        assert srv.recv(100) == b"READY=1\nSTATUS=connected"
        t = [100.0]
        w = Watchdog(n, clock=lambda: t[0])
        w.beat("main")
        t[0] = 101.5
        assert w.maybe_ping() is False            # heartbeat 1.5 s old > half the interval: stuck
        w.beat("main")
        assert w.maybe_ping() is True
        assert srv.recv(100) == b"WATCHDOG=1"
        assert w.maybe_ping() is False            # not yet half an interval since the last ping
    finally:
        srv.close()
