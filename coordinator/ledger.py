"""The coordinator's SQLite ledger and model files: rounds, uploads (sha256 + status), refusals,
reports, devices and global models. Accepted upload payloads are stored in the ledger itself (a BLOB
in the same transaction as their row: atomic, and one fsync per batch of uploads: group commit);
global models are files written atomically (temp, fsync, rename) before the row that points at them.
A restart rebuilds the open round from both.

Refusals are counted, not logged one row each: one row per (round, device, modality, reason) with a
count, and at most ``max_refusal_rows`` such rows; past the cap a round's refusals of a reason are
counted in one overflow row with device ``*``. A flood of hostile frames thus costs a bounded ledger.

The ledger is private: the state dir is created 700 and ``ledger.sqlite`` (with its ``-wal`` and
``-shm``) 600, also when opened by hand outside systemd's ``UMask``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from fedmfs.core.fsio import atomic_write
from fedmfs.core.wire import (
    DeviceConfig,
    Evaluation,
    Report,
    RoundState,
    decode_message,
)

__all__ = ["MAX_REFUSAL_ROWS", "OVERFLOW_DEVICE", "Ledger", "RoundRow", "atomic_write"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, state TEXT NOT NULL, deadline REAL NOT NULL, opened_at REAL NOT NULL,
  closed_at REAL, expected TEXT NOT NULL, caps TEXT NOT NULL, aggregated TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS uploads (
  round INTEGER NOT NULL, device TEXT NOT NULL, modality TEXT NOT NULL, sha256 TEXT NOT NULL,
  nbytes INTEGER NOT NULL, samples INTEGER NOT NULL, status TEXT NOT NULL, payload BLOB NOT NULL,
  at REAL NOT NULL, PRIMARY KEY (round, device, modality));
CREATE TABLE IF NOT EXISTS refusals (
  round INTEGER NOT NULL, device TEXT NOT NULL, modality TEXT NOT NULL, reason TEXT NOT NULL,
  count INTEGER NOT NULL, nbytes INTEGER NOT NULL, detail TEXT NOT NULL, first_at REAL NOT NULL,
  at REAL NOT NULL, PRIMARY KEY (round, device, modality, reason));
CREATE TABLE IF NOT EXISTS reports (
  round INTEGER NOT NULL, device TEXT NOT NULL, body BLOB NOT NULL, at REAL NOT NULL,
  PRIMARY KEY (round, device));
CREATE TABLE IF NOT EXISTS evaluations (
  round INTEGER NOT NULL, device TEXT NOT NULL, accuracy REAL NOT NULL, windows INTEGER NOT NULL, at REAL NOT NULL,
  PRIMARY KEY (round, device));
CREATE TABLE IF NOT EXISTS devices (
  device TEXT PRIMARY KEY, config TEXT NOT NULL, online INTEGER NOT NULL DEFAULT 0, last_seen REAL);
CREATE TABLE IF NOT EXISTS globals (
  modality TEXT NOT NULL, version INTEGER NOT NULL, round INTEGER NOT NULL, sha256 TEXT NOT NULL,
  path TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (modality, version));
"""


# ledgers written before refusals were counted had one row per refusal: fold them into counts
_MIGRATE_REFUSALS = """
BEGIN;
ALTER TABLE refusals RENAME TO refusals_v0;
CREATE TABLE refusals (
  round INTEGER NOT NULL, device TEXT NOT NULL, modality TEXT NOT NULL, reason TEXT NOT NULL,
  count INTEGER NOT NULL, nbytes INTEGER NOT NULL, detail TEXT NOT NULL, first_at REAL NOT NULL,
  at REAL NOT NULL, PRIMARY KEY (round, device, modality, reason));
INSERT INTO refusals
  SELECT g.round, g.device, g.modality, g.reason, g.n, g.nbytes, l.detail, g.first_at, g.at
  FROM (SELECT round, device, COALESCE(modality, '') AS modality, reason, COUNT(*) AS n, SUM(nbytes) AS nbytes,
               MIN(at) AS first_at, MAX(at) AS at, MAX(id) AS last
        FROM refusals_v0 GROUP BY round, device, COALESCE(modality, ''), reason) g
  JOIN refusals_v0 l ON l.id = g.last;
DROP TABLE refusals_v0;
COMMIT;
"""

MAX_REFUSAL_ROWS = 10_000
OVERFLOW_DEVICE = "*"    # the device of a round's overflow rows (past the cap); not a valid device name


@dataclass(frozen=True, slots=True)
class RoundRow:
    round: int
    state: RoundState
    deadline: float
    opened_at: float
    closed_at: float | None
    expected: tuple[str, ...]
    caps: dict
    aggregated: dict


