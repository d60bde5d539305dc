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

Integrity (issue 10): every write transaction increments a commit count (meta ``seq``) inside the
transaction and, once it has committed and before :meth:`Ledger.batch` returns (so before the ledger
writer publishes the acks), records it in ``ledger.hwm``, a high-water mark outside the WAL (two
checksummed slots written alternately in place, then ``fdatasync``). A ledger behind its mark lost
commits whose acks may have gone out (a WAL cut by a crash, a disk that lied about fsync, an older
backup restored over a newer state dir): it refuses to open (:class:`LostWritesError`) until
``fedmfs-coordinator recover`` starts a new fleet epoch (:meth:`Ledger.recover`). The writing process
holds an exclusive ``flock`` on ``ledger.hwm``: one coordinator (or recover) per state dir.

Every SQLite or file problem an operator can meet (a damaged ledger, a locked or unreadable one, a
damaged or missing global model file) is a :class:`LedgerError`: one line naming the file, what is
wrong and what to do (a ConfigError: exit code 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import pwd
import sqlite3
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from fedmfs.core.errors import ConfigError, PayloadError
from fedmfs.core.fsio import atomic_write
from fedmfs.core.wire import (
    DeviceConfig,
    Evaluation,
    Report,
    RoundState,
    decode_global,
    decode_message,
)

__all__ = ["MARK_FILE", "MARK_SLOTS", "MAX_REFUSAL_ROWS", "OVERFLOW_DEVICE", "Ledger", "LedgerError",
           "LostWritesError", "Mark", "Recovery", "RoundRow", "atomic_write", "read_mark"]

log = logging.getLogger("fedmfs.coordinator")

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

RESTORE = ('restore it and globals/ from a backup (docs/deploy.md, "Restoring the coordinator"; then '
           "fedmfs-coordinator recover), or move the state dir {dir} away to start a new fleet")
RECOVER = ("to accept the loss run fedmfs-coordinator recover --config coordinator.toml (a new fleet epoch: devices "
           "drop their round bookkeeping and follow the coordinator from the ledger's round; docs/operations.md, "
           '"Lost ledger writes")')


class LedgerError(ConfigError):
    """The ledger, its high-water mark or a global model file cannot be used as it is; the message is
    one line: the file, what is wrong, what to do (exit code 2)."""


class LostWritesError(LedgerError):
    """The ledger is behind its high-water mark (or the mark is missing or damaged): commits whose acks
    may have gone out to devices are not in it."""


# -- the high-water mark ------------------------------------------------------------------------------
MARK_FILE = "ledger.hwm"
MARK_SLOTS = (0, 4096)           # two records a sector apart, written alternately: a torn write leaves the other
_MARK_SIZE = 8192
_MARK = struct.Struct(">8sQQQ")  # magic, generation (which slot is newer), commit count, fleet epoch
_MARK_MAGIC = b"FMSHWM\x00\x01"
_MARK_SUM = 8                    # the first bytes of the record's sha256 follow it


@dataclass(frozen=True, slots=True)
class Mark:
    """A record of ``ledger.hwm``: the ledger had made ``seq`` commits, under fleet ``epoch`` (0: none)."""
    gen: int
    seq: int
    epoch: int


def _pack_mark(m: Mark) -> bytes:
    body = _MARK.pack(_MARK_MAGIC, m.gen, m.seq, m.epoch)
    return body + hashlib.sha256(body).digest()[:_MARK_SUM]


def _unpack_mark(data: bytes) -> Mark | None:
    """The newest valid slot of a mark file's bytes (None if no slot is valid)."""
    best = None
    n = _MARK.size + _MARK_SUM
    for off in MARK_SLOTS:
        rec = data[off:off + n]
        if len(rec) != n or hashlib.sha256(rec[:_MARK.size]).digest()[:_MARK_SUM] != rec[_MARK.size:]:
            continue
        magic, gen, seq, epoch = _MARK.unpack(rec[:_MARK.size])
        if magic == _MARK_MAGIC and (best is None or gen > best.gen):
            best = Mark(gen, seq, epoch)
    return best


def read_mark(state_dir: str | os.PathLike) -> Mark | None:
    """The high-water mark in ``state_dir`` (None: no mark yet); a LostWritesError if it is damaged."""
    path = Path(state_dir) / MARK_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data:
        return None
    m = _unpack_mark(data)
    if m is None:
        raise LostWritesError(_damaged_mark(path, len(data)))
    return m


def _damaged_mark(path: Path, size: int) -> str:
    return (f"the high-water mark {path} is damaged (no valid record in its {size} bytes), so the ledger beside "
            f"it cannot be checked for lost writes; {RECOVER}")


def _epoch_of(raw: str | None) -> int:
    return int(raw) if raw is not None and raw.isascii() and raw.isdigit() and len(raw) <= 15 else 0


def _commits(n: int) -> str:
    return f"{n} commit" + ("" if n == 1 else "s")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _guarded(fn):
    """A Ledger method whose SQLite errors an operator can meet become one-line LedgerErrors."""
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._errors():
            return fn(self, *args, **kwargs)
    return wrapper


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


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :meth:`Ledger.recover` did."""
    seq: int                 # the ledger's commit count before
    marked: int | None       # the mark's, if it had a valid one
    old_epoch: int           # 0: the ledger had none
    epoch: int               # the new fleet epoch
    last: RoundRow | None    # the round the coordinator resumes at


class Ledger:
    """One coordinator's persistent state under ``state_dir``: ledger.sqlite (the accepted uploads inside),
    globals/ and the high-water mark ledger.hwm.

    Opened for writing (the coordinator, ``recover``), it holds ledger.hwm locked and refuses to open
    when the ledger is behind the mark (LostWritesError), unless ``check_mark`` is False (``recover``).
    Opened ``readonly`` (``status``, reports), it locks nothing, writes nothing and keeps what is wrong
    with the mark in :attr:`problem`."""

    def __init__(self, state_dir: str | os.PathLike, readonly: bool = False,
                 max_refusal_rows: int = MAX_REFUSAL_ROWS, check_mark: bool = True, timeout: float = 10.0):
        if max_refusal_rows < 1:
            raise ValueError(f"max_refusal_rows must be >= 1, got {max_refusal_rows}")
        self.dir = Path(state_dir)
        self.path = self.dir / "ledger.sqlite"
        self.mark_path = self.dir / MARK_FILE
        self.max_refusal_rows = max_refusal_rows
        self.readonly = readonly
        self.seq = 0                     # commits made (meta seq): the ledger's side of the high-water mark
        self.mark: Mark | None = None    # the mark as read at open (None: none, or damaged)
        self.problem: str | None = None  # why the ledger does not agree with its mark (None: it does)
        self._batching = False
        self._refusals = "refusals"
        self._mark_fd: int | None = None
        self._mark_gen = 0
        self._mark_rewrite = False       # the file is new or damaged: write it whole
        self._mark_new = False           # ... and fsync the state dir after the first write
        self.db = None
        try:
            self._open(check_mark, timeout)
        except BaseException:
            self.close()
            raise

    def _open(self, check_mark: bool, timeout: float) -> None:
        if self.readonly:
            self._exists()
            # the mark before the ledger's count: a commit in between leaves the ledger ahead, never behind
            data: bytes | None = b""
            try:
                data = self.mark_path.read_bytes()
            except FileNotFoundError:
                pass
            except OSError:                      # status as a user that cannot read the mark: no check
                data = None
            with self._errors():
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout)
        else:
            try:
                self._create_private()
                data = self._lock_mark()
            except LedgerError:
                raise
            except OSError as e:
                raise self._os_error(e, "open") from e
            # One thread at a time: the service's thread at startup, then the ledger writer's thread
            # (coordinator.writer) while the service runs, then the service's thread again to close.
            with self._errors():
                self.db = sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)
        with self._errors():
            if not self.readonly:
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
            elif "id" in {r[1] for r in self.db.execute("PRAGMA table_info(refusals)")}:
                # a ledger of an older coordinator that has not restarted since: one row per refusal
                self._refusals = ("(SELECT round, device, COALESCE(modality, '') AS modality, reason, 1 AS count, "
                                  "nbytes, detail, at AS first_at FROM refusals)")
            self._refusal_rows = self.db.execute(f"SELECT COUNT(*) FROM {self._refusals}").fetchone()[0]
            raw_seq = self.get_meta("seq")
            self.seq = int(raw_seq) if raw_seq is not None and raw_seq.isdigit() else 0
            epoch = _epoch_of(self.get_meta("epoch"))
            has_rounds = self.db.execute("SELECT 1 FROM rounds LIMIT 1").fetchone() is not None
        if data is not None:
            self._check_mark(data, epoch, raw_seq is not None, has_rounds, check_mark and not self.readonly)

    def _check_mark(self, data: bytes, epoch: int, counted: bool, has_rounds: bool, strict: bool) -> None:
        """Compare the ledger (epoch, seq) with its mark; refuse (``strict``) or note what is wrong; bring
        the mark up to the ledger when the ledger is ahead (a crash between a commit and its mark)."""
        mark = _unpack_mark(data) if data else None
        self.mark = mark
        self._mark_gen = mark.gen if mark else 0
        self._mark_rewrite = mark is None
        mp = self.mark_path
        if data and mark is None:
            self.problem = _damaged_mark(mp, len(data))
        elif mark is None and counted and self.seq > 0:
            self.problem = (f"the high-water mark {mp} is missing, but the ledger {self.path} counts "
                            f"{_commits(self.seq)}: it may be a backup restored into a new state dir (or the mark "
                            f"was deleted), and devices may hold acks for commits it lacks; {RECOVER}")
        elif mark is not None and epoch <= mark.epoch and self.seq < mark.seq:
            self.problem = (f"the ledger {self.path} holds {_commits(self.seq)} but its high-water mark {mp} recorded "
                            f"{mark.seq}: {_commits(mark.seq - self.seq)} were lost (a WAL cut by a crash, a disk that "
                            "lied about fsync, or an older backup restored over a newer state dir) and devices "
                            "may hold acks for uploads, reports or rounds the ledger no longer has; put the newer "
                            f"ledger back if you still have it, else, {RECOVER}")
        elif mark is not None and epoch < mark.epoch:
            self.problem = (f"the ledger {self.path} is of fleet epoch {epoch} (commit {self.seq}) but its high-water "
                            f"mark {mp} recorded epoch {mark.epoch} (commit {mark.seq}): this ledger is older than "
                            f"the last recover (a backup from before it?), and devices follow epoch {mark.epoch} and "
                            "refuse everything of an earlier one; put the newer ledger back if you still have "
                            f"it, else, {RECOVER}")
        if not strict:
            return
        if self.problem is not None:
            raise LostWritesError(self.problem)
        if mark is None and has_rounds:
            log.warning("the ledger %s predates its high-water mark (fedmfs before issue 10): %s created; lost "
                        "writes are detected from now on", self.path, mp)
        if mark is None or (mark.seq, mark.epoch) != (self.seq, epoch):
            self._write_mark(self.seq, epoch)

    def _lock_mark(self) -> bytes:
        """Open (create 600) and lock ledger.hwm; its bytes (empty: a new mark)."""
        fd = os.open(self.mark_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._mark_fd = fd
        if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LedgerError(f"the ledger in {self.dir} is in use by another process (it holds the lock on "
                              f"{self.mark_path}): another coordinator or a recover runs with this state_dir; stop "
                              "it first (systemctl stop fedmfs-coordinator) or use another state_dir") from None
        data = os.pread(fd, _MARK_SIZE + 1, 0)
        self._mark_new = not data
        return data

    def _write_mark(self, seq: int, epoch: int) -> None:
        """Record ``seq`` commits under ``epoch`` in the slot after the newest, durably (fdatasync)."""
        assert self._mark_fd is not None
        gen = self._mark_gen + 1
        rec = _pack_mark(Mark(gen, seq, epoch))
        off = MARK_SLOTS[gen % 2]
        try:
            if self._mark_rewrite:           # fixed size from the start; a damaged file is overwritten whole
                image = bytearray(_MARK_SIZE)
                image[off:off + len(rec)] = rec
                os.pwrite(self._mark_fd, bytes(image), 0)
                os.ftruncate(self._mark_fd, _MARK_SIZE)
            else:
                os.pwrite(self._mark_fd, rec, off)
            os.fdatasync(self._mark_fd)
            if self._mark_new:
                dfd = os.open(self.dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            raise LedgerError(f"cannot write the high-water mark {self.mark_path}: {e.strerror or e}; the commit is "
                              "in the ledger and no ack of it went out; free or fix the disk, then restart") from e
        self._mark_gen, self._mark_rewrite, self._mark_new = gen, False, False
        self.mark = Mark(gen, seq, epoch)

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

    # -- errors an operator can meet ---------------------------------------------------------------------
    def _exists(self) -> None:
        try:
            os.stat(self.path)
        except FileNotFoundError:
            raise LedgerError(f"no ledger {self.path}: the coordinator has not run with this state_dir yet "
                              "(check state_dir in coordinator.toml)") from None
        except OSError as e:
            raise self._os_error(e, "read") from e

    def _os_error(self, e: OSError, doing: str) -> LedgerError:
        if isinstance(e, PermissionError):
            denied = self._denied(doing)
            if denied is not None:
                return denied
        return LedgerError(f"cannot {doing} the ledger {self.path}: {e.strerror or e}; check the state dir "
                           f"{self.dir} and its disk")

    def _denied(self, doing: str) -> LedgerError | None:
        """Permission denied: the first of the state dir and the ledger that refuses us, with its mode and
        owner (tried, not os.access, which asks with the real user's powers); None if neither does."""
        culprit = None
        try:
            os.stat(self.path)                     # needs search permission on the state dir
        except PermissionError:
            culprit = self.dir
        except OSError:
            pass
        if culprit is None:
            try:
                with open(self.path, "rb" if self.readonly else "r+b"):
                    pass
            except PermissionError:
                culprit = self.path
            except OSError:
                pass
        if culprit is None:
            return None
        try:
            st = os.stat(culprit)
            owner = _user(st.st_uid)
            what = f"mode {stat.S_IMODE(st.st_mode):03o}, owner {owner}"
        except OSError:
            owner, what = "fedmfs", "its mode and owner unreadable"
        return LedgerError(f"cannot {doing} the ledger {self.path}: permission denied on {culprit} ({what}; this is "
                           f"user {_user(os.geteuid())}); run it as the user that owns it (sudo -u {owner} "
                           "fedmfs-coordinator ...) or as root")

    def _explain(self, e: sqlite3.DatabaseError) -> LedgerError:
        msg = str(e)
        low = msg.lower()
        if "locked" in low or "busy" in low:
            return LedgerError(f"the ledger {self.path} is locked by another process ({msg}): a coordinator, a sqlite3 "
                               "shell or a backup holds it; wait for it or stop it, then retry")
        if "not a database" in low:
            return LedgerError(f"the ledger {self.path} is not a SQLite database ({msg}): it was overwritten or "
                               f"damaged; {RESTORE.format(dir=self.dir)}")
        if "malformed" in low or "corrupt" in low:
            return LedgerError(f"the ledger {self.path} is damaged ({msg}); {RESTORE.format(dir=self.dir)}")
        if "unable to open" in low or "readonly" in low or "permission" in low or "access" in low:
            denied = self._denied("read" if self.readonly else "write")
            if denied is not None:
                return denied
            return LedgerError(f"cannot open the ledger {self.path} ({msg}): check that the state dir {self.dir} "
                               "and the ledger are there and that the service user may read and write them")
        if "disk" in low or "full" in low or "i/o" in low:
            return LedgerError(f"the ledger {self.path}: {msg}; free or fix the disk (df, dmesg), then restart")
        return LedgerError(f"the ledger {self.path} cannot be used ({msg}); if it is damaged, "
                           f"{RESTORE.format(dir=self.dir)}")

    @contextlib.contextmanager
    def _errors(self):
        """SQLite errors an operator can meet become LedgerErrors; a constraint or misuse (a bug) stays."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise
        except sqlite3.DatabaseError as e:
            raise self._explain(e) from e

    # -- transactions --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self):
        """One transaction (one fsync) for many writes: the service's group commit per loop turn. It
        counts itself (meta seq) and records the count in the high-water mark (one more fdatasync)
        before it returns, so nothing that it holds is acknowledged before the mark knows it."""
        if self._batching:
            yield
            return
        self._batching = True
        try:
            with self._errors():
                with self.db:
                    yield
                    self.db.execute("INSERT INTO meta VALUES ('seq', '1') ON CONFLICT(key) DO UPDATE "
                                    "SET value = CAST(value AS INTEGER) + 1")
                    seq = int(self.db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
                    epoch = _epoch_of(self.get_meta("epoch"))
            self.seq = seq
            self._write_mark(seq, epoch)
        finally:
            self._batching = False

    def _tx(self):
        return contextlib.nullcontext() if self._batching else self.batch()

    def recover(self, now_ms: int | None = None) -> Recovery:
        """Accept what the ledger holds (open it with ``check_mark=False``): a new fleet epoch, later than
        the ledger's, the mark's and the clock's (ms), committed with the mark reset to the ledger's count.
        Devices take the later epoch as a re-created fleet and follow the coordinator from its round."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        old = _epoch_of(self.get_meta("epoch"))
        mark = self.mark
        epoch = max(now_ms, old + 1, (mark.epoch + 1) if mark else 0)
        seq = self.seq
        self.put_meta("epoch", str(epoch))
        self.problem = None
        return Recovery(seq, mark.seq if mark else None, old, epoch, self.last_round())

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        if self._mark_fd is not None:
            os.close(self._mark_fd)          # and the lock with it
            self._mark_fd = None

    # -- writes -----------------------------------------------------------------------------------
    @_guarded
    def put_meta(self, key: str, value: str) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @_guarded
    def get_meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return r[0] if r else None

    @_guarded
    def put_round(self, r: int, state: RoundState, deadline: float, opened_at: float, expected, caps,
                  closed_at: float | None = None, aggregated: dict | None = None) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?)",
                            (r, state.value, deadline, opened_at, closed_at, json.dumps(list(expected)),
                             json.dumps(caps), json.dumps(aggregated or {})))

    @_guarded
    def put_upload(self, r: int, device: str, modality: str, payload: bytes, sha256: str, samples: int) -> bool:
        """Payload and row in one write; False (and nothing written) if this upload is already recorded."""
        with self._tx():
            cur = self.db.execute("INSERT OR IGNORE INTO uploads VALUES (?,?,?,?,?,?,?,?,?)",
                                  (r, device, modality, sha256, len(payload), samples, "accepted", payload,
                                   time.time()))
        return cur.rowcount == 1

    @_guarded
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

    @_guarded
    def put_report(self, r: int, device: str, body: bytes) -> None:
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO reports VALUES (?,?,?,?)", (r, device, body, time.time()))

    @_guarded
    def put_evaluation(self, ev: Evaluation) -> None:
        with self._tx():
            self.db.execute("INSERT OR IGNORE INTO evaluations VALUES (?,?,?,?,?)",
                            (ev.round, ev.device, ev.accuracy, ev.windows, time.time()))

    @_guarded
    def put_global(self, modality: str, version: int, r: int, sha256: str, frame: bytes) -> None:
        rel = f"globals/{modality}.v{version:05d}.fmg"
        atomic_write(self.dir / rel, frame)
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO globals VALUES (?,?,?,?,?,?)",
                            (modality, version, r, sha256, rel, time.time()))

    @_guarded
    def put_devices(self, devices: tuple[DeviceConfig, ...]) -> None:
        with self._tx():
            for d in devices:
                self.db.execute("INSERT INTO devices (device, config) VALUES (?, ?) ON CONFLICT(device) "
                                "DO UPDATE SET config = excluded.config", (d.device, json.dumps(d.to_dict())))

    @_guarded
    def set_online(self, device: str, online: bool) -> None:
        with self._tx():
            self.db.execute("INSERT INTO devices (device, config, online, last_seen) VALUES (?, '{}', ?, ?) "
                            "ON CONFLICT(device) DO UPDATE SET online = excluded.online, last_seen = excluded.last_seen",
                            (device, int(online), time.time()))

    # -- reads ------------------------------------------------------------------------------------
    @_guarded
    def last_round(self) -> RoundRow | None:
        r = self.db.execute("SELECT * FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        if r is None:
            return None
        return RoundRow(r[0], RoundState(r[1]), r[2], r[3], r[4], tuple(json.loads(r[5])), json.loads(r[6]),
                        json.loads(r[7]))

    @_guarded
    def rounds(self) -> list[RoundRow]:
        return [RoundRow(r[0], RoundState(r[1]), r[2], r[3], r[4], tuple(json.loads(r[5])), json.loads(r[6]),
                         json.loads(r[7])) for r in self.db.execute("SELECT * FROM rounds ORDER BY round")]

    @_guarded
    def uploads(self, r: int | None = None) -> list[dict]:
        q = "SELECT round, device, modality, sha256, nbytes, samples, status FROM uploads"
        rows = self.db.execute(q + (" WHERE round = ?" if r is not None else "") + " ORDER BY round, device, modality",
                               (() if r is None else (r,))).fetchall()
        keys = ("round", "device", "modality", "sha256", "nbytes", "samples", "status")
        return [dict(zip(keys, x)) for x in rows]

    @_guarded
    def upload_payload(self, row: dict) -> bytes:
        (p,) = self.db.execute("SELECT payload FROM uploads WHERE round=? AND device=? AND modality=?",
                               (row["round"], row["device"], row["modality"])).fetchone()
        return bytes(p)

    @_guarded
    def refusals(self, r: int | None = None) -> list[dict]:
        """The refusal counts, oldest first: round, device, modality (None for a control message or an
        overflow row), reason, count, nbytes (of all counted), detail (of the last one counted)."""
        q = f"SELECT round, device, modality, reason, count, nbytes, detail FROM {self._refusals}"
        rows = self.db.execute(q + (" WHERE round = ?" if r is not None else "")
                               + " ORDER BY first_at, round, device, modality, reason",
                               (() if r is None else (r,))).fetchall()
        keys = ("round", "device", "modality", "reason", "count", "nbytes", "detail")
        return [{**dict(zip(keys, x)), "modality": x[2] or None} for x in rows]

    @_guarded
    def refusal_count(self, r: int | None = None) -> int:
        """How many refusals were recorded (in ``r``, or in all rounds), overflow included."""
        q = f"SELECT COALESCE(SUM(count), 0) FROM {self._refusals}" + (" WHERE round = ?" if r is not None else "")
        return int(self.db.execute(q, (() if r is None else (r,))).fetchone()[0])

    @_guarded
    def reports(self, r: int | None = None) -> list[Report]:
        q = "SELECT body FROM reports" + (" WHERE round = ?" if r is not None else "") + " ORDER BY round, device"
        return [decode_message(b[0], Report) for b in self.db.execute(q, (() if r is None else (r,)))]

    @_guarded
    def evaluations(self, r: int | None = None) -> list[Evaluation]:
        q = "SELECT round, device, accuracy, windows FROM evaluations"
        rows = self.db.execute(q + (" WHERE round = ?" if r is not None else "") + " ORDER BY round, device",
                               (() if r is None else (r,))).fetchall()
        return [Evaluation(d, rr, a, w) for rr, d, a, w in rows]

    @_guarded
    def latest_globals(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT g.modality, g.version, g.round, g.sha256, g.path FROM globals g JOIN "
            "(SELECT modality, MAX(version) v FROM globals GROUP BY modality) l "
            "ON g.modality = l.modality AND g.version = l.v ORDER BY g.modality").fetchall()
        return [dict(zip(("modality", "version", "round", "sha256", "path"), x)) for x in rows]

    def global_frame(self, row: dict) -> bytes:
        """The signed frame of a :meth:`latest_globals` row, read and checked: it parses, and its payload is
        the one the ledger recorded (sha256). Anything else is a LedgerError naming the file."""
        path = self.dir / row["path"]
        fix = (f"restore it from a backup of globals/ (docs/deploy.md, \"Backups and restore\"): the ledger "
               f"records the sha256 of its payload, {row['sha256']}; without a backup, move the state dir {self.dir} "
               "away to start a new fleet")
        what = f"global model {path} ({row['modality']} version {row['version']})"
        try:
            frame = path.read_bytes()
        except FileNotFoundError:
            raise LedgerError(f"{what} is missing; {fix}") from None
        except OSError as e:
            raise LedgerError(f"cannot read {what}: {e.strerror or e}; check its mode and owner, or {fix}") from e
        try:
            h, payload = decode_global(frame, None)
        except PayloadError as e:
            raise LedgerError(f"{what} is damaged ({e}); {fix}") from e
        sha = hashlib.sha256(payload).hexdigest()
        if sha != row["sha256"] or h.modality != row["modality"]:
            raise LedgerError(f"{what} is not the one the ledger recorded (a {h.modality} payload with sha256 {sha}); "
                              f"{fix}")
        return frame

    @_guarded
    def devices(self) -> list[dict]:
        rows = self.db.execute("SELECT device, config, online, last_seen FROM devices ORDER BY device").fetchall()
        return [{"device": d, "config": json.loads(c), "online": bool(o), "last_seen": s} for d, c, o, s in rows]

    @_guarded
    def bytes_by_device(self, r: int | None = None) -> dict[str, int]:
        q = "SELECT device, SUM(nbytes) FROM uploads" + (" WHERE round = ?" if r is not None else "") + " GROUP BY device"
        return {d: int(n) for d, n in self.db.execute(q, (() if r is None else (r,)))}
