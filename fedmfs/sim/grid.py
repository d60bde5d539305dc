"""Running a grid of (variant, seed) jobs: in this process, or as Ray tasks; each result saved as it
finishes, so a stopped grid resumes where it stopped.

One job is :func:`run_job`: one :func:`fedmfs.sim.driver.run_simulation` over the ``inproc``
transport, with one torch thread. The serial path calls it here, one job after another (the
reference); the Ray path calls the very same function in a Ray task (:func:`_ray_task`) per job, one
CPU each, on a local Ray started on demand (:func:`ray_session`: loopback only, ``workers`` CPUs, a
200 MB object store, no dashboard) or on an existing cluster (``ray_address``). Ray is imported here
and only when asked for (the ``[cluster]`` extra); no device, coordinator or core module imports it.

Results (:class:`RunStore`): ``DIR/runs/<variant>.seed<seed>.json``, written atomically by the driver
(not by the tasks, so a cluster's nodes need no shared disk) as each run finishes, with the settings
that made it (fleet, rounds, split, validation fraction, the run's :class:`SimConfig`). Run again on
the same ``DIR``, a grid loads the runs saved with its settings instead of running them; a saved run
with other settings is refused (:class:`ConfigError` naming the file and what differs) before any job
starts, never silently mixed in nor overwritten. Files are JSON, read back with
:func:`fedmfs.core.safejson.loads`: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmfs.core.errors import ConfigError, FedMFSError, PayloadError
from fedmfs.core.fsio import atomic_write
from fedmfs.core.safejson import loads as safe_loads

if TYPE_CHECKING:
    from fedmfs.core.data.format import Fleet
    from fedmfs.sim.config import SimConfig

__all__ = ["Job", "RunStore", "RUN_FORMAT", "WALL_CLOCK_FIELDS", "run_job", "execute", "ray_session",
           "result_differences", "fleet_settings"]

log = logging.getLogger(__name__)

RUN_FORMAT = "fedmfs.compare.run/1"
# what a row says about where and how fast it ran, not what it computed: left out of every equality
WALL_CLOCK_FIELDS = ("seconds", "cpu_seconds", "ran_on")
# a variant's name is a file name in the results directory
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
_RAY_OBJECT_STORE_MB = 200
# a round's accuracy by modality group (fedmfs.sim.report), kept in a saved run's rows
_GROUP_ROUND_FIELDS = ("rare_accuracy", "modality_set_accuracy")
_POLL_S = 5.0            # how long one ray.wait blocks: Ctrl-C stays responsive
_CONNECT_TIMEOUT_S = 5.0
_LOOPBACK_HOSTS = ("localhost", "::1")


# ------------------------------------------------------------------------------------ one job

@dataclass(frozen=True)
class Job:
    """One (variant, seed) run, fully resolved on the driver: ``config`` is what runs."""

    fleet_factory: Callable[[int], Fleet]
    variant: str
    family: str
    seed: int
    rounds: int
    split: str
    validation_fraction: float
    config: SimConfig


def fleet_settings(fleet_factory: Callable[[int], Fleet]) -> dict[str, Any]:
    """What identifies a fleet factory in saved settings: its class and, for a dataclass (e.g.
    :class:`fedmfs.sim.compare.SyntheticFleet`), its fields."""
    out: dict[str, Any] = {"factory": type(fleet_factory).__qualname__}
    if is_dataclass(fleet_factory) and not isinstance(fleet_factory, type):
        out.update(asdict(fleet_factory))
    return out


def _settings(job: Job) -> dict[str, Any]:
    """The settings a saved run must share with a job to stand for it (JSON values)."""
    return _json_roundtrip({"variant": job.variant, "seed": job.seed, "family": job.family,
                            "fleet": fleet_settings(job.fleet_factory), "rounds": job.rounds, "split": job.split,
                            "validation_fraction": job.validation_fraction, "config": job.config.to_dict()})


def _json_roundtrip(value: Any) -> Any:
    """``value`` as it reads back from a file: a fresh row and a loaded one compare equal."""
    return json.loads(json.dumps(value))


def run_job(job: Job) -> dict[str, Any]:
    """Run one job here, with one torch thread (restored after), and return its row: ``variant``,
    ``method``, ``family``, ``seed``, ``split``, ``config``, ``rounds`` (per round ``round``,
    ``accuracy``, ``upload_bytes``, ``cumulative_bytes``, the accuracy by modality group
    (``rare_accuracy``, ``modality_set_accuracy``), ``uploaded`` (modality -> uploads that round) and
    ``skipped`` (modality -> devices that did not train it)), ``final_accuracy``, ``rare_modalities``,
    ``total_upload_bytes``, ``last_shapley`` (each client's scores after the last round), ``seconds``
    (wall clock) and ``cpu_seconds`` (this process's CPU time for the run). The per-round groups,
    uploads and skips are results, not settings: a run saved before them still stands for its job,
    and reads as n/a for them."""
    import torch

    from fedmfs.sim.driver import run_simulation

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fleet = job.fleet_factory(job.seed)
        if job.split == "validation":
            fleet = fleet.validation_view(job.validation_fraction, seed=job.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        rep = run_simulation(fleet, job.config, "inproc")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(threads)
    cfg = job.config
    rows = [{"round": r["round"], "accuracy": r["accuracy"], "upload_bytes": int(r["upload_bytes"]),
             "cumulative_bytes": int(r["cumulative_bytes"]),
             **{k: r[k] for k in _GROUP_ROUND_FIELDS if k in r},
             # what went up (uploads per modality) and what the devices did not train (idle modalities)
             "uploaded": _count(u["modality"] for u in r.get("uploads", [])),
             "skipped": _count(m for c in r.get("clients", {}).values() for m in c.get("skipped", []))}
            for r in rep["rounds"]]
    groups = {"rare_modalities": rep["modality_groups"]["rare_modalities"]} if "modality_groups" in rep else {}
    return _json_roundtrip({
        "variant": job.variant, "method": cfg.method, "family": job.family, "seed": job.seed, "split": job.split,
        "config": cfg.to_dict(), "rounds": rows, "final_accuracy": rep["final_accuracy"], **groups,
        "total_upload_bytes": int(rep["total_upload_bytes"]), "seconds": seconds, "cpu_seconds": cpu,
        # what the scores were after the last round (ranking checks against the preset's truth)
        "last_shapley": {d: c.get("shapley", {}) for d, c in rep["rounds"][-1].get("clients", {}).items()}
        if rep["rounds"] else {}})


def _count(names) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[str(n)] = out.get(str(n), 0) + 1
    return dict(sorted(out.items()))


def _ray_task(job: Job) -> dict[str, Any]:
    """The body of a Ray task: :func:`run_job`, and the node it ran on."""
    import ray

    row = run_job(job)
    row["ran_on"] = f"ray node {ray.get_runtime_context().get_node_id()}"
    return row


def result_differences(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where two grids' rows differ, one line per (variant, seed) and field, every field compared
    exactly but :data:`WALL_CLOCK_FIELDS`; runs only one side has are listed too. Empty: equal."""
    def key(r: Mapping[str, Any]) -> tuple[str, int]:
        return str(r["variant"]), int(r["seed"])

    left, right = {key(r): r for r in a}, {key(r): r for r in b}
    out = [f"{v} seed {s}: only in the first" for v, s in left if (v, s) not in right]
    out += [f"{v} seed {s}: only in the second" for v, s in right if (v, s) not in left]
    for k in left.keys() & right.keys():
        ra, rb = left[k], right[k]
        for f in sorted((ra.keys() | rb.keys()) - set(WALL_CLOCK_FIELDS)):
            if not _same(ra.get(f), rb.get(f)):
                out.append(f"{k[0]} seed {k[1]}: {f} differs: {_short(ra.get(f))} vs {_short(rb.get(f))}")
    return sorted(out)


def _same(x: Any, y: Any) -> bool:
    """Exact equality, NaN equal to NaN (a CI of one value)."""
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same(p, q) for p, q in zip(x, y))
    return type(x) is type(y) and x == y


def _short(v: Any, n: int = 80) -> str:
    t = json.dumps(v)
    return t if len(t) <= n else t[: n - 3] + "..."


# ------------------------------------------------------------------------------------ results directory

class RunStore:
    """A grid's results directory: one JSON file per (variant, seed) under ``DIR/runs/``,
    ``{"format", "settings", "run"}``, written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.runs = self.root / "runs"

    def path(self, job: Job) -> Path:
        return self.runs / f"{job.variant}.seed{job.seed}.json"

    def save(self, job: Job, row: Mapping[str, Any]) -> Path:
        p = self.path(job)
        doc = {"format": RUN_FORMAT, "settings": _settings(job), "run": dict(row)}
        atomic_write(p, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o644)
        return p

    def load(self, job: Job) -> tuple[dict[str, Any] | None, str | None]:
        """(the saved row, None) when a run with ``job``'s settings is saved; (None, None) when none
        is; (None, why) when the file holds something else: a run with other settings (what differs)
        or no saved run at all."""
        p = self.path(job)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            doc = read_run_file(p, data)
        except ConfigError as e:
            return None, str(e)
        diffs = _differences(doc["settings"], _settings(job))
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            return None, f"{p} was saved with other settings than this grid's: {'; '.join(diffs[:3])}{more}"
        return doc["run"], None


def read_run_file(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """A saved run file's document, checked: ``format``, a ``settings`` and a ``run`` object whose
    variant and seed agree. Anything else is a :class:`ConfigError` naming the file."""
    try:
        doc = safe_loads(path.read_bytes() if data is None else data, str(path))
    except (PayloadError, OSError) as e:
        raise ConfigError(f"{path}: not a readable saved run ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT or not isinstance(doc.get("settings"), dict) \
            or not isinstance(doc.get("run"), dict):
        raise ConfigError(f"{path}: not a saved run of fedmfs compare (format {RUN_FORMAT} with settings and run)")
    s, r = doc["settings"], doc["run"]
    if (s.get("variant"), s.get("seed")) != (r.get("variant"), r.get("seed")):
        raise ConfigError(f"{path}: its settings are for {s.get('variant')} seed {s.get('seed')}, its run for "
                          f"{r.get('variant')} seed {r.get('seed')}")
    return doc


def _differences(saved: Any, now: Any, where: str = "") -> list[str]:
    """``key saved X, this grid Y`` for every leaf where ``saved`` and ``now`` differ."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in list(now) + [k for k in saved if k not in now]:
            out += _differences(saved.get(k), now.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if _same(saved, now) else [f"{where} saved {_short(saved, 40)}, this grid {_short(now, 40)}"]


# ------------------------------------------------------------------------------------ Ray

def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"--ray-address {address}: expected HOST:PORT (the head node's GCS address, as "
                          f"`ray start --head` prints it) or auto")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


@contextmanager
def _loopback_node_addresses(ray: Any) -> Iterator[None]:
    """While Ray starts or connects: keep "127.0.0.1" meaning loopback. On Linux Ray replaces a
    loopback address by the machine's outward one (its ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` switch,
    read once when ray is imported, turns that off); a local Ray for a sweep must listen on loopback
    only (Ray has no access control by default), and a test cluster on 127.0.0.1 must be reachable."""
    constants = ray._private.ray_constants
    before = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if before is None:    # a Ray without the switch: nothing to keep
        yield
        return
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before


@contextmanager
def ray_session(workers: int, address: str | None = None) -> Iterator[Any]:
    """The ``ray`` module, connected: to a local Ray started here on loopback (``workers`` CPUs, a
    200 MB object store, no dashboard; stopped on exit) when ``address`` is None, else to the
    cluster at ``address`` (``HOST:PORT`` or ``auto``; disconnected on exit). A connection this
    process already has is used as it is and left open."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("running the grid on Ray needs the ray package. Fix: pip install 'fedmfs[cluster]', "
                          "or run it in this process (--serial)") from e
    if ray.is_initialized():
        yield ray
        return
    # a local Ray, or a cluster on 127.0.0.1: loopback addresses stay loopback; "auto" is Ray's own lookup
    loopback = address is None
    if address is not None and address != "auto":
        host, port = _host_port(address)
        loopback = _is_loopback(host)
        try:     # Ray's own connect retries for minutes; an address where nothing listens fails here
            socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ConfigError(f"--ray-address {address}: no Ray cluster answers there ({e}). Fix: start one "
                              f"(`ray start --head`) and give the address it prints, or leave --ray-address "
                              f"out for a local Ray") from e
    with _loopback_node_addresses(ray) if loopback else _nothing():
        if address is None:
            # "local": a new instance even when another runs on this machine (ray.init() would join it)
            ray.init(address="local", num_cpus=workers, num_gpus=0, object_store_memory=_RAY_OBJECT_STORE_MB * 2**20,
                     include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# ------------------------------------------------------------------------------------ the grid

def execute(jobs: Sequence[Job], *, workers: int = 1, ray_address: str | None = None,
            out: str | Path | None = None, on_run: Callable[[dict[str, Any]], None] | None = None,
            on_resume: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run ``jobs``; return their rows in the jobs' order.

    Serial (in this process, one after another) when ``workers`` <= 1 and no ``ray_address``; else
    one Ray task per job (:func:`ray_session`). With ``out``, runs saved there with the same settings
    are loaded instead (``on_resume(rows)`` is told of them first), and each new run is saved as it
    finishes; a saved run with other settings stops the grid before any job starts. ``on_run(row)``
    is told of each new run once it is saved. A failed job does not stop the others: they finish (and
    are saved), then a :class:`FedMFSError` names every failed job."""
    for j in jobs:
        if not _NAME.fullmatch(j.variant):
            raise ConfigError(f"variant name {j.variant!r}: letters, digits and . _ + - only, starting with a "
                              f"letter or digit (it names the run's file)")
    store = RunStore(out) if out is not None else None
    rows: dict[int, dict[str, Any]] = {}
    if store is not None:
        refused = []
        for i, job in enumerate(jobs):
            row, why = store.load(job)
            if why is not None:
                refused.append(why)
            elif row is not None:
                rows[i] = row
        if refused:
            more = f" ({len(refused) - 1} more saved runs differ too)" if len(refused) > 1 else ""
            raise ConfigError(f"{refused[0]}{more}. Fix: give this grid another results directory (--out), or "
                              f"delete the file(s) to run them again")
        if rows and on_resume is not None:
            on_resume([rows[i] for i in sorted(rows)])
    todo = [i for i in range(len(jobs)) if i not in rows]
    failed: list[tuple[int, BaseException]] = []

    def finish(i: int, row: dict[str, Any]) -> None:
        if store is not None:
            store.save(jobs[i], row)
        rows[i] = row
        if on_run is not None:
            on_run(row)

    if todo and workers <= 1 and ray_address is None:
        for i in todo:
            try:
                row = run_job(jobs[i])
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                log.error("%s seed %d failed: %s", jobs[i].variant, jobs[i].seed, e)
                failed.append((i, e))
                continue
            row["ran_on"] = "this process"
            finish(i, row)
    elif todo:
        with ray_session(workers, ray_address) as ray:
            task = ray.remote(_ray_task).options(num_cpus=1, scheduling_strategy="SPREAD")
            refs = {task.remote(jobs[i]): i for i in todo}
            pending = list(refs)
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=_POLL_S)
                    for ref in ready:
                        i = refs[ref]
                        try:
                            row = ray.get(ref)
                        except Exception as e:   # the job's own error, or its worker died (after Ray's retries)
                            log.error("%s seed %d failed: %s", jobs[i].variant, jobs[i].seed, e)
                            failed.append((i, e))
                            continue
                        finish(i, row)
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
    if failed:
        names = ", ".join(f"{jobs[i].variant} seed {jobs[i].seed}" for i, _ in failed)
        kept = f"; the others are saved in {store.runs}, and running the grid again runs only the failed" \
            if store is not None else ""
        raise FedMFSError(f"{len(failed)} of {len(jobs)} runs failed ({names}): "
                          f"{type(failed[0][1]).__name__}: {failed[0][1]}{kept}") from failed[0][1]
    return [rows[i] for i in range(len(jobs))]
