"""Shared fixtures: a real Mosquitto broker on a free 127.0.0.1 port (integration tests)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from netutil import free_port, wait_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@dataclass
class Broker:
    host: str
    port: int
    proc: subprocess.Popen
    conf: Path
    log: Path

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def start_mosquitto(directory: Path) -> Broker:
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed (Debian package mosquitto)")
    for _ in range(5):
        port = free_port()
        conf = directory / "mosquitto.conf"
        log = directory / "mosquitto.log"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\n"
                        f"persistence false\nlog_dest file {log}\n")
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_port(port, 10):
            return Broker("127.0.0.1", port, proc, conf, log)
        proc.kill()
        proc.wait(5)
    pytest.fail("mosquitto did not start")


@pytest.fixture
def mosquitto(tmp_path):
    d = tmp_path / "broker"
    d.mkdir()
    b = start_mosquitto(d)
    yield b
    b.proc.terminate()
    try:
        b.proc.wait(10)
    except subprocess.TimeoutExpired:
        b.proc.kill()
        b.proc.wait(5)
