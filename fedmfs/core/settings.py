"""Local training and scoring settings of a device (the ``[train]`` table), torch-free.

The learner (:mod:`fedmfs.learner`) reads them; device configs and the simulator validate them
without importing torch. What a device uploads (method, gamma, alphas, cap, codec) is not here:
that is the coordinator's :class:`fedmfs.core.selection.SelectionPolicy`, pushed in the device's
config.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmfs.core.errors import ConfigError

__all__ = ["TrainConfig", "VALUE_KINDS", "ENGINES"]

VALUE_KINDS = ("prob", "loglik", "gain", "gain_lcb")
ENGINES = ("batched", "reference")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Local training and scoring settings.

    Defaults chosen on tuning seeds (docs/benchmarks.md, "Choosing the defaults"): a floor of 100
    optimiser steps with early stopping (patience 3) on the validation part; scores are the signed
    gain in held-out log-likelihood (fusion fitted on the training windows, judged on the validation
    part), smoothed over rounds (0.6 on the past). The paper's recipe is ``score_on="train"``,
    ``value_kind="prob"``, ``score_smoothing=0``, ``min_steps=0``, ``patience=0``."""

    epochs: int = 5
    # a floor of optimiser steps per round: epochs are added until it is reached (small data sets)
    min_steps: int = 100
    # early stopping: stop after `patience` epochs without a lower loss on the round's held-out fold
    # of the training windows, keeping the best epoch's weights (0: off, train the whole budget)
    patience: int = 3
    lr: float = 0.1
    batch_size: int = 32
    fusion_hidden: int = 64
    fusion_steps: int = 200
    fusion_lr: float = 0.01
    shapley_samples: int = 50
    # background rows (the first of the explained samples, which are in random order) that stand in
    # for an absent modality; exact Shapley costs samples x background x 2^M fusion evaluations
    shapley_background: int = 16
    # The validation part: one fixed stratified fold of `folds` of the training windows that the
    # modality models never train on (it exists when score_on is not "train" or patience > 0). Fixed,
    # because a fold that rotated over rounds would have been memorised in earlier rounds.
    # Where Stage #1 is fitted and scored. "train": the paper's recipe, on the training windows.
    # "holdout": fusion fitted and Shapley values taken on the validation part: a modality that
    # memorises its training windows cannot look informative there.
    # "crossfit": the fusion is fitted on the training windows (as the deployed fusion is) and judged
    # on the validation part only.
    score_on: str = "crossfit"
    folds: int = 5
    # "prob" (the paper's: |phi| over class probabilities), "loglik" (|phi| of the true class's
    # log-likelihood), "gain" (its signed mean: harmful contributions count against a modality) or
    # "gain_lcb" (that mean minus two standard errors: a modality counts as far as its help is sure)
    value_kind: str = "gain"
    # weight of the past in each modality's score (exponential smoothing over rounds; 0: this round's)
    score_smoothing: float = 0.6
    hard_labels: bool = False  # the paper feeds one-hot predicted labels to the fusion model
    # "onnx": the ONNX Runtime engine (the device's path); "numpy": the reference. Hard labels use numpy.
    shapley_backend: str = "onnx"
    threads: int = 1
    # "batched": a simulated fleet trains every device's modality models in the same batched steps
    # (fedmfs.learner.batched: each model as it trains alone, to float tolerance, at a fraction of the
    # per-call overhead); a device alone trains a model whose training windows fit in memory (at most
    # batched.COPY_LIMIT) with torch's fused LSTM, one at a time (faster for one model), and larger
    # memory-mapped ones in batched steps read from the file; fusions are fitted with a written-out
    # Adam. "reference": one nn.LSTM at a time and torch.optim's Adam (the reference path).
    engine: str = "batched"
    # A device (Learner.local_round) trains its large memory-mapped modality models in groups, one after
    # the other: smallest first, a group's models together while one step's batch of their windows (batch_size x
    # steps x features float32) stays within this many MiB; a model whose batch alone is larger trains
    # by itself. The same models either way (each model's steps are its own); what it trades is memory
    # against per-step overhead: on the actionsense preset (two 32x32 tactile grids, T=100) 8 MiB
    # trains each tactile model alone and the four small ones together: peak RSS of the training
    # +124 MiB instead of +234 MiB with all six pooled, at the same CPU time (each model alone: +99 MiB,
    # +28% CPU). docs/deploy.md. A simulated fleet pools every device's models regardless.
    pool_batch_mb: float = 8.0
    # Compute saving: a modality is *idle* in a round when the device did not send it and it showed no
    # value (under the evidence priority: a score at or below 0, or below its share of the best; under
    # the paper's formula: a priority at most half the gamma-th highest). A modality idle for
    # `idle_every` rounds in a row (while it still trained) then trains only every `idle_every`-th
    # round of its idle streak (its model is kept, still scored every round, and trained again then, so
    # that a modality that became useful is seen); the round's record names what it skipped. 0: every
    # modality trains every round.
    idle_every: int = 0

    def __post_init__(self) -> None:
        if self.value_kind not in VALUE_KINDS:
            raise ConfigError(f"value_kind must be one of {', '.join(map(repr, VALUE_KINDS))}, got {self.value_kind!r}")
        if self.score_on not in ("holdout", "train", "crossfit"):
            raise ConfigError(f"score_on must be 'train', 'holdout' or 'crossfit', got {self.score_on!r}")
        if not 0.0 <= self.score_smoothing < 1.0:
            raise ConfigError(f"score_smoothing must be in [0, 1), got {self.score_smoothing}")
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {self.engine!r}")
        if not self.pool_batch_mb >= 0:
            raise ConfigError(f"pool_batch_mb must be >= 0, got {self.pool_batch_mb}")
        if self.shapley_backend not in ("onnx", "numpy"):
            raise ConfigError(f"shapley_backend must be 'onnx' or 'numpy', got {self.shapley_backend!r}")
        for k in ("min_steps", "patience", "idle_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        for k in ("epochs", "batch_size", "fusion_hidden", "fusion_steps", "shapley_samples",
                  "shapley_background", "threads"):
            if getattr(self, k) <= 0 and not (k == "epochs" and getattr(self, k) == 0):
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)}")
