"""A small fault-injecting TCP proxy on 127.0.0.1 between MQTT clients and the broker (no tc netem).

Per direction (``up``: client -> broker, ``down``: broker -> client) and adjustable at run time:

* ``latency_ms``: every byte is delivered that much later than it was read;
* ``rate``: bytes per second, as pacing: a segment of at most ~1/20 s worth of bytes is read only
  when the previous one has "left the wire", so the backlog stays in the sender's socket (the
  proxy's own sockets have small SO_RCVBUF/SO_SNDBUF and its queue holds about one bandwidth-delay
  product);
* ``stall_p`` / ``stall_s``: TCP loses no bytes, so loss is emulated as a stall of the stream: with
  probability ``stall_p`` per segment the stream stops for uniform(``stall_s``) seconds (like a
  retransmission timeout), delaying everything behind it.

Per proxy: connection cuts (both sides closed abruptly, RST) by hand (:meth:`FaultProxy.cut`) or every
uniform(lo, hi) seconds from a seeded RNG (:meth:`FaultProxy.cut_every`); a blackhole (connections are
accepted, nothing passes either way; flow resumes when it is lifted) and flapping (:meth:`FaultProxy.flap`:
alternating up and down periods; going down cuts every connection, and while down new connections are
accepted and reset at once).

Counters: bytes actually delivered per direction (``down``: written to the client, the device's
"download bytes"; ``up``: written to the broker), connections accepted, connections served (passed on
to the broker), refused, cuts. Everything runs on daemon threads; :meth:`close` stops them.
"""

from __future__ import annotations

import collections
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

__all__ = ["FaultProxy", "Impairment"]

POLL = 0.05           # how often a blocked pump looks at its connection's state
SOCK_BUF = 16 * 1024  # the proxy's socket buffers (Linux doubles them): small, so backpressure reaches the sender
MAX_QUEUE = 256 * 1024   # bytes between a direction's reader and writer when only latency limits it


@dataclass
class Impairment:
    """One direction's impairments; change the fields at any time (read once per segment)."""

    latency_ms: float = 0.0
    rate: float | None = None                   # bytes per second; None: unlimited
    stall_p: float = 0.0                        # probability per segment of a stall ("loss")
    stall_s: tuple[float, float] = (0.2, 0.6)   # stall length, uniform


@dataclass
class Counters:
    down: int = 0          # bytes written to the client (broker -> client)
    up: int = 0            # bytes written to the broker (client -> broker)
    accepted: int = 0      # client connections accepted
    served: int = 0        # ... passed on to the broker
    refused: int = 0       # ... reset at once (link down, broker unreachable)
    cuts: int = 0          # connections cut by a fault (not closed by either end)
    stalls: int = 0
    events: list = field(default_factory=list)   # (monotonic time, text)


def _rst_close(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): an abrupt end, as a cut link looks to the peer."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


def _small_buffers(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)


