"""One device's learner: local training, Stage #1 fusion + Shapley, selection, Stage #2 personalised
fusion, evaluation. Pure computation: no sockets, threads, clocks or files (persistence is
:mod:`fedmfs.learner.store`), so the edge worker drives the very same object in a daemon and in
the in-process simulation. It produces one :class:`~fedmfs.core.records.RoundRecord` per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedmfs.core.data.format import ClientData, gather_rows
from fedmfs.core.modality import DatasetSpec
from fedmfs.core.payload import Codec, ModelHeader, encode_model, state_digest
from fedmfs.core.records import RoundRecord
from fedmfs.core.seeds import seed_for
from fedmfs.core.selection import SelectionInput, SelectionPolicy, evidence_priority
from fedmfs.core.settings import TrainConfig
from fedmfs.core.shapley import modality_gains
from fedmfs.learner.batched import (
    COPY_LIMIT,
    FusionJob,
    ModalityJob,
    fit_fusion_reference,
    fit_fusions,
    train_modalities,
)
from fedmfs.learner.models import FusionModel, ModalityModel, numpy_to_state, state_to_numpy
from fedmfs.learner.training import sgd_epochs

__all__ = ["LocalUpdate", "Choice", "Learner", "RoundPlan"]

State = dict[str, np.ndarray]


@dataclass(slots=True)
class LocalUpdate:
    """What a client produced in one round, before choosing what to upload."""

    round_index: int
    states: dict[str, State]
    sizes: dict[str, int]
    shapley: dict[str, float]
    samples: int
    stage1_accuracy: float
    codec: str                # of the payloads (the policy's, as the coordinator sent it)
    # the encoded upload of every modality (what ``sizes`` measures), encoded once
    payloads: dict[str, bytes] = field(default_factory=dict)
    # the modalities not trained this round (idle: TrainConfig.idle_every)
    skipped: tuple[str, ...] = ()


@dataclass(slots=True)
class RoundPlan:
    """A round in progress between :meth:`Learner.begin_round` and :meth:`Learner.end_round`: the
    held-out (validation) fold, the rows trained on and validated on (indices into the training
    windows), and the scoring rows with their modality outputs once trained."""

    round_index: int
    held: np.ndarray
    train_rows: np.ndarray
    val_rows: np.ndarray
    score_rows: np.ndarray | None = None
    probs: np.ndarray | None = None
    # the modalities that train this round (all present ones but the idle: TrainConfig.idle_every)
    train: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Choice:
    modalities: tuple[str, ...]
    priorities: dict[str, float]


def _to_probs(logp: torch.Tensor, hard: bool) -> torch.Tensor:
    if hard:
        return nn.functional.one_hot(logp.argmax(-1), logp.shape[-1]).float()
    return logp.exp()


@dataclass
class _History:
    last_upload: dict[str, int] = field(default_factory=dict)
    # digest of the global model each local model last started from
    synced: dict[str, str] = field(default_factory=dict)
    # each modality's smoothed score (TrainConfig.score_smoothing), what selection uses
    scores: dict[str, float] = field(default_factory=dict)
    # modality -> the first round of its current idle streak (not sent, priority at most half the
    # gamma-th's); absent: not idle
    idle_since: dict[str, int] = field(default_factory=dict)


class Learner:
    """A device's models and data. ``index`` seeds its randomness together with the run seed."""

    def __init__(self, spec: DatasetSpec, data: ClientData, config: TrainConfig, seed: int, index: int = 0):
        self.spec = spec
        self.data = data
        self.config = config
        self.seed = seed
        self.index = index
        self.present = [m for m in spec.names if m in data.x]
        self.mask = np.array([m in data.x for m in spec.names], dtype=bool)
        torch.manual_seed(seed_for(seed, index, 0xA11))
        self.models: dict[str, ModalityModel] = {m: ModalityModel(spec[m], spec.num_classes) for m in self.present}
        self.fusion: FusionModel | None = None
        self.deployed: dict[str, nn.Module] = {}
        self.history = _History()
        # views, not copies: a modality's training (test) windows are gathered when used and not held, so
        # a device holds its data once (memory-mapped on a device: docs/deploy.md) and not three times
        self.xtr, self.ytr = data.rows(True)
        self.xte, self.yte = data.rows(False)
        self.train_index = np.flatnonzero(data.train)     # training window i is data.x[m][train_index[i]]
        self.test_index = np.flatnonzero(~data.train)
        self.fold = self._folds(config.folds)

    def _folds(self, k: int) -> np.ndarray:
        """A fold number per training window, stratified by class (fixed for the client's life)."""
        rng = np.random.default_rng(seed_for(self.seed, self.index, 0xF01D))
        fold = np.zeros(len(self.ytr), np.int64)
        start = 0
        for c in np.unique(self.ytr):
            idx = np.nonzero(self.ytr == c)[0]
            idx = idx[rng.permutation(len(idx))]
            fold[idx] = (start + np.arange(len(idx))) % k
            start += len(idx)
        return fold

    # -- local training ---------------------------------------------------------------------------
    def _train_modality(self, m: str, round_index: int, rows: np.ndarray, val_rows: np.ndarray) -> int:
        cfg = self.config
        model = self.models[m]
        x = torch.from_numpy(gather_rows(self.data.x[m], self.train_index[rows]))
        y = torch.from_numpy(self.ytr[rows])
        rng = np.random.default_rng(seed_for(self.seed, self.index, round_index, self.spec.index(m)))
        loss_fn = nn.NLLLoss()
        val = None
        if len(val_rows):
            xv = torch.from_numpy(gather_rows(self.data.x[m], self.train_index[val_rows]))
            yv = torch.from_numpy(self.ytr[val_rows])
            val = lambda: float(loss_fn(model(xv), yv))
        return sgd_epochs(model, lambda b: loss_fn(model(x[b]), y[b]), len(y), cfg, rng, val_loss=val)

    def _probs(self, models: dict[str, nn.Module], idx: np.ndarray) -> np.ndarray:
        """(N, M, C) modality outputs as fusion inputs (zeros for absent modalities) for the device's
        windows ``idx`` (indices into its data, e.g. :attr:`train_index`). One modality at a time, in
        row chunks of about 8 MB: never a copy of every modality's windows at once."""
        n = len(idx)
        out = np.zeros((n, len(self.spec.names), self.spec.num_classes), np.float32)
        with torch.no_grad():
            for m in self.present:
                xm = self.data.x[m]
                step = max(1, (8 << 20) // max(1, 4 * int(np.prod(xm.shape[1:]))))
                for i in range(0, n, step):
                    part = gather_rows(xm, idx[i:i + step])
                    p = _to_probs(models[m](torch.from_numpy(part)), self.config.hard_labels)
                    out[i:i + step, self.spec.index(m)] = p.numpy()
        return out

    def fusion_job(self, probs: np.ndarray, y: np.ndarray, tag: int) -> FusionJob:
        """A fresh fusion model (seeded by ``tag``) to fit on ``probs`` (N, M, C) and labels ``y``."""
        torch.manual_seed(seed_for(self.seed, self.index, tag))
        f = FusionModel(len(self.spec.names), self.spec.num_classes, self.config.fusion_hidden)
        mk = torch.from_numpy(np.broadcast_to(self.mask.astype(np.float32), probs.shape[:2]).copy())
        return FusionJob(f, torch.from_numpy(probs), mk, torch.from_numpy(y))

    def _fusion_accuracy(self, f: FusionModel, probs: np.ndarray, y: np.ndarray) -> float:
        mk = torch.from_numpy(np.broadcast_to(self.mask.astype(np.float32), probs.shape[:2]).copy())
        with torch.no_grad():
            pred = f(torch.from_numpy(probs), mk).argmax(-1).numpy()
        return float((pred == y).mean()) if len(y) else 0.0

    def _shapley(self, f: FusionModel, rows: np.ndarray, y: np.ndarray, probs: np.ndarray,
                 round_index: int) -> np.ndarray:
        """Per-modality impact (M,) on a subsample of the scoring rows ``rows`` (indices into the
        device's windows; ``y`` and ``probs`` are theirs), against a background of
        ``shapley_background`` of those rows."""
        cfg = self.config
        rng = np.random.default_rng(seed_for(self.seed, self.index, round_index, 0x5A))
        n = len(y)
        idx = np.sort(rng.choice(n, size=min(cfg.shapley_samples, n), replace=False))
        bg = np.sort(rng.permutation(idx)[:cfg.shapley_background])
        # "gain": the signed contribution to the true class's log-likelihood, averaged over samples: a
        # modality whose contribution is large but harmful (noise the fusion trusts) scores below 0,
        # where |phi| (the paper's score) would count it as impact
        kind = "prob" if cfg.value_kind == "prob" else "loglik"
        if cfg.shapley_backend == "onnx" and not cfg.hard_labels:
            from fedmfs.core.runtime.graphs import model_set_runtime

            rt = model_set_runtime(
                self.spec,
                {m: state_to_numpy(self.models[m]) for m in self.present},
                state_to_numpy(f), cfg.fusion_hidden, threads=cfg.threads, personalised=False,
            )
            xs = {m: gather_rows(self.data.x[m], rows[idx]) for m in self.present}
            res = rt.shapley(xs, {m: gather_rows(self.data.x[m], rows[bg]) for m in self.present}, kind=kind,
                             y=y[idx], method="exact")
            if cfg.value_kind in ("gain", "gain_lcb"):
                return modality_gains(np.asarray(res.phi, dtype=np.float64), lower_bound=cfg.value_kind == "gain_lcb")
            return np.asarray(res.scores, dtype=np.float64)
        from fedmfs.core.shapley import exact_shapley, modality_scores

        def fusion_fn(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return f(torch.from_numpy(np.ascontiguousarray(z, np.float32)),
                         torch.from_numpy(np.ascontiguousarray(mask, np.float32))).exp().numpy()

        phi = exact_shapley(fusion_fn, probs[idx], probs[bg], self.mask, kind, y[idx])
        if cfg.value_kind in ("gain", "gain_lcb"):
            return modality_gains(phi, lower_bound=cfg.value_kind == "gain_lcb")
        return modality_scores(phi)

    def begin_round(self, round_index: int, globals: dict[str, State]) -> RoundPlan:
        """Start round ``round_index``: every local model starts from its global where that is new; the
        rows to train on and the validation rows."""
        cfg = self.config
        if cfg.score_on in ("holdout", "crossfit") or cfg.patience > 0:
            # the validation part: one fixed fold of the training windows the modality models never
            # train on (a fold that rotated would have been memorised in earlier rounds)
            held = self.fold == 0
        else:
            held = np.zeros(len(self.ytr), bool)
        for m in self.present:
            if m in globals:
                d = state_digest(globals[m])
                if self.history.synced.get(m) != d:
                    # a new global: start from it; an unchanged one: keep training the local model,
                    # which started from that global and has trained since
                    numpy_to_state(self.models[m], globals[m])
                    self.history.synced[m] = d
        train_rows = np.nonzero(~held)[0]
        val_rows = np.nonzero(held)[0] if cfg.patience > 0 else np.zeros(0, np.int64)
        return RoundPlan(round_index, held, train_rows, val_rows,
                         train=[m for m in self.present if self._trains(m, round_index)])

    def _trains(self, m: str, round_index: int) -> bool:
        """Whether modality ``m`` trains in round ``round_index``: always, unless it has been idle
        (TrainConfig.idle_every) for at least ``idle_every`` rounds in a row while it trained; then only
        every ``idle_every``-th round of its idle streak. A model that is merely slow to learn (early
        rounds, noisy scores) keeps training until its streak shows it has nothing to give."""
        k = self.config.idle_every
        since = self.history.idle_since.get(m)
        if k <= 0 or since is None:
            return True
        streak = round_index - since
        return streak < k or streak % k == 0

    def training_jobs(self, plan: RoundPlan) -> list[ModalityJob]:
        """The round's training of every modality model, for :func:`~fedmfs.learner.batched.train_modalities`
        (this device's alone, or with a simulated fleet's): the device's windows as they are (no copy),
        with the rows to train on and to validate on."""
        idx = self.train_index
        y = np.asarray(self.data.y, dtype=np.int64)
        return [ModalityJob(self.models[m], self.data.x[m], y,
                            np.random.default_rng(seed_for(self.seed, self.index, plan.round_index, self.spec.index(m))),
                            idx[plan.train_rows], idx[plan.val_rows]) for m in plan.train]

    def stage1_fit(self, plan: RoundPlan) -> FusionJob:
        """After training: the Stage #1 fusion model to fit (and the scoring rows' modality outputs,
        kept in ``plan`` for :meth:`end_round`)."""
        cfg = self.config
        held = plan.held if cfg.score_on != "train" else np.zeros(len(self.ytr), bool)
        # the paper's score_on="train": fitted and scored on the training windows
        plan.score_rows = np.nonzero(held)[0] if held.any() else np.arange(len(self.ytr))
        plan.probs = self._probs(self.models, self.train_index[plan.score_rows])
        ys = self.ytr[plan.score_rows]
        if cfg.score_on == "crossfit" and held.any():
            # the fusion is fitted where the modality models trained, as the deployed one will be,
            # and judged on the held-out windows: what a modality memorised does not carry over
            return self.fusion_job(self._probs(self.models, self.train_index[plan.train_rows]), self.ytr[plan.train_rows],
                                   seed_for(plan.round_index, 1))
        return self.fusion_job(plan.probs, ys, seed_for(plan.round_index, 1))

    def end_round(self, plan: RoundPlan, f1: FusionModel, codec: str) -> LocalUpdate:
        """Score the modalities with the fitted Stage #1 fusion ``f1`` and encode every modality's upload
        with ``codec`` (its size is part of the choice)."""
        assert plan.probs is not None and plan.score_rows is not None, "stage1_fit comes first"
        ys = self.ytr[plan.score_rows]
        scores = self._shapley(f1, self.train_index[plan.score_rows], ys, plan.probs, plan.round_index)
        states = {m: state_to_numpy(self.models[m]) for m in self.present}
        r = plan.round_index
        payloads = {m: self._encode(states[m], m, r, self.data.n_train, codec) for m in self.present}
        return LocalUpdate(
            round_index=r,
            states=states,
            # the real payload bytes (header with this round and sample count included)
            sizes={m: len(b) for m, b in payloads.items()},
            shapley=self._smooth({m: float(scores[self.spec.index(m)]) for m in self.present}),
            samples=self.data.n_train,
            stage1_accuracy=self._fusion_accuracy(f1, plan.probs, ys),
            payloads=payloads,
            codec=codec,
            skipped=tuple(m for m in self.present if m not in plan.train),
        )

    def local_round(self, round_index: int, globals: dict[str, State], codec: str) -> LocalUpdate:
        """Train every modality model from the current globals, fit Stage #1 fusion, score modalities,
        and encode every modality's upload with ``codec`` (its size is part of the choice).
        :func:`fedmfs.learner.fleet.local_rounds` runs the same phases for many devices at once."""
        plan = self.begin_round(round_index, globals)
        if self.config.engine == "reference":
            for m in plan.train:
                self._train_modality(m, round_index, plan.train_rows, plan.val_rows)
        else:
            # A device alone: a model whose training windows fit in memory trains with torch's fused LSTM
            # (one model's step costs less there than in the batched steps, which win by batching
            # many: measured 1.4 s a round against 1.1 s on a small-preset device); memory-mapped
            # windows larger than COPY_LIMIT train in batched steps read from the file (memory)
            jobs = self.training_jobs(plan)
            big = [j for j in jobs if isinstance(j.x, np.memmap)
                   and len(j.rows) * int(np.prod(j.x.shape[1:])) * 4 > COPY_LIMIT]
            for m, j in zip(plan.train, jobs, strict=True):     # training_jobs: one per modality that trains
                if j not in big:
                    self._train_modality(m, round_index, plan.train_rows, plan.val_rows)
            for group in self.training_groups(big):
                train_modalities(group, self.config)
        return self.end_round(plan, self._fit(self.stage1_fit(plan)), codec)

    def training_groups(self, jobs: list[ModalityJob]) -> list[list[ModalityJob]]:
        """``jobs`` in the groups this device trains one after the other (``TrainConfig.pool_batch_mb``):
        smallest batch first, together while a step's batch of windows stays within the budget. Each
        model trains the same in any group; the groups bound the memory of a step (a paper-size
        device's two tactile models pooled hold 2 x 13 MB of batch and their activations at once)."""
        budget = self.config.pool_batch_mb * (1 << 20)
        size = {id(j): self.config.batch_size * 4 * int(np.prod(j.x.shape[1:])) for j in jobs}
        groups: list[list[ModalityJob]] = []
        used = 0.0
        for j in sorted(jobs, key=lambda j: size[id(j)]):
            if groups and used + size[id(j)] <= budget:
                groups[-1].append(j)
                used += size[id(j)]
            else:
                groups.append([j])
                used = size[id(j)]
        return groups

    def _fit(self, job: FusionJob) -> FusionModel:
        if self.config.engine == "reference":
            fit_fusion_reference(job, self.config.fusion_steps, self.config.fusion_lr)
        else:
            fit_fusions([job], self.config.fusion_steps, self.config.fusion_lr)
        return job.model

    def _smooth(self, scores: dict[str, float]) -> dict[str, float]:
        """The round's scores blended with the previous ones (exponential smoothing, weight
        ``score_smoothing`` on the past): the evidence of several rounds, so that a noise modality's
        chance contribution in one round does not outrank what helps round after round."""
        b = self.config.score_smoothing
        out = {m: (b * self.history.scores[m] + (1 - b) * v) if m in self.history.scores else v
               for m, v in scores.items()}
        self.history.scores.update(out)
        return out

    # -- selection and upload --------------------------------------------------------------------
    def choose(self, update: LocalUpdate, policy: SelectionPolicy) -> Choice:
        """What to upload this round under ``policy`` (the one the coordinator sent)."""
        if Codec(policy.codec) is not Codec(update.codec):
            raise ValueError(f"the update was encoded as {update.codec}, the policy says {policy.codec}")
        round_index = update.round_index
        mods = tuple(self.present)
        since = np.array([round_index - self.history.last_upload.get(m, -1) for m in mods], dtype=np.float64)
        inp = SelectionInput(
            modalities=mods,
            shapley=np.array([update.shapley[m] for m in mods]),
            sizes=np.array([update.sizes[m] for m in mods]),
            rounds_since_upload=since,
            round_index=round_index,
            gamma=policy.gamma_for(len(self.spec.names)),
            cap_bytes=policy.cap_bytes,
        )
        rng = np.random.default_rng(seed_for(self.seed, self.index, round_index, 0x5E1))
        chosen, prio = policy.selector().select(inp, rng)
        self._note_idle(mods, chosen, np.asarray(prio, dtype=np.float64), inp, policy)
        return Choice(tuple(chosen), {m: float(p) for m, p in zip(mods, prio)})

    def _note_idle(self, mods: tuple[str, ...], chosen: list[str], prio: np.ndarray, inp: SelectionInput,
                   policy: SelectionPolicy) -> None:
        """Note which modalities are idle this round (TrainConfig.idle_every): not sent, and without
        evidence of value under the evidence priority (a score at or below 0, or below ``evidence`` times
        the best: what that priority never sends); under the paper's formula, a priority at most half the
        gamma-th highest. A modality that helps but ranks below others is not idle: it keeps training, as
        the fusion leans on it. Idempotent for a round (a choice made again after a restart notes the
        same)."""
        if policy.priority == "evidence":
            _, eligible = evidence_priority(inp.shapley, inp.sizes, policy.alphas, inp.rounds_since_upload,
                                            inp.round_index, policy.evidence)
            idle = ~eligible
        else:
            top = np.sort(prio)[::-1]
            kth = float(top[min(max(inp.gamma, 1), len(top)) - 1]) if len(top) else 0.0
            idle = (prio <= 0.5 * kth) if kth > 0 else np.zeros(len(prio), bool)
        r = inp.round_index
        for m, i in zip(mods, idle):
            if i and m not in chosen:
                if self.history.idle_since.get(m, r + 1) > r:
                    self.history.idle_since[m] = r
            else:
                self.history.idle_since.pop(m, None)

    def record(self, update: LocalUpdate, choice: Choice) -> RoundRecord:
        """The round's record, as the device reports it."""
        return RoundRecord(self.data.name, update.round_index, update.samples, dict(update.shapley),
                           dict(update.sizes), dict(choice.priorities), tuple(choice.modalities),
                           update.stage1_accuracy, update.skipped)

    def mark_uploaded(self, modalities, round_index: int) -> None:
        for m in modalities:
            self.history.last_upload[m] = round_index

    @staticmethod
    def _encode(state: State, modality: str, round_index: int, samples: int, codec: str) -> bytes:
        return encode_model(state, ModelHeader(round=round_index, modality=modality, samples=samples,
                                               codec=Codec(codec)))

    def encode_modality(self, modality: str, round_index: int, codec: str) -> bytes:
        """The upload of ``modality`` from the local model as it is now: after a round's training (and a
        restore of what was saved then) the very bytes :meth:`local_round` encoded for that round."""
        if modality not in self.present:
            raise ValueError(f"this device has no {modality!r} model")
        return self._encode(state_to_numpy(self.models[modality]), modality, round_index, self.data.n_train, codec)

    def payload(self, update: LocalUpdate, modality: str) -> bytes:
        """The upload of ``modality`` (encoded once, in :meth:`local_round`)."""
        return update.payloads[modality]

    # -- Stage #2 and evaluation ----------------------------------------------------------------
    def deployed_models(self, globals: dict[str, State]) -> dict[str, nn.Module]:
        """The newest model of every modality: the global where it is new since the local model last
        started from a global (it was just aggregated), else the local model (it started from the
        current global, or there is none yet, and has trained since)."""
        out: dict[str, nn.Module] = {}
        for m in self.present:
            if m in globals and state_digest(globals[m]) != self.history.synced.get(m):
                g = ModalityModel(self.spec[m], self.spec.num_classes)
                numpy_to_state(g, globals[m])
                g.eval()
                out[m] = g
            else:
                out[m] = self.models[m]
        return out

    def stage2_fit(self, globals: dict[str, State], round_index: int) -> FusionJob:
        """Deploy the global models; the personalised fusion to fit on their predictions (its fitted
        model goes to :attr:`fusion`)."""
        self.deployed = self.deployed_models(globals)
        return self.fusion_job(self._probs(self.deployed, self.train_index), self.ytr, seed_for(round_index, 2))

    def stage2(self, globals: dict[str, State], round_index: int) -> None:
        """Deploy the global models and refit the personalised fusion on their predictions."""
        self.fusion = self._fit(self.stage2_fit(globals, round_index))

    def evaluate(self) -> float:
        """Accuracy of the personalised model (deployed modality models + fusion) on the test split."""
        if self.fusion is None:
            raise RuntimeError("stage2 has not run yet")
        probs = self._probs(self.deployed, self.test_index)
        return self._fusion_accuracy(self.fusion, probs, self.yte)

    def personalised_states(self) -> tuple[dict[str, State], State]:
        """The deployed modality models and fusion model as numpy states (for ONNX export)."""
        if self.fusion is None:
            raise RuntimeError("stage2 has not run yet")
        return {m: state_to_numpy(v) for m, v in self.deployed.items()}, state_to_numpy(self.fusion)
