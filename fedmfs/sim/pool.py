"""The in-process simulator's job pool: every device's training (and Stage #2) of a round, run together.

In a real fleet each edge daemon trains its round on its own worker thread. In ``--transport inproc``
the daemons are pumped in turn by :func:`fedmfs.sim.driver.run_inproc`; their jobs are not run when
submitted but held here until the fleet has nothing else to do (every device that trains this round has
asked), then run as one pool: the learners' modality models train in the same batched steps and their
fusion models fit together (:mod:`fedmfs.learner.fleet`). Each device's files, choice, payloads and
completion event are made by its own :class:`~fedmfs.edge.worker.Trainer`, as a worker thread would,
and each completion goes back to its own daemon's queue.

A job that fails alone (a bad file) fails as it would on a device; an error of the pooled step is no
device's fault and fails every job of the pool, as fatal (a bug to see, not to retry around).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fedmfs.edge.machine import JobFailed, RunStage2, StartTraining
from fedmfs.edge.worker import InlineWorker, Job, Trainer, job_kind

__all__ = ["JobPool"]

log = logging.getLogger("fedmfs.sim")


class _PooledWorker(InlineWorker):
    """A daemon's worker whose jobs wait in the pool (``submit`` returns at once)."""

    def __init__(self, pool: JobPool, trainer: Trainer, post: Callable[[object], None]):
        super().__init__(trainer.run, post)
        self.pool = pool
        self.trainer = trainer

    def submit(self, job: Job) -> None:
        self.pool.pending.append((self, job))


class JobPool:
    """Jobs of every daemon of an in-process run; :meth:`run` runs what is pending."""

    def __init__(self, threads: int | None = None) -> None:
        self.pending: list[tuple[_PooledWorker, Job]] = []
        self.seconds = 0.0        # time spent running jobs
        # torch threads for the pooled steps: 1 by default. Two threads made a headroom round 1.5x faster on
        # an idle 2-core machine, and 8x slower on a busy one (OpenMP's waiting threads spin: 62 s of CPU
        # a round instead of 7.7), and sweeps run several simulations side by side
        self.threads = threads if threads is not None else 1

    def worker(self, trainer: Trainer, post: Callable[[object], None]) -> _PooledWorker:
        """The ``worker_factory`` of an :class:`~fedmfs.edge.daemon.EdgeDaemon`."""
        return _PooledWorker(self, trainer, post)

    def run(self) -> int:
        """Run every pending job; post each completion to its daemon. Returns the number run."""
        jobs, self.pending = self.pending, []
        if not jobs:
            return 0
        t0 = time.perf_counter()
        train = [(w, j) for w, j in jobs if isinstance(j, StartTraining)]
        stage2 = [(w, j) for w, j in jobs if isinstance(j, RunStage2)]
        for w, j in jobs:
            if not isinstance(j, (StartTraining, RunStage2)):
                w._post(w._execute(j))
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(max(before, self.threads))
        try:
            if train:
                self._train(train)
            if stage2:
                self._stage2(stage2)
        finally:
            torch.set_num_threads(before)
        self.seconds += time.perf_counter() - t0
        return len(jobs)

    def _begin(self, jobs, begin):
        """Each job's first step, failing alone; returns the jobs (and learners) that go on."""
        out = []
        for w, j in jobs:
            try:
                out.append((w, j, begin(w.trainer, j)))
            except Exception as e:
                w._post(w._execute_failed(j, e))
        return out

    @staticmethod
    def _fail_all(begun, what: str, e: Exception) -> None:
        """The pooled step failed: no device's fault, so every job of the pool fails, fatally (a bug)."""
        log.exception("the pooled %s of %d devices failed", what, len(begun))
        for w, j, _ in begun:
            w._post(JobFailed(job_kind(j), j.round, f"pooled {what}: {type(e).__name__}: {e}", False, time.time(), 1))

    def _train(self, jobs) -> None:
        from fedmfs.edge.machine import Trained
        from fedmfs.learner.fleet import local_rounds

        begun = []
        for w, j, c in self._begin(jobs, Trainer.begin_training):
            if isinstance(c, Trained):     # finished before a restart
                w._post(c)
            else:
                begun.append((w, j, c))
        if not begun:
            return
        t0 = time.perf_counter()
        try:
            updates = local_rounds([(c, j.round, dict(j.starts), j.config.policy.codec) for _, j, c in begun])
        except Exception as e:
            self._fail_all(begun, "training", e)
            return
        seconds = (time.perf_counter() - t0) / len(begun)
        for (w, j, _), upd in zip(begun, updates, strict=True):
            w._post(w._execute(j, lambda job, upd=upd, tr=w.trainer: tr.end_training(job, upd, seconds)))

    def _stage2(self, jobs) -> None:
        from fedmfs.learner.fleet import stage2_all

        begun = self._begin(jobs, Trainer.begin_stage2)
        if not begun:
            return
        try:
            stage2_all([(c, dict(j.deploy), j.round) for _, j, c in begun])
        except Exception as e:
            self._fail_all(begun, "Stage #2", e)
            return
        for w, j, _ in begun:
            w._post(w._execute(j, lambda job, tr=w.trainer: tr.end_stage2(job)))