class Ledger:
    """One coordinator's persistent state under ``state_dir``: ledger.sqlite (the accepted uploads inside) and globals/."""

    def __init__(self, state_dir: str | os.PathLike, readonly: bool = False,
                 max_refusal_rows: int = MAX_REFUSAL_ROWS):
        if max_refusal_rows < 1:
            raise ValueError(f"max_refusal_rows must be >= 1, got {max_refusal_rows}")
        self.dir = Path(state_dir)
        self.path = self.dir / "ledger.sqlite"
        self.max_refusal_rows = max_refusal_rows
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            self._create_private()
            # One thread at a time: the service's thread at startup, then the ledger writer's thread
            # (coordinator.writer) while the service runs, then the service's thread again to close.
            self.db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            if "id" in {r[1] for r in self.db.execute("PRAGMA table_info(refusals)")}:
                try:
                    self.db.executescript(_MIGRATE_REFUSALS)
                except sqlite3.Error:
                    self.db.rollback()
                    raise
            self._private_sidecars()
        self._batching = False
        self._refusals = "refusals"
        if readonly and "id" in {r[1] for r in self.db.execute("PRAGMA table_info(refusals)")}:
            # a ledger of an older coordinator that has not restarted since: one row per refusal
            self._refusals = ("(SELECT round, device, COALESCE(modality, '') AS modality, reason, 1 AS count, "
                              "nbytes, detail, at AS first_at FROM refusals)")
        self._refusal_rows = self.db.execute(f"SELECT COUNT(*) FROM {self._refusals}").fetchone()[0]

    def _create_private(self) -> None:
        """The state dir 700 (if we create it) and the ledger file 600 before SQLite opens it: SQLite
        gives its -wal and -shm files the database file's mode. An older, looser ledger is tightened."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    def _private_sidecars(self) -> None:
        for suffix in ("-wal", "-shm"):
            p = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_IMODE(p.stat().st_mode) != 0o600:
                    os.chmod(p, 0o600)

    @contextlib.contextmanager
    def batch(self):
        """One transaction (one fsync) for many writes: the service's group commit per loop turn."""
        if self._batching:
            yield
            return
        self._batching = True
        try:
            with self.db:
                yield
        finally:
            self._batching = False

    def _tx(self):
        return contextlib.nullcontext() if self._batching else self.db

    def close(self) -> None:
        self.db.close()

    # -- writes -----------------------------------------------------------------------------------
    def put_meta(self, key: str, value: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return r[0] if r else None

    def put_round(self, r: int, state: RoundState, deadline: float, opened_at: float, expected, caps,
                  closed_at: float | None = None, aggregated: dict | None = None) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?)",
                            (r, state.value, deadline, opened_at, closed_at, json.dumps(list(expected)),
                             json.dumps(caps), json.dumps(aggregated or {})))

    def put_upload(self, r: int, device: str, modality: str, payload: bytes, sha256: str, samples: int) -> bool:
        """Payload and row in one write; False (and nothing written) if this upload is already recorded."""
        with self._tx():
            cur = self.db.execute("INSERT OR IGNORE INTO uploads VALUES (?,?,?,?,?,?,?,?,?)",
                                  (r, device, modality, sha256, len(payload), samples, "accepted", payload,
                                   time.time()))
        return cur.rowcount == 1

    def put_refusal(self, r: int, device: str, modality: str | None, reason: str, nbytes: int, detail: str,
                    count: int = 1, first_at: float | None = None, at: float | None = None) -> None:
        """Count ``count`` refusals (``nbytes`` in all, the last one's ``detail``) in their row: one row per
        (round, device, modality, reason); a new row past ``max_refusal_rows`` goes to the round's
        overflow row for ``reason`` (device ``*``, no modality) instead."""
        at = time.time() if at is None else at
        first_at = at if first_at is None else first_at
        detail = detail[:500]
        with self._tx():
            for dev, mod in ((device, modality or ""), (OVERFLOW_DEVICE, "")):
                cur = self.db.execute(
                    "UPDATE refusals SET count = count + ?, nbytes = nbytes + ?, detail = ?, at = MAX(at, ?) "
                    "WHERE round = ? AND device = ? AND modality = ? AND reason = ?",
                    (count, nbytes, detail, at, r, dev, mod, reason))
                if cur.rowcount:
                    return
                if dev == OVERFLOW_DEVICE or self._refusal_rows < self.max_refusal_rows:
                    self.db.execute("INSERT INTO refusals VALUES (?,?,?,?,?,?,?,?,?)",
                                    (r, dev, mod, reason, count, nbytes, detail, first_at, at))
                    self._refusal_rows += 1
                    return

    def put_report(self, r: int, device: str, body: bytes) -> None:
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO reports VALUES (?,?,?,?)", (r, device, body, time.time()))

    def put_evaluation(self, ev: Evaluation) -> None:
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO evaluations VALUES (?,?,?,?,?)",
                            (ev.round, ev.device, ev.accuracy, ev.windows, time.time()))

    def put_global(self, modality: str, version: int, r: int, sha256: str, frame: bytes) -> None:
        rel = f"globals/{modality}.v{version:05d}.fmg"
        atomic_write(self.dir / rel, frame)
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO globals VALUES (?,?,?,?,?,?)",
                            (modality, version, r, sha256, rel, time.time()))

    def put_devices(self, devices: tuple[DeviceConfig, ...]) -> None:
        with self._tx():
            for d in devices:
                self.db.execute("INSERT INTO devices (device, config) VALUES (?, ?) ON CONFLICT(device) "
                                "DO UPDATE SET config = excluded.config", (d.device, json.dumps(d.to_dict())))

    def set_online(self, device: str, online: bool) -> None:
        with self._tx():
            self.db.execute("INSERT INTO devices (device, config, online, last_seen) VALUES (?, '{}', ?, ?) "
                            "ON CONFLICT(device) DO UPDATE SET online = excluded.online, last_seen = excluded.last_seen",
                            (device, int(online), time.time()))

    # -- reads ------------------------------------------------------------------------------------
    def last_round(self) -> RoundRow | None:
        r = self.db.execute("SELECT * FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        if r is None:
            return None
        return RoundRow(r[0], RoundState(r[1]), r[2], r[3], r[4], tuple(json.loads(r[5])), json.loads(r[6]),
                        json.loads(r[7]))

    def rounds(self) -> list[RoundRow]:
        return [RoundRow(r[0], RoundState(r[1]), r[2], r[3], r[4], tuple(json.loads(r[5])), json.loads(r[6]),
                         json.loads(r[7])) for r in self.db.execute("SELECT * FROM rounds ORDER BY round")]

    def uploads(self, r: int | None = None) -> list[dict]:
        q = "SELECT round, device, modality, sha256, nbytes, samples, status FROM uploads"
        rows = self.db.execute(q + (" WHERE round = ?" if r is not None else "") + " ORDER BY round, device, modality",
                               (() if r is None else (r,))).fetchall()
        keys = ("round", "device", "modality", "sha256", "nbytes", "samples", "status")
        return [dict(zip(keys, x)) for x in rows]

    def upload_payload(self, row: dict) -> bytes:
        (p,) = self.db.execute("SELECT payload FROM uploads WHERE round=? AND device=? AND modality=?",
                               (row["round"], row["device"], row["modality"])).fetchone()
        return bytes(p)

    def refusals(self, r: int | None = None) -> list[dict]:
        """The refusal counts, oldest first: round, device, modality (None for a control message or an
        overflow row), reason, count, nbytes (of all counted), detail (of the last one counted)."""
        q = f"SELECT round, device, modality, reason, count, nbytes, detail FROM {self._refusals}"
        rows = self.db.execute(q + (" WHERE round = ?" if r is not None else "")
                               + " ORDER BY first_at, round, device, modality, reason",
                               (() if r is None else (r,))).fetchall()
        keys = ("round", "device", "modality", "reason", "count", "nbytes", "detail")
        return [{**dict(zip(keys, x)), "modality": x[2] or None} for x in rows]

    def refusal_count(self, r: int | None = None) -> int:
        """How many refusals were recorded (in ``r``, or in all rounds), overflow included."""
        q = f"SELECT COALESCE(SUM(count), 0) FROM {self._refusals}" + (" WHERE round = ?" if r is not None else "")
        return int(self.db.execute(q, (() if r is None else (r,))).fetchone()[0])

    def reports(self, r: int | None = None) -> list[Report]:
        q = "SELECT body FROM reports" + (" WHERE round = ?" if r is not None else "") + " ORDER BY round, device"
        return [decode_message(b[0], Report) for b in self.db.execute(q, (() if r is None else (r,)))]

    def evaluations(self, r: int | None = None) -> list[Evaluation]:
        q = "SELECT round, device, accuracy, windows FROM evaluations"
        rows = self.db.execute(q + (" WHERE round = ?" if r is not None else "") + " ORDER BY round, device",
                               (() if r is None else (r,))).fetchall()
        return [Evaluation(d, rr, a, w) for rr, d, a, w in rows]

    def latest_globals(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT g.modality, g.version, g.round, g.sha256, g.path FROM globals g JOIN "
            "(SELECT modality, MAX(version) v FROM globals GROUP BY modality) l "
            "ON g.modality = l.modality AND g.version = l.v ORDER BY g.modality").fetchall()
        return [dict(zip(("modality", "version", "round", "sha256", "path"), x)) for x in rows]

    def global_frame(self, row: dict) -> bytes:
        return (self.dir / row["path"]).read_bytes()

    def devices(self) -> list[dict]:
        rows = self.db.execute("SELECT device, config, online, last_seen FROM devices ORDER BY device").fetchall()
        return [{"device": d, "config": json.loads(c), "online": bool(o), "last_seen": s} for d, c, o, s in rows]

    def bytes_by_device(self, r: int | None = None) -> dict[str, int]:
        q = "SELECT device, SUM(nbytes) FROM uploads" + (" WHERE round = ?" if r is not None else "") + " GROUP BY device"
        return {d: int(n) for d, n in self.db.execute(q, (() if r is None else (r,)))}