class _Conn:
    """One proxied connection: two directions, each a reader (pacing, stalls) and a writer (latency)."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket, cid: int):
        self.proxy, self.client, self.upstream, self.id = proxy, client, upstream, cid
        self.closed = threading.Event()
        self.cut = False
        self.threads: list[threading.Thread] = []
        for name, src, dst in (("up", client, upstream), ("down", upstream, client)):
            q: collections.deque = collections.deque()
            cv = threading.Condition()
            state = {"bytes": 0, "eof": False}
            self.threads.append(threading.Thread(target=self._reader, args=(name, src, q, cv, state),
                                                 name=f"proxy{proxy.port}-{cid}-{name}-r", daemon=True))
            self.threads.append(threading.Thread(target=self._writer, args=(name, dst, q, cv, state),
                                                 name=f"proxy{proxy.port}-{cid}-{name}-w", daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()
        threading.Thread(target=self._close_when_done, name=f"proxy{self.proxy.port}-{self.id}-close",
                         daemon=True).start()

    def close(self, cut: bool = False) -> None:
        if cut and not self.closed.is_set():
            self.cut = True
        self.closed.set()

    def _close_when_done(self) -> None:
        self.closed.wait()
        for t in self.threads:
            t.join(2.0)
        _rst_close(self.client)
        _rst_close(self.upstream)
        self.proxy._forget(self)

    def _reader(self, name: str, src: socket.socket, q, cv, state) -> None:
        p = self.proxy
        imp: Impairment = p.up if name == "up" else p.down
        next_free = time.monotonic()
        try:
            while not self.closed.is_set():
                if p.blackhole:
                    time.sleep(POLL)
                    continue
                rate = imp.rate
                seg = 65536 if not rate else max(256, min(16384, int(rate / 20)))
                # bounded queue (about one bandwidth-delay product): block while the writer is behind
                limit = MAX_QUEUE if not rate else max(seg, int(rate * (imp.latency_ms / 1000 + 0.1)))
                with cv:
                    while state["bytes"] >= limit and not self.closed.is_set():
                        cv.wait(POLL)
                try:
                    data = src.recv(seg)
                except TimeoutError:
                    continue
                if not data:
                    break
                now = time.monotonic()
                start = max(now, next_free)
                if imp.stall_p and p.rng.random() < imp.stall_p:
                    stall = p.rng.uniform(*imp.stall_s)
                    start += stall
                    with p.lock:
                        p.counters.stalls += 1
                done = start + (len(data) / rate if rate else 0.0)
                next_free = done
                with cv:
                    q.append((done + imp.latency_ms / 1000.0, data))
                    state["bytes"] += len(data)
                    cv.notify_all()
                # pacing: read nothing more until this segment has "left the wire"
                while not self.closed.is_set() and (left := done - time.monotonic()) > 0:
                    time.sleep(min(POLL, left))
        except OSError:
            pass
        finally:
            with cv:
                state["eof"] = True
                cv.notify_all()

    def _writer(self, name: str, dst: socket.socket, q, cv, state) -> None:
        p = self.proxy
        try:
            while not self.closed.is_set():
                with cv:
                    while not q and not state["eof"] and not self.closed.is_set():
                        cv.wait(POLL)
                    if self.closed.is_set():
                        return
                    if not q:       # reader ended and everything is delivered: the connection is over
                        break
                    at, data = q[0]
                delay = at - time.monotonic()
                if delay > 0:
                    time.sleep(min(delay, POLL))
                    continue
                if p.blackhole:
                    time.sleep(POLL)
                    continue
                view = memoryview(data)
                while view and not self.closed.is_set():
                    try:
                        n = dst.send(view)
                    except TimeoutError:
                        continue
                    view = view[n:]
                    with p.lock:
                        setattr(p.counters, name, getattr(p.counters, name) + n)
                with cv:
                    q.popleft()
                    state["bytes"] -= len(data)
                    cv.notify_all()
        except OSError:
            pass
        finally:
            self.closed.set()


class FaultProxy:
    """A TCP proxy from 127.0.0.1:``port`` (a free one by default) to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int], name: str = "proxy", seed: int = 0, port: int = 0):
        self.target = target
        self.name = name
        self.up = Impairment()
        self.down = Impairment()
        self.blackhole = False
        self.link_down = False
        self.counters = Counters()
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self._fault_rng = random.Random(seed + 1)    # cut and flap times: independent of the traffic
        self._conns: set[_Conn] = set()
        self._stop = threading.Event()
        self._schedulers: list[threading.Event] = []
        self.t0 = time.monotonic()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _small_buffers(self.sock)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(POLL * 2)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"proxy{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def note(self, text: str) -> None:
        with self.lock:
            self.counters.events.append((round(time.monotonic() - self.t0, 2), text))

    # -- impairments -------------------------------------------------------------------------------
    def set(self, direction: str = "both", **kw) -> None:
        """Change impairments: ``direction`` "up", "down" or "both"; fields of :class:`Impairment`."""
        for d in ((self.up, self.down) if direction == "both" else (getattr(self, direction),)):
            for k, v in kw.items():
                if not hasattr(d, k):
                    raise TypeError(f"no impairment {k!r}")
                setattr(d, k, v)

    def cut(self, why: str = "cut") -> int:
        """Close every connection abruptly (RST both ways); returns how many were cut."""
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            c.close(cut=True)
        if conns:
            with self.lock:
                self.counters.cuts += len(conns)
            self.note(f"{why}: {len(conns)} connection(s)")
        return len(conns)

    def _schedule(self, body) -> threading.Event:
        stop = threading.Event()
        self._schedulers.append(stop)
        threading.Thread(target=body, args=(stop,), name=f"proxy{self.port}-faults", daemon=True).start()
        return stop

    def cut_every(self, lo: float, hi: float) -> threading.Event:
        """Cut the connections every uniform(lo, hi) seconds (seeded); set the returned event to stop."""
        def body(stop: threading.Event) -> None:
            while not stop.wait(self._fault_rng.uniform(lo, hi)) and not self._stop.is_set():
                self.cut("scheduled cut")
        return self._schedule(body)

    def flap(self, up: tuple[float, float], down: tuple[float, float]) -> threading.Event:
        """Alternate up (uniform(*up) s) and down (uniform(*down) s) periods, starting up. Going down
        cuts every connection; while down, new connections are reset at once."""
        def body(stop: threading.Event) -> None:
            while not stop.wait(self._fault_rng.uniform(*up)) and not self._stop.is_set():
                self.link_down = True
                self.cut("link down")
                if stop.wait(self._fault_rng.uniform(*down)):
                    break
                self.link_down = False
                self.note("link up")
            self.link_down = False
        return self._schedule(body)

    def calm(self) -> None:
        """Stop the scheduled faults and lift every impairment (the link is clean from now on)."""
        for s in self._schedulers:
            s.set()
        self._schedulers.clear()
        self.up, self.down = Impairment(), Impairment()
        self.blackhole = self.link_down = False

    # -- plumbing ----------------------------------------------------------------------------------
    def _forget(self, c: _Conn) -> None:
        with self.lock:
            self._conns.discard(c)

    def _accept_loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            n += 1
            with self.lock:
                self.counters.accepted += 1
            if self.link_down:
                with self.lock:
                    self.counters.refused += 1
                _rst_close(client)
                continue
            _small_buffers(client)
            try:
                upstream = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                with self.lock:
                    self.counters.refused += 1
                _rst_close(client)
                continue
            _small_buffers(upstream)
            for s in (client, upstream):
                s.settimeout(POLL)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(self, client, upstream, n)
            with self.lock:
                self._conns.add(c)
                self.counters.served += 1
            c.start()

    def close(self) -> None:
        self._stop.set()
        for s in self._schedulers:
            s.set()
        try:
            self.sock.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        self._thread.join(2.0)

    def summary(self) -> str:
        c = self.counters
        return (f"{self.name}: down {c.down} B, up {c.up} B, connections accepted {c.accepted} served {c.served} "
                f"refused {c.refused}, cuts {c.cuts}, stalls {c.stalls}")
