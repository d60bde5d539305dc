"""A simulated fleet's devices trained together: :meth:`Learner.local_round` and :meth:`Learner.stage2` of
many learners in the same batched steps (:mod:`fedmfs.learner.batched`).

Each learner runs its own phases (:meth:`~Learner.begin_round`, :meth:`~Learner.training_jobs`,
:meth:`~Learner.stage1_fit`, :meth:`~Learner.end_round`); only the two heavy ones, training the modality
models and fitting the fusion models, are pooled across learners. Every learner's result is the one its
own ``local_round`` gives, to float tolerance (``tests/learner/test_fleet.py``). Learners on the
reference engine, or whose training settings differ, are trained in separate pools.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmfs.learner.batched import FusionJob, fit_fusion_reference, fit_fusions, train_modalities
from fedmfs.learner.learner import Learner, LocalUpdate, State

__all__ = ["local_rounds", "stage2_all"]


def _train_key(lr: Learner) -> tuple:
    c = lr.config
    return (c.engine, c.epochs, c.min_steps, c.patience, c.lr, c.batch_size)


def _fit_all(learners: Sequence[Learner], jobs: Sequence[FusionJob]) -> None:
    """Fit every fusion job (``jobs[i]`` of ``learners[i]``) with its learner's engine and settings."""
    pools: dict[tuple, list[FusionJob]] = {}
    for lr, job in zip(learners, jobs):
        c = lr.config
        if c.engine == "reference":
            fit_fusion_reference(job, c.fusion_steps, c.fusion_lr)
        else:
            shapes = tuple(tuple(p.shape) for p in job.model.parameters())
            pools.setdefault((c.fusion_steps, c.fusion_lr, shapes), []).append(job)
    for (steps, rate, _), pool in pools.items():
        fit_fusions(pool, steps, rate)


def local_rounds(items: Sequence[tuple[Learner, int, dict[str, State], str]]) -> list[LocalUpdate]:
    """``[lr.local_round(round, globals, codec) for lr, round, globals, codec in items]``, with every
    learner's modality models trained in one pool and its Stage #1 fusions fitted in another."""
    if len({id(lr) for lr, *_ in items}) != len(items):
        raise ValueError("a learner can run one round at a time")
    plans = [lr.begin_round(r, g) for lr, r, g, _ in items]
    pools: dict[tuple, list] = {}
    for (lr, *_), plan in zip(items, plans):
        if lr.config.engine == "reference":
            for m in plan.train:
                lr._train_modality(m, plan.round_index, plan.train_rows, plan.val_rows)
        else:
            pools.setdefault(_train_key(lr), []).extend(lr.training_jobs(plan))
    for key, jobs in pools.items():
        # a simulation: the training windows are copied into memory whatever their size (faster steps)
        train_modalities(jobs, next(lr.config for lr, *_ in items if _train_key(lr) == key), copy_limit=None)
    learners = [lr for lr, *_ in items]
    fits = [lr.stage1_fit(plan) for lr, plan in zip(learners, plans)]
    _fit_all(learners, fits)
    return [lr.end_round(plan, job.model, codec) for (lr, _, _, codec), plan, job in zip(items, plans, fits)]


def stage2_all(items: Sequence[tuple[Learner, dict[str, State], int]]) -> None:
    """``lr.stage2(globals, round)`` for every item, the personalised fusions fitted in one pool."""
    learners = [lr for lr, *_ in items]
    jobs = [lr.stage2_fit(g, r) for lr, g, r in items]
    _fit_all(learners, jobs)
    for lr, job in zip(learners, jobs):
        lr.fusion = job.model

