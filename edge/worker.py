"""The edge daemon's heavy work, off the network loop: training, Stage #2 and ONNX export.

:class:`Trainer` owns the device's :class:`fedmfs.learner.learner.Learner` (torch) and the files it
writes (``client/``, ``pending/``, ``model/``); it turns a job action of the round machine
(:class:`~fedmfs.edge.machine.StartTraining`, :class:`~fedmfs.edge.machine.RunStage2`) into the
completion event. :class:`Worker` runs one job at a time on a background thread and posts that
event (or :class:`~fedmfs.edge.machine.JobFailed`) to the daemon's queue, so acks, config changes
and watchdog pings keep flowing while a round trains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedmfs.core.data.format import ClientData
from fedmfs.core.errors import FedMFSError, PayloadError
from fedmfs.core.fsio import atomic_write
from fedmfs.core.modality import DatasetSpec
from fedmfs.core.records import RoundRecord
from fedmfs.core.settings import TrainConfig

from .config import EdgeConfig
from .machine import JobFailed, JobKind, RebuildPayloads, Rebuilt, RunStage2, Stage2Done, StartTraining, Trained

__all__ = ["RESULT", "Job", "Trainer", "Worker", "InlineWorker", "job_kind"]

RESULT = "result.json"     # pending/: the finished training job's choice and round record

log = logging.getLogger("fedmfs.edge")

Job = StartTraining | RunStage2 | RebuildPayloads


class Trainer:
    """Runs jobs against the device's Learner; only ever called from one thread at a time.

    ``load`` returns the dataset spec and the device's data; it runs on the first job, so the
    daemon's start-up stays light (torch is imported with the learner, on the worker thread).
    ``export_model`` False skips the personalised ONNX model set after Stage #2 (simulations that
    only need the accuracy)."""

    def __init__(self, device: str, state_dir: Path, train: TrainConfig, seed: int, index: int,
                 load: Callable[[], tuple[DatasetSpec, ClientData]], spool: Path | None = None,
                 export_model: bool = True):
        self.device = device
        self.dir = Path(state_dir)
        self.train_config = train
        self.seed = seed
        self.index = index
        self.load = load
        self.spool = spool
        self.export_model = export_model
        # after each job, collect garbage and trim the heap (a daemon idles on what it keeps); a
        # simulator of many devices in one process turns it off (a full collection costs ~0.5 s there)
        self.release_memory = True
        # the process is this device's alone (`fedmfs-edge run`): what lives once the learner is made
        # lives as long as the process, and is frozen out of the garbage collector's sight
        self.own_process = False
        self._client = None

    @classmethod
    def from_config(cls, cfg: EdgeConfig) -> Trainer:
        """The daemon's trainer: spec and data from the files edge.toml names."""
        def load() -> tuple[DatasetSpec, ClientData]:
            from fedmfs.core.data.format import load_client
            from fedmfs.core.modality import load_spec

            spec = load_spec(cfg.spec)
            # memory-mapped: the windows stay on disk and a job gathers the modality it works on
            data = load_client(cfg.data, spec, cfg.device, mmap=True)
            data.check_splits()
            return spec, data

        return cls(cfg.device, cfg.state_dir, cfg.train, cfg.seed, cfg.index, load, cfg.spool)

    def run(self, job: Job):
        try:
            if isinstance(job, StartTraining):
                return self.train(job)
            if isinstance(job, RunStage2):
                return self.stage2(job)
            if isinstance(job, RebuildPayloads):
                return self.rebuild(job)
            raise TypeError(f"not a job: {job!r}")
        finally:
            if self.release_memory:
                # the heap after every job; the garbage collector's full pass (~0.13 s with torch loaded)
                # once a round, after Stage #2, when the daemon goes idle until the next round
                _release_memory(collect=not isinstance(job, StartTraining))

    # -- the learner, created lazily (torch is imported only here) --------------------------------
    def client(self, deploy: dict):
        if self._client is None:
            self._client = self._make_client(deploy)
        return self._client

    def _make_client(self, deploy: dict):
        import torch

        from fedmfs.learner.learner import Learner
        from fedmfs.learner.store import restore_learner

        spec, data = self.load()
        data = self._with_merged_spool(spec, data)
        torch.set_num_threads(self.train_config.threads)
        c = Learner(spec, data, self.train_config, self.seed, self.index)
        if (self.dir / "client" / "client.json").exists():
            restore_learner(c, self.dir / "client", deploy)
        if self.own_process:
            _freeze_what_lives()
        return c

    # -- jobs --------------------------------------------------------------------------------------
    def train(self, job: StartTraining) -> Trained:
        """Train round ``job.round`` and choose under exactly the policy the coordinator sent.

        The result is durable before the learner that trained is saved (``pending/result.json`` beside
        the payload files): a daemon stopped after the job finished but before its result reached the
        round machine takes that result again instead of training the round a second time, from a
        learner that has already trained it (which chose and uploaded something else).

        In three steps, so that a simulator can train many devices' rounds together
        (:func:`fedmfs.learner.fleet.local_rounds`): :meth:`begin_training` (a finished result, or the
        learner to train), the learner's ``local_round``, :meth:`end_training`."""
        begun = self.begin_training(job)
        if isinstance(begun, Trained):
            return begun
        t0 = time.perf_counter()
        upd = begun.local_round(job.round, dict(job.starts), job.config.policy.codec)
        return self.end_training(job, upd, time.perf_counter() - t0)

    def begin_training(self, job: StartTraining):
        """The result of ``job`` if it finished before a restart, else the learner that is to train it
        (spooled windows merged first)."""
        done = self._finished(job)
        if done is not None:
            return done
        self._merge_spool(dict(job.deploy))
        return self.client(dict(job.deploy))

    def end_training(self, job: StartTraining, upd, seconds: float) -> Trained:
        """Choose from the round's update ``upd``, make the choice durable, save the learner."""
        from fedmfs.learner.store import save_learner

        c, policy, r = self._client, job.config.policy, job.round
        choice = c.choose(upd, policy)
        c.mark_uploaded(choice.modalities, r)
        payloads = {m: c.payload(upd, m) for m in choice.modalities}
        (self.dir / "pending").mkdir(parents=True, exist_ok=True)
        for m, p in payloads.items():
            atomic_write(self.dir / "pending" / f"{m}.bin", p)
        record = c.record(upd, choice)
        result = {"round": r, "chosen": list(choice.modalities), "record": record.to_dict(),
                  "sha256": {m: hashlib.sha256(p).hexdigest() for m, p in payloads.items()}}
        atomic_write(self.dir / "pending" / RESULT, json.dumps(result, sort_keys=True).encode())
        save_learner(c, self.dir / "client")
        log.info("round %d: trained in %.1f s; %s chosen (%s, %s)", r, seconds,
                 ", ".join(choice.modalities) or "nothing", policy.method, policy.codec)
        return Trained(r, tuple(choice.modalities), payloads, record, time.time())

    def _finished(self, job: StartTraining) -> Trained | None:
        """The result of ``job``'s round if a run of it finished before a restart (``pending/result.json``
        with every payload file intact), else None."""
        p = self.dir / "pending" / RESULT
        try:
            doc = json.loads(p.read_bytes())
            if not isinstance(doc, dict) or doc.get("round") != job.round:
                return None
            chosen = tuple(doc["chosen"])
            payloads = {m: (self.dir / "pending" / f"{m}.bin").read_bytes() for m in chosen}
            if any(hashlib.sha256(payloads[m]).hexdigest() != doc["sha256"][m] for m in chosen):
                return None
            record = RoundRecord.from_dict(doc["record"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, PayloadError) as e:
            log.warning("round %d: the saved training result %s is unusable (%s); training the round", job.round, p, e)
            return None
        log.info("round %d: training had finished before the restart; taking its result (%s chosen)", job.round,
                 ", ".join(chosen) or "nothing")
        return Trained(job.round, chosen, payloads, record, time.time())

    def rebuild(self, job: RebuildPayloads) -> Rebuilt:
        """Re-encode the pending payloads of ``job.round`` from the local models saved after that round's
        training (the learner is saved right after the payloads are written, and only Stage #2 of the
        next round changes it). What cannot be rebuilt is left out, never an error: the machine then
        gives that upload up."""
        out = {}
        try:
            c = self.client({})
            for m in job.modalities:
                p = c.encode_modality(m, job.round, job.codec)
                (self.dir / "pending").mkdir(parents=True, exist_ok=True)
                atomic_write(self.dir / "pending" / f"{m}.bin", p)
                out[m] = p
        except Exception as e:   # no saved learner, no torch, a damaged client/: give those uploads up
            log.error("round %d: the payloads of %s cannot be rebuilt: %s: %s", job.round, ", ".join(job.modalities),
                      type(e).__name__, e)
        return Rebuilt(job.round, out, time.time())

    def stage2(self, job: RunStage2) -> Stage2Done:
        """Stage #2 on the round's globals: :meth:`begin_stage2` (the learner), its ``stage2``,
        :meth:`end_stage2` (evaluation, export, save); a simulator pools the middle step
        (:func:`fedmfs.learner.fleet.stage2_all`)."""
        c = self.begin_stage2(job)
        c.stage2(dict(job.deploy), job.round)
        return self.end_stage2(job)

    def begin_stage2(self, job: RunStage2):
        return self.client(dict(job.deploy))

    def end_stage2(self, job: RunStage2) -> Stage2Done:
        from fedmfs.learner.store import save_learner

        c = self._client
        acc = c.evaluate()
        if self.export_model:
            self._export_model(job.round)
        save_learner(c, self.dir / "client")
        windows = int((~c.data.train).sum())
        log.info("stage 2 after round %d: accuracy %.4f on %d test windows", job.round, acc, windows)
        return Stage2Done(job.round, acc, windows, time.time())

    def _export_model(self, round_index: int) -> None:
        """The personalised ONNX model set: per-modality graphs, fusion, coalition graph, and the
        one-graph personalised model (``fedmfs-edge predict``'s fast path)."""
        try:
            from fedmfs.core.runtime.graphs import model_set_onnx, personalised_model_onnx
        except ImportError as e:   # an inference-only install cannot export
            log.warning("no personalised ONNX model (export needs onnx): %s", e)
            return
        from fedmfs.core.runtime.modelset import write_model_set

        c = self._client
        mods, fusion = c.personalised_states()
        hidden = c.config.fusion_hidden
        models, fusion_onnx, coal = model_set_onnx(c.spec, mods, fusion, hidden)
        one = personalised_model_onnx(c.spec, mods, fusion, hidden)
        write_model_set(self.dir / "model", c.spec, models, fusion_onnx, coal,
                        versions={**{m: round_index for m in models}, "fusion": round_index,
                                  "coalitions": round_index, "personalised": round_index},
                        personalised_model=one)

    def _with_merged_spool(self, spec: DatasetSpec, data: ClientData) -> ClientData:
        """The device's data with the spool windows merged in earlier runs (``spool/merged/``): after a
        restart the learner sees the windows it trained on before, so its sample count and the payloads
        it rebuilds are the same."""
        done = self.spool / "merged" if self.spool is not None else None
        files = sorted(done.glob("*.npz")) if done is not None and done.is_dir() else []
        if not files:
            return data

        def left_out(f: Path, e: Exception) -> None:   # merged once, unusable now: say so, go on without it
            log.warning("merged spool file %s is unusable now (%s); left out", f, e)

        return _join_windows(spec, data, files, left_out)[0]

    def _merge_spool(self, deploy: dict) -> None:
        """New labelled windows (``*.npz`` in the client-file format) join the local data."""
        sp = self.spool
        if sp is None or not sp.is_dir():
            return
        files = sorted(sp.glob("*.npz"))
        if not files:
            return
        from fedmfs.learner.learner import Learner
        from fedmfs.learner.store import restore_learner, save_learner

        def refuse(f: Path, e: Exception) -> None:    # a bad spool file is set aside, never fatal
            log.warning("spool file %s refused: %s", f, e)
            f.rename(sp / (f.name + ".refused"))

        c = self.client(deploy)
        data, taken = _join_windows(c.spec, c.data, files, refuse)
        done = sp / "merged"
        done.mkdir(exist_ok=True)
        for f in taken:
            f.rename(done / f.name)
        save_learner(c, self.dir / "client")
        n = Learner(c.spec, data, c.config, c.seed, c.index)
        restore_learner(n, self.dir / "client", deploy)
        self._client = n
        log.info("merged %d spool files: %d windows now", len(files), len(data))


def _join_windows(spec: DatasetSpec, data: ClientData, files: list[Path],
                  refuse: Callable[[Path, Exception], None]) -> tuple[ClientData, list[Path]]:
    """``data`` with the windows of the client files ``files`` appended, and the files taken; a file that
    cannot be read, or has other modalities than the device, goes to ``refuse`` and is left out."""
    from fedmfs.core.data.format import load_client

    xs, ys, trains = {m: [v] for m, v in data.x.items()}, [data.y], [data.train]
    taken = []
    for f in files:
        try:
            extra = load_client(f, spec, data.name)
            if set(extra.x) != set(data.x):
                raise PayloadError(f"has modalities {sorted(extra.x)}, the device has {sorted(data.x)}")
        except Exception as e:
            refuse(f, e)
            continue
        for m in xs:
            xs[m].append(extra.x[m])
        ys.append(extra.y)
        trains.append(extra.train)
        taken.append(f)
    joined = ClientData(data.name, {m: np.concatenate(v) for m, v in xs.items()}, np.concatenate(ys),
                        np.concatenate(trains))
    return joined, taken


def _freeze_what_lives() -> None:
    """Collect once, then move every object alive now (torch's and ONNX's modules: ~170,000 objects, and
    the learner) out of the garbage collector's sight: they live as long as the daemon, and each full
    collection would walk them again (~0.07 s of CPU each: the daemon's once a round in
    :func:`_release_memory`, and Python's own during training). Only a daemon does this: the process is
    its own (``Trainer.own_process``; a simulator or a test leaves its process's collector alone)."""
    import gc

    gc.collect()
    gc.freeze()


def _release_memory(collect: bool = True) -> None:
    """After a job: collect its cycles (autograd graphs, ONNX Runtime sessions of the Shapley engine) and
    hand the freed heap back to the OS, so the daemon idles between rounds on what it keeps (the models,
    the mapped data), not on the peak of the last job (glibc keeps freed memory otherwise)."""
    import gc

    from fedmfs.core.runtime.memory import release_free_heap

    if collect:
        gc.collect()
    release_free_heap()


def job_kind(job: Job) -> JobKind:
    """The machine's name of a job's kind."""
    if isinstance(job, RebuildPayloads):
        return JobKind.REBUILD
    return JobKind.TRAIN if isinstance(job, StartTraining) else JobKind.STAGE2


class Worker:
    """One background thread running one job at a time; each completion is ``post``-ed as an event.

    Errors a retry may cure (bad or unreadable files, I/O) become a retryable :class:`JobFailed`;
    anything else (a configuration error, a bug) a fatal one, so the daemon exits with its code.
    """

    RETRYABLE = (PayloadError, ValueError, OSError)

    def __init__(self, run: Callable[[Job], object], post: Callable[[object], None],
                 clock: Callable[[], float] = time.monotonic):
        self._run = run
        self._post = post
        self._clock = clock
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._started = 0.0
        self._thread = threading.Thread(target=self._loop, name="fedmfs-edge-worker", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current is not None

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._current is not None:
                raise RuntimeError(f"the worker is busy with {self._current!r}")
            self._current = job
            self._started = self._clock()
        self._jobs.put(job)

    def running_for(self) -> float:
        """Seconds the current job has run (0 when idle)."""
        with self._lock:
            return self._clock() - self._started if self._current is not None else 0.0

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            result = self._execute(job)
            with self._lock:
                self._current = None
            self._post(result)

    def _execute(self, job: Job, run: Callable[[Job], object] | None = None) -> object:
        """The job's completion event (``run``, by default the worker's, carried out), or a JobFailed
        saying whether a retry may cure it."""
        try:
            return (run or self._run)(job)
        except BaseException as e:
            return self._execute_failed(job, e)

    def _execute_failed(self, job: Job, e: BaseException) -> JobFailed:
        """The JobFailed of ``job`` failing with ``e`` (called where ``e`` is being handled)."""
        if isinstance(e, OSError):   # a full disk, a read-only state dir: one line (the machine rate-limits repeats)
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            return JobFailed(job_kind(job), job.round, f"{type(e).__name__}: {e.strerror or e}{where}", True,
                             time.time())
        if isinstance(e, self.RETRYABLE):
            log.exception("%s job failed", job_kind(job).value)
            return JobFailed(job_kind(job), job.round, f"{type(e).__name__}: {e}", True, time.time())
        # reported to the loop, which stops the daemon
        log.exception("%s job failed", job_kind(job).value)
        code = e.exit_code if isinstance(e, FedMFSError) else 1
        return JobFailed(job_kind(job), job.round, f"{type(e).__name__}: {e}", False, time.time(), code)

    def stop(self, timeout: float) -> bool:
        """Ask the thread to end after its current job; True if it ended within ``timeout``."""
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


class InlineWorker(Worker):
    """The synchronous worker of the in-process simulator: :meth:`submit` runs the job on the caller's
    thread and posts its completion (or :class:`~fedmfs.edge.machine.JobFailed`) like :class:`Worker`."""

    def __init__(self, run: Callable[[Job], object], post: Callable[[object], None],
                 clock: Callable[[], float] = time.monotonic):
        self._run = run
        self._post = post
        self._clock = clock
        self._lock = threading.Lock()
        self._current = None
        self._started = 0.0

    def submit(self, job: Job) -> None:
        self._post(self._execute(job))

    def stop(self, timeout: float) -> bool:
        return True
