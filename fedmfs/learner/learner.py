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

from fedmfs.core.data.format import ClientData
from fedmfs.core.modality import DatasetSpec
from fedmfs.core.payload import Codec, ModelHeader, encode_model, state_digest
from fedmfs.core.records import RoundRecord
from fedmfs.core.seeds import seed_for
from fedmfs.core.selection import SelectionInput, SelectionPolicy
from fedmfs.core.settings import TrainConfig
from fedmfs.core.shapley import modality_gains
from fedmfs.learner.models import FusionModel, ModalityModel, numpy_to_state, state_to_numpy
from fedmfs.learner.training import sgd_epochs

__all__ = ["LocalUpdate", "Choice", "Learner"]

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
        x = torch.from_numpy(self.xtr[m][rows])
        y = torch.from_numpy(self.ytr[rows])
        rng = np.random.default_rng(seed_for(self.seed, self.index, round_index, self.spec.index(m)))
        loss_fn = nn.NLLLoss()
        val = None
        if len(val_rows):
            xv, yv = torch.from_numpy(self.xtr[m][val_rows]), torch.from_numpy(self.ytr[val_rows])
            val = lambda: float(loss_fn(model(xv), yv))
        return sgd_epochs(model, lambda b: loss_fn(model(x[b]), y[b]), len(y), cfg, rng, val_loss=val)

    def _probs(self, models: dict[str, nn.Module], x: dict[str, np.ndarray]) -> np.ndarray:
        """(N, M, C) modality outputs as fusion inputs (zeros for absent modalities)."""
        n = len(next(iter(x.values())))
        out = np.zeros((n, len(self.spec.names), self.spec.num_classes), np.float32)
        with torch.no_grad():
            for m in self.present:
                p = _to_probs(models[m](torch.from_numpy(x[m])), self.config.hard_labels)
                out[:, self.spec.index(m)] = p.numpy()
        return out

    def _fit_fusion(self, probs: np.ndarray, y: np.ndarray, tag: int) -> FusionModel:
        cfg = self.config
        torch.manual_seed(seed_for(self.seed, self.index, tag))
        f = FusionModel(len(self.spec.names), self.spec.num_classes, cfg.fusion_hidden)
        opt = torch.optim.Adam(f.parameters(), lr=cfg.fusion_lr)
        p = torch.from_numpy(probs)
        mk = torch.from_numpy(np.broadcast_to(self.mask.astype(np.float32), probs.shape[:2]).copy())
        yt = torch.from_numpy(y)
        loss_fn = nn.NLLLoss()
        f.train()
        for _ in range(cfg.fusion_steps):
            opt.zero_grad()
            loss_fn(f(p, mk), yt).backward()
            opt.step()
        f.eval()
        return f

    def _fusion_accuracy(self, f: FusionModel, probs: np.ndarray, y: np.ndarray) -> float:
        mk = torch.from_numpy(np.broadcast_to(self.mask.astype(np.float32), probs.shape[:2]).copy())
        with torch.no_grad():
            pred = f(torch.from_numpy(probs), mk).argmax(-1).numpy()
        return float((pred == y).mean()) if len(y) else 0.0

    def _shapley(self, f: FusionModel, x: dict[str, np.ndarray], y: np.ndarray, probs: np.ndarray,
                 round_index: int) -> np.ndarray:
        """Per-modality impact (M,) on a subsample of the scoring rows, against a background of
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
                state_to_numpy(f), cfg.fusion_hidden, threads=cfg.threads,
            )
            xs = {m: x[m][idx] for m in self.present}
            res = rt.shapley(xs, {m: x[m][bg] for m in self.present}, kind=kind, y=y[idx], method="exact")
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

    def local_round(self, round_index: int, globals: dict[str, State], codec: str) -> LocalUpdate:
        """Train every modality model from the current globals, fit Stage #1 fusion, score modalities,
        and encode every modality's upload with ``codec`` (its size is part of the choice)."""
        cfg = self.config
        if cfg.score_on in ("holdout", "crossfit") or cfg.patience > 0:
            # the validation part: one fixed fold of the training windows the modality models never
            # train on (a fold that rotated would have been memorised in earlier rounds)
            held = self.fold == 0
        else:
            held = np.zeros(len(self.ytr), bool)
        train_rows = np.nonzero(~held)[0]
        val_rows = np.nonzero(held)[0] if cfg.patience > 0 else np.zeros(0, np.int64)
        for m in self.present:
            if m in globals:
                d = state_digest(globals[m])
                if self.history.synced.get(m) != d:
                    # a new global: start from it; an unchanged one: keep training the local model,
                    # which started from that global and has trained since
                    numpy_to_state(self.models[m], globals[m])
                    self.history.synced[m] = d
            self._train_modality(m, round_index, train_rows, val_rows)
        if cfg.score_on == "train":
            held = np.zeros(len(self.ytr), bool)  # the paper's: fitted and scored on the training windows
        score_rows = np.nonzero(held)[0] if held.any() else np.arange(len(self.ytr))
        xs = {m: v[score_rows] for m, v in self.xtr.items()}
        ys = self.ytr[score_rows]
        probs = self._probs(self.models, xs)
        if cfg.score_on == "crossfit" and held.any():
            # the fusion is fitted where the modality models trained, as the deployed one will be,
            # and judged on the held-out windows: what a modality memorised does not carry over
            xf = {m: v[train_rows] for m, v in self.xtr.items()}
            f1 = self._fit_fusion(self._probs(self.models, xf), self.ytr[train_rows], seed_for(round_index, 1))
        else:
            f1 = self._fit_fusion(probs, ys, seed_for(round_index, 1))
        scores = self._shapley(f1, xs, ys, probs, round_index)
        states = {m: state_to_numpy(self.models[m]) for m in self.present}
        payloads = {m: self._encode(states[m], m, round_index, self.data.n_train, codec) for m in self.present}
        return LocalUpdate(
            round_index=round_index,
            states=states,
            # the real payload bytes (header with this round and sample count included)
            sizes={m: len(b) for m, b in payloads.items()},
            shapley=self._smooth({m: float(scores[self.spec.index(m)]) for m in self.present}),
            samples=self.data.n_train,
            stage1_accuracy=self._fusion_accuracy(f1, probs, ys),
            payloads=payloads,
            codec=codec,
        )

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
        return Choice(tuple(chosen), {m: float(p) for m, p in zip(mods, prio)})

    def record(self, update: LocalUpdate, choice: Choice) -> RoundRecord:
        """The round's record, as the device reports it."""
        return RoundRecord(self.data.name, update.round_index, update.samples, dict(update.shapley),
                           dict(update.sizes), dict(choice.priorities), tuple(choice.modalities),
                           update.stage1_accuracy)

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

    def stage2(self, globals: dict[str, State], round_index: int) -> None:
        """Deploy the global models and refit the personalised fusion on their predictions."""
        self.deployed = self.deployed_models(globals)
        probs = self._probs(self.deployed, self.xtr)
        self.fusion = self._fit_fusion(probs, self.ytr, seed_for(round_index, 2))

    def evaluate(self) -> float:
        """Accuracy of the personalised model (deployed modality models + fusion) on the test split."""
        if self.fusion is None:
            raise RuntimeError("stage2 has not run yet")
        probs = self._probs(self.deployed, self.xte)
        return self._fusion_accuracy(self.fusion, probs, self.yte)

    def personalised_states(self) -> tuple[dict[str, State], State]:
        """The deployed modality models and fusion model as numpy states (for ONNX export)."""
        if self.fusion is None:
            raise RuntimeError("stage2 has not run yet")
        return {m: state_to_numpy(v) for m, v in self.deployed.items()}, state_to_numpy(self.fusion)
