"""Local training and scoring settings of a device (the ``[train]`` table), torch-free.

The learner (:mod:`fedmfs.learner`) reads them; device configs and the simulator validate them
without importing torch. What a device uploads (method, gamma, alphas, cap, codec) is not here:
that is the coordinator's :class:`fedmfs.core.selection.SelectionPolicy`, pushed in the device's
config.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmfs.core.errors import ConfigError

__all__ = ["TrainConfig"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Local training and scoring settings (paper defaults where the paper gives one)."""

    epochs: int = 5
    lr: float = 0.1
    batch_size: int = 32
    fusion_hidden: int = 64
    fusion_steps: int = 200
    fusion_lr: float = 0.01
    shapley_samples: int = 50
    # Where Stage #1 is fitted and scored. "train" (default): the paper's recipe, on training windows.
    # "holdout": each round one of `folds` stratified folds of the training split is held out of local
    # training (round-robin, so every window trains in most rounds) and Stage #1 fusion + Shapley use
    # it: a modality that memorises its training windows cannot look informative.
    # "crossfit": the held-out fold as with "holdout", but the fusion is fitted on the training windows
    # (as the deployed fusion is) and only judged on the held-out ones.
    score_on: str = "train"
    folds: int = 5
    # "prob" (the paper's: |phi| over class probabilities), "loglik" (|phi| of the true class's
    # log-likelihood) or "gain" (its signed mean: harmful contributions count against a modality)
    value_kind: str = "prob"
    hard_labels: bool = False  # the paper feeds one-hot predicted labels to the fusion model
    # "onnx": the ONNX Runtime engine (the device's path); "numpy": the reference. Hard labels use numpy.
    shapley_backend: str = "onnx"
    threads: int = 1

    def __post_init__(self) -> None:
        if self.value_kind not in ("prob", "loglik", "gain"):
            raise ConfigError(f"value_kind must be 'prob', 'loglik' or 'gain', got {self.value_kind!r}")
        if self.score_on not in ("holdout", "train", "crossfit"):
            raise ConfigError(f"score_on must be 'train', 'holdout' or 'crossfit', got {self.score_on!r}")
        if self.folds < 2:
            raise ConfigError(f"folds must be >= 2, got {self.folds}")
        if self.shapley_backend not in ("onnx", "numpy"):
            raise ConfigError(f"shapley_backend must be 'onnx' or 'numpy', got {self.shapley_backend!r}")
        for k in ("epochs", "batch_size", "fusion_hidden", "fusion_steps", "shapley_samples", "threads"):
            if getattr(self, k) <= 0 and not (k == "epochs" and getattr(self, k) == 0):
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)}")
