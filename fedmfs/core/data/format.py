"""The on-disk format of a fleet's data (documented in docs/data.md).

A fleet directory holds ``fleet.json`` (the dataset spec, the client list, free metadata) and one
``<client>.npz`` per client with, for every modality the client has, an array ``x_<modality>`` of
shape (N, T, *feature_shape) float32, plus ``y`` (N,) int64 labels and ``train`` (N,) bool (True for the
training split). A modality the client lacks is simply absent. Files are read with
``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import json
import os
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmfs.core.errors import DataError
from fedmfs.core.fsio import atomic_write_with, read_spec_document
from fedmfs.core.modality import DatasetSpec

__all__ = ["FORMAT_VERSION", "ClientData", "Fleet", "load_fleet", "save_fleet"]

FORMAT_VERSION = 1


@dataclass(slots=True)
class ClientData:
    """One client's windows: per-modality arrays, labels, and the train/test split."""

    name: str
    x: dict[str, np.ndarray]
    y: np.ndarray
    train: np.ndarray

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.x)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def split(self, train: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
        m = self.train if train else ~self.train
        return {k: v[m] for k, v in self.x.items()}, self.y[m]

    @property
    def n_train(self) -> int:
        return int(self.train.sum())

    def validate(self, spec: DatasetSpec) -> None:
        """Check shapes, dtypes and labels against the spec; list every problem found."""
        problems = []
        n = self.y.shape[0] if self.y.ndim == 1 else -1
        if self.y.ndim != 1:
            problems.append(f"y must be 1-D, got shape {self.y.shape}")
        elif self.y.size and (self.y.min() < 0 or self.y.max() >= spec.num_classes):
            problems.append(f"labels must be in [0, {spec.num_classes}), got [{self.y.min()}, {self.y.max()}]")
        if self.train.shape != (n,) or self.train.dtype != np.bool_:
            problems.append(f"train must be a bool array of shape ({n},), got {self.train.dtype} {self.train.shape}")
        for name, arr in self.x.items():
            try:
                ms = spec[name]
            except KeyError:
                problems.append(f"unknown modality {name!r} (the spec has {', '.join(spec.names)})")
                continue
            want = (n, spec.steps, *ms.feature_shape)
            if arr.shape != want:
                problems.append(f"x_{name} must have shape {want}, got {arr.shape}")
            if arr.dtype != np.float32:
                problems.append(f"x_{name} must be float32, got {arr.dtype}")
            elif not np.isfinite(arr).all():
                problems.append(f"x_{name} has NaN or infinite values")
        if not self.x:
            problems.append("the client has no modality")
        if problems:
            raise DataError(f"client {self.name!r}: " + "; ".join(problems))

    def check_splits(self) -> None:
        """A client that takes part in rounds needs training windows (to train and fit its fusion
        model) and test windows (to be evaluated). Spool files of new windows need not have both."""
        n_train, n_test = int(self.train.sum()), int((~self.train).sum())
        if n_train == 0 or n_test == 0:
            raise DataError(f"client {self.name!r} has {n_train} training and {n_test} test windows; it needs "
                            "at least one of each (set train = True for training windows, False for test)")


@dataclass(slots=True)
class Fleet:
    """A data set split over clients, with its spec and metadata (e.g. the generator's ground truth)."""

    spec: DatasetSpec
    clients: list[ClientData]
    metadata: dict = field(default_factory=dict)

    def validate(self) -> None:
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise DataError(f"duplicate client names: {names}")
        for c in self.clients:
            c.validate(self.spec)

    def check_runnable(self) -> None:
        """Every client can take part in rounds (:meth:`ClientData.check_splits`). A valid fleet need
        not be runnable: a partition may leave a client without test windows."""
        self.validate()
        for c in self.clients:
            c.check_splits()

    def validation_view(self, fraction: float = 0.25, seed: int = 0) -> Fleet:
        """The fleet to tune on: every client keeps only its training windows, and a stratified
        ``fraction`` of them becomes its "test" split (the validation windows); the real test windows
        are dropped, so a run on the view never sees them.

        Per client and class, ``round(n * fraction)`` of the class's ``n`` training windows validate,
        but always at least one of them still trains
        (:func:`~fedmfs.core.data.partition.stratified_split`); a client whose every class has a single
        training window gets no validation window (:meth:`check_runnable` then refuses it).
        Deterministic in ``seed``; the arrays are copies. ``metadata["split"]`` is ``"validation"``."""
        # a lazy import: partition imports this module
        from fedmfs.core.data.partition import stratified_split

        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        clients = []
        for k, c in enumerate(self.clients):
            x, y = c.split(True)
            train = stratified_split(y, 1.0 - fraction, np.random.default_rng([int(seed), 0x7A1, k]))
            clients.append(ClientData(c.name, x, y.copy(), train))
        meta = {**self.metadata, "split": "validation",
                "validation": {"fraction": float(fraction), "seed": int(seed)}}
        return Fleet(self.spec, clients, meta)



def save_fleet(fleet: Fleet, directory: str | os.PathLike) -> Path:
    """Write a fleet to ``directory`` (created if needed), each file atomically."""
    fleet.validate()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for c in fleet.clients:
        arrays = {f"x_{k}": v for k, v in c.x.items()}
        arrays["y"] = c.y.astype(np.int64)
        arrays["train"] = c.train
        def write(f, a: dict[str, Any] = arrays) -> None:
            np.savez(f, **a)

        atomic_write_with(d / f"{c.name}.npz", write)
    meta = {
        "format": "fedmfs-fleet",
        "version": FORMAT_VERSION,
        "spec": fleet.spec.to_dict(),
        "clients": [c.name for c in fleet.clients],
        "metadata": fleet.metadata,
    }
    atomic_write_with(d / "fleet.json", lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return d


# what numpy and zipfile raise on a damaged archive, as fuzzing found (bench/fuzz.py): a truncated file
# (BadZipFile), a cut deflate stream (zlib.error), an unknown compression method or zip version
# (NotImplementedError), a .npy header numpy's tokenizer or literal_eval chokes on (TokenError,
# IndentationError, TypeError), a shape claiming more memory than there is (MemoryError, raised before
# anything is allocated); besides what numpy documents (ValueError, OSError, EOFError)
_UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, SyntaxError,
               TypeError, MemoryError, tokenize.TokenError)


def _int_labels(p: Path, y: np.ndarray) -> np.ndarray:
    try:
        return y.astype(np.int64, copy=False)
    except (ValueError, TypeError) as e:     # strings, structured arrays (found by fuzzing)
        raise DataError(f"{p}: 'y' must hold integer class labels, got {y.dtype}: {e}") from e


def load_client(path: str | os.PathLike, spec: DatasetSpec, name: str | None = None) -> ClientData:
    """Load one client's ``.npz`` and validate it against ``spec``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"client file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            files = dict(z.items())
    except _UNREADABLE as e:
        raise DataError(f"{p} is not a readable .npz file: {type(e).__name__}: {e}") from e
    for key in ("y", "train"):
        if key not in files:
            raise DataError(f"{p}: missing array {key!r} (expected y, train and x_<modality> arrays)")
    unexpected = [k for k in files if k not in ("y", "train") and not k.startswith("x_")]
    if unexpected:
        raise DataError(f"{p}: unexpected arrays {unexpected}; only y, train and x_<modality> are allowed")
    c = ClientData(
        name=name or p.stem,
        x={k[2:]: files[k] for k in files if k.startswith("x_")},
        y=_int_labels(p, files["y"]),
        train=files["train"],
    )
    c.validate(spec)
    return c


def load_fleet(directory: str | os.PathLike) -> Fleet:
    """Load a fleet written by :func:`save_fleet` (or by hand, following docs/data.md)."""
    d = Path(directory)
    mp = d / "fleet.json"
    meta, spec = read_spec_document(mp, "fedmfs-fleet", FORMAT_VERSION, DataError, "a fleet directory")
    clients = [load_client(d / f"{n}.npz", spec, n) for n in meta.get("clients", [])]
    if not clients:
        raise DataError(f"{mp}: the fleet lists no clients")
    return Fleet(spec, clients, meta.get("metadata", {}))
