"""Operator-facing ledger errors (issue 10, B), through the real ``fedmfs-coordinator run`` and
``status`` processes: a damaged ledger, a damaged or missing global model file, a ledger that is
locked or unreadable. Each is one line on stderr that names the file, says what is wrong and what to
do, with exit code 2 and no traceback (it was a raw sqlite3 / FileNotFoundError traceback, or a
sha256 message without the file's name)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmfs.adapters.loopback import LoopbackBus
from fedmfs.coordinator.config import load_coordinator_config
from fedmfs.coordinator.ledger import Ledger, LedgerError
from fedmfs.coordinator.machine import Start
from fedmfs.coordinator.service import CoordinatorService
from fedmfs.core.data import make_synthetic
from fedmfs.sim.config import SimConfig
from fedmfs.sim.processes import write_fleet_configs


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """Configs for a small synthetic fleet (an unreachable broker) and the state a coordinator leaves:
    a ledger and the initial global models."""
    work = tmp_path_factory.mktemp("fleet")
    f = make_synthetic("small", 0)
    fleet = type(f)(f.spec, f.clients[:2], f.metadata)
    files = write_fleet_configs(fleet, SimConfig(rounds=1), work, "mqtt://127.0.0.1:1", "lab")
    svc = CoordinatorService(load_coordinator_config(files["coordinator"]), link_factory=LoopbackBus().link)
    svc.handle_batch([Start(time.time())])            # round 0 opens: a restart restores the globals
    svc.close()
    assert list((work / "coordinator" / "globals").glob("*.fmg"))
    return work


@pytest.fixture
def work(made, tmp_path) -> Path:
    w = tmp_path / "fleet"
    shutil.copytree(made, w)
    return w


def cli(*args: str, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmfs.coordinator.cli", *args], capture_output=True, text=True,
                          timeout=120, preexec_fn=preexec_fn)


def run(work: Path) -> subprocess.CompletedProcess:
    # with a good ledger this would fail at connect (exit 6): the ledger errors come before
    return cli("run", "--config", str(work / "coordinator.toml"), "--connect-timeout", "5")


def status(work: Path, preexec_fn=None) -> subprocess.CompletedProcess:
    return cli("status", "--config", str(work / "coordinator.toml"), preexec_fn=preexec_fn)


def one_line(p: subprocess.CompletedProcess, *words: str) -> str:
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [x for x in p.stderr.splitlines() if x.startswith("fedmfs-coordinator: ")]
    assert len(lines) == 1, p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------- a damaged ledger

def test_a_ledger_overwritten_with_garbage(work):
    led = work / "coordinator" / "ledger.sqlite"
    led.write_bytes(os.urandom(64 * 1024))
    for p in (run(work), status(work)):
        one_line(p, str(led), "not a SQLite database", "backup", "docs/deploy.md", "new fleet")


def test_a_truncated_ledger(work):
    led = work / "coordinator" / "ledger.sqlite"
    os.truncate(led, led.stat().st_size // 2)
    for p in (run(work), status(work)):
        one_line(p, str(led), "damaged", "backup", "docs/deploy.md", "new fleet")


# -------------------------------------------------------------------------------- global model files

def _a_global(work: Path) -> tuple[Path, dict]:
    led = Ledger(work / "coordinator", readonly=True)
    try:
        row = led.latest_globals()[0]
    finally:
        led.close()
    return work / "coordinator" / row["path"], row


def test_a_global_with_changed_bytes(work):
    path, row = _a_global(work)
    b = bytearray(path.read_bytes())
    b[-10] ^= 0xFF                                    # a byte of the payload
    path.write_bytes(bytes(b))
    one_line(run(work), str(path), "sha256", "restore it from a backup", row["sha256"])


def test_a_global_that_is_not_a_frame(work):
    path, row = _a_global(work)
    path.write_bytes(b"garbage" * 100)
    one_line(run(work), str(path), "restore it from a backup", row["sha256"])


def test_a_missing_global(work):
    path, row = _a_global(work)
    path.unlink()
    one_line(run(work), str(path), "missing", "restore it from a backup", row["sha256"])


def test_global_frame_checks_the_frame_against_the_ledger(work):
    path, row = _a_global(work)
    led = Ledger(work / "coordinator", readonly=True)
    try:
        assert led.global_frame(row) == path.read_bytes()
        with pytest.raises(LedgerError, match="sha256"):
            led.global_frame({**row, "sha256": "0" * 64})       # a frame, but not the one recorded
    finally:
        led.close()


# ------------------------------------------------------------------------- a locked or unreadable ledger

def _without_root_powers() -> None:
    """In the child: root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH obeys file modes like a user."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):                               # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:        # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl")


def test_status_of_an_unreadable_ledger(work):
    state = work / "coordinator"
    led = state / "ledger.sqlite"
    os.chmod(led, 0)
    try:
        one_line(status(work, _without_root_powers), str(led), "permission", "mode 000", "sudo -u")
    finally:
        os.chmod(led, 0o600)
    os.chmod(state, 0)
    try:
        one_line(status(work, _without_root_powers), str(state), "permission", "mode 000", "sudo -u")
    finally:
        os.chmod(state, 0o700)


def test_status_of_a_locked_ledger(work):
    led = work / "coordinator" / "ledger.sqlite"
    holder = subprocess.Popen([sys.executable, "-c", """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute('PRAGMA locking_mode=EXCLUSIVE'); c.execute('BEGIN EXCLUSIVE')
c.execute("INSERT OR REPLACE INTO meta VALUES ('x', 'y')")
print('locked', flush=True); time.sleep(120)
""", str(led)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_line(status(work), str(led), "locked", "another process")
    finally:
        holder.kill()
        holder.wait(10)
