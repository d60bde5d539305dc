"""The one round driver of a simulation: the real services, over a broker or over an in-memory loopback.

``--transport mqtt`` (:func:`fedmfs.sim.processes.run_mqtt_simulation`) runs the coordinator service
and one edge daemon per client as processes over a broker. ``--transport inproc`` (:func:`run_inproc`)
runs the very same :class:`~fedmfs.coordinator.service.CoordinatorService` and
:class:`~fedmfs.edge.daemon.EdgeDaemon` objects, from the very same config files, in this process:
their links are :class:`~fedmfs.adapters.loopback.LoopbackLink` instead of paho, the ledger writer and
the edge workers run inline, and this module pumps them in turn until the run is over. Both transports
therefore run the same two round machines and give the same global models; the report is built once,
from the coordinator's ledger (:func:`fedmfs.sim.report.build_report`). The holistic baseline is not a
FedMFS round: it has its own small driver (:mod:`fedmfs.sim.holistic`).
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fedmfs.core.data.format import Fleet
from fedmfs.core.errors import FedMFSError
from fedmfs.sim.config import SimConfig

__all__ = ["run_simulation", "run_inproc"]

log = logging.getLogger("fedmfs.sim")

# seconds without any message or job: the fleet is stuck (a bug, or a device that gave up), not slow.
# Longer than the waits a machine may still be in (the edge's 10 s ack timeout, 1 s job retry delay).
_IDLE_SECONDS = 120.0


def run_inproc(fleet: Fleet, config: SimConfig, workdir: str | Path,
               on_round: Callable[[int], None] | None = None, pooled: bool = True) -> Path:
    """Run ``config`` with every service in this process over a loopback bus; return the coordinator's
    state directory (its ledger holds the run). ``on_round(closed)`` is told each time a round closes.

    ``pooled``: the devices' jobs of a round run together once every device has asked
    (:class:`~fedmfs.sim.pool.JobPool`: the same models, to float tolerance, in a fraction of the
    time); False runs each device's job when it asks, alone (the per-device reference)."""
    from fedmfs.adapters.loopback import LoopbackBus
    from fedmfs.coordinator.config import load_coordinator_config
    from fedmfs.coordinator.service import CoordinatorService
    from fedmfs.core.fsio import fsync_skipped
    from fedmfs.edge.config import load_edge_config
    from fedmfs.edge.daemon import EdgeDaemon
    from fedmfs.edge.worker import Trainer
    from fedmfs.sim.pool import JobPool
    from fedmfs.sim.processes import write_fleet_configs

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    # nine services logging each upload at INFO drown the progress bar: their lines are for -v
    quiet = [logging.getLogger(n) for n in ("fedmfs.edge", "fedmfs.coordinator")]
    levels = [lg.level for lg in quiet]
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for lg in quiet:
            lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    # the loopback link ignores the broker address; the files are those an MQTT run would use
    files = write_fleet_configs(fleet, config, work, "mqtt://127.0.0.1:1", f"sim-{uuid.uuid4().hex[:8]}")
    bus = LoopbackBus()
    coord = CoordinatorService(load_coordinator_config(files["coordinator"]), exit_when_done=True,
                               link_factory=bus.link)
    edges = []
    pool = JobPool() if pooled else None
    for p in files["edges"].values():
        cfg = load_edge_config(p)
        trainer = Trainer.from_config(cfg)
        trainer.export_model = False     # the report needs the accuracy, not the ONNX model set
        trainer.release_memory = False   # one process for the whole fleet: no per-job collection
        edges.append(EdgeDaemon(cfg, exit_when_done=True, link_factory=bus.link, trainer=trainer, inline=True,
                                worker_factory=None if pool is None else pool.worker))
    skip = fsync_skipped()        # the workdir is the run's own scratch space: atomic writes, no fsync
    skip.__enter__()
    try:
        coord.start(writer_thread=False)
        for e in edges:
            e.start()
        idle_since: float | None = None
        closed = 0
        while not (coord.over and all(e.finished for e in edges)):
            moved = coord.pump()
            for e in edges:
                if e.stop_event.is_set():
                    raise FedMFSError(f"device {e.cfg.device} stopped (exit code {e.exit_code}); "
                                      f"its log says why")
                moved += e.pump()
            if coord.failed:
                raise FedMFSError("the coordinator could not persist its ledger; see the log")
            if on_round is not None:   # a ledger read per turn only when someone shows progress
                n = sum(1 for r in coord.ledger.rounds() if r.closed_at is not None)
                if n != closed:
                    closed = n
                    on_round(closed)
            if not moved and pool is not None:
                moved = pool.run()       # every device that trains has asked: run the round's jobs together
            if moved:
                idle_since = None
                continue
            # nothing moved: a machine waits for a timer (a retry); let time pass, within a bound
            idle_since = idle_since if idle_since is not None else time.monotonic()
            if time.monotonic() - idle_since > _IDLE_SECONDS:
                raise FedMFSError(f"the in-process fleet made no progress for {_IDLE_SECONDS:.0f} s: "
                                  f"{coord._status_line()}")
            time.sleep(0.005)
    finally:
        for e in edges:
            e.stop()
        coord.close()
        skip.__exit__(None, None, None)
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    return work / "coordinator"


def run_simulation(fleet: Fleet, config: SimConfig, transport: str = "inproc", broker_url: str | None = None,
                   workdir: str | Path | None = None, progress: bool = False, pooled: bool = True) -> dict:
    """Run ``config`` on ``fleet`` over ``transport`` (``inproc`` or ``mqtt``); return the report.
    ``pooled`` (inproc only): the devices' jobs of a round run together (:func:`run_inproc`)."""
    fleet.check_runnable()     # every problem of the data before any work, not in evaluation
    if config.baseline == "holistic":
        from fedmfs.sim.holistic import run_holistic

        return run_holistic(fleet, config, progress=progress)
    if transport == "mqtt":
        from fedmfs.sim.processes import run_mqtt_simulation

        return run_mqtt_simulation(fleet, config, broker_url, workdir=workdir, progress=progress)
    if transport != "inproc":
        raise FedMFSError(f"unknown transport {transport!r}; use inproc or mqtt")
    from fedmfs.sim.report import build_report

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fedmfs-inproc-")
        workdir = tmp.name
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.rounds, desc=config.method, unit="round", leave=False)
    t0 = time.monotonic()
    try:
        state = run_inproc(fleet, config, workdir, None if bar is None else lambda n: bar.update(n - bar.n),
                           pooled=pooled)
        report = build_report(fleet, config, state, "inproc")
    finally:
        if bar is not None:
            bar.close()
        if tmp is not None:
            tmp.cleanup()
    report["wall_seconds"] = time.monotonic() - t0
    return report
