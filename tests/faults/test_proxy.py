"""The fault proxy itself, against a local TCP echo/sink server (no broker, a few seconds)."""

import socket
import threading
import time

import pytest
from faults.proxy import FaultProxy

pytestmark = pytest.mark.faults


@pytest.fixture
def server():
    """A server that sends ``n`` bytes when a client writes ``n\\n``, and discards the rest."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def handle(c):
        with c:
            try:
                buf = b""
                while b"\n" not in buf:
                    d = c.recv(100)
                    if not d:
                        return
                    buf += d
                c.sendall(b"x" * int(buf.split(b"\n")[0]))
                while c.recv(65536):
                    pass
            except OSError:
                pass

    def serve():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:     # closed at the end of the test
                return
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()
    stop.set()
    srv.close()


def _fetch(port: int, n: int, timeout: float = 10.0) -> tuple[float, float]:
    """Ask for ``n`` bytes; (seconds to the first byte, seconds to the last)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        t0 = time.monotonic()
        c.sendall(f"{n}\n".encode())
        got, first = 0, None
        while got < n:
            d = c.recv(65536)
            assert d, f"closed after {got} of {n} bytes"
            first = first if first is not None else time.monotonic() - t0
            got += len(d)
        return first, time.monotonic() - t0


def test_rate_latency_and_counters(server):
    px = FaultProxy(server)
    try:
        px.set("down", rate=64 * 1024, latency_ms=200)
        first, last = _fetch(px.port, 96 * 1024)
        assert 0.2 <= first < 0.6, first
        assert 1.5 * 0.95 <= last < 1.5 * 1.4 + 0.2, last     # 96 KiB at 64 KiB/s + 200 ms
        end = time.monotonic() + 2     # the counter moves just after the bytes leave
        while px.counters.down < 96 * 1024 and time.monotonic() < end:
            time.sleep(0.01)
        assert px.counters.down == 96 * 1024 and px.counters.up == len(b"98304\n")
        assert px.counters.accepted == px.counters.served == 1
    finally:
        px.close()


def test_stalls_delay_the_stream(server):
    px = FaultProxy(server, seed=3)
    try:
        px.set("down", rate=256 * 1024, stall_p=0.5, stall_s=(0.1, 0.1))
        _, last = _fetch(px.port, 128 * 1024)      # 10 or more segments of at most 12.8 KiB
        n = px.counters.stalls
        assert n >= 2 and last >= 0.5 + 0.1 * n * 0.9, (n, last)
    finally:
        px.close()


def test_cut_blackhole_and_flapping(server):
    px = FaultProxy(server, seed=5)
    try:
        c = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        c.sendall(b"10\n")
        assert c.recv(10)
        assert px.cut() == 1 and px.counters.cuts == 1
        with pytest.raises(OSError):      # reset, as a cut link looks
            c.sendall(b"x" * 100000)
            c.recv(10)
        c.close()
        px.blackhole = True
        c = socket.create_connection(("127.0.0.1", px.port), timeout=5)
        c.sendall(b"10\n")
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.recv(10)
        px.blackhole = False              # the held bytes flow again
        c.settimeout(5)
        assert c.recv(10)
        c.close()
        t0 = time.monotonic()
        stop = px.flap(up=(0.5, 0.5), down=(1.0, 1.0))      # down in [0.5, 1.5) s, up in [1.5, 2.0) s
        time.sleep(0.8)
        assert px.link_down
        with pytest.raises(OSError):
            _fetch(px.port, 10, timeout=2)
        time.sleep(1.7 - (time.monotonic() - t0))
        assert not px.link_down
        _fetch(px.port, 10)
        stop.set()
        assert px.counters.refused >= 1
    finally:
        px.close()
