"""The on-disk format of a fleet's data (documented in docs/data.md).

A fleet directory holds ``fleet.json`` (the dataset spec, the client list, free metadata) and one
``<client>.npz`` per client with, for every modality the client has, an array ``x_<modality>`` of
shape (N, T, *feature_shape) float32, plus ``y`` (N,) int64 labels and ``train`` (N,) bool (True for the
training split). A modality the client lacks is simply absent. Files are read with
``allow_pickle=False``: object arrays are refused. A client's name is its device id on the wire and the
stem of its file, so it follows the device-id rule (:data:`fedmfs.core.fields.NAME`).
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
from fedmfs.core.fields import NAME
from fedmfs.core.fsio import atomic_write_with, read_spec_document
from fedmfs.core.modality import DatasetSpec

__all__ = ["FORMAT_VERSION", "ClientData", "Fleet", "load_client", "load_fleet", "read_fleet_spec", "save_fleet"]

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
        """Check the name, shapes, dtypes and labels against the spec; list every problem found."""
        problems = []
        if not isinstance(self.name, str) or not NAME.match(self.name):
            problems.append(f"the name must match {NAME.pattern} (it is the device id and names the client's "
                            f".npz file)")
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


# what numpy and zipfile raise on a damaged archive: a truncated file (no central directory), a bad
# CRC, a cut deflate stream, a bad .npy header, an object array (allow_pickle=False); and, found by
# fuzzing (bench/fuzz.py): an unknown compression method (NotImplementedError), a .npy header numpy's
# tokenizer or literal_eval chokes on (TokenError, IndentationError, TypeError), a shape claiming more
# memory than there is (MemoryError, raised before anything is allocated), a member flagged encrypted
# (RuntimeError: "password required")
_UNREADABLE = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, SyntaxError,
               TypeError, MemoryError, tokenize.TokenError, RuntimeError)
_NPZ_FIX = ("Fix: write it with numpy.savez or fedmfs.core.data.save_fleet (docs/data.md); a truncated or "
            "partial copy fails this way")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        z = np.load(p, allow_pickle=False)
    except _UNREADABLE as e:
        raise DataError(f"{p}: not a readable .npz archive ({_first_line(e)}). {_NPZ_FIX}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{p}: not an .npz archive (numpy reads one array from it, a .npy file). {_NPZ_FIX}")
    try:
        with z:
            files = dict(z.items())
    except _UNREADABLE as e:
        raise DataError(f"{p}: not a readable .npz archive ({_first_line(e)}). {_NPZ_FIX}") from e
    # numpy hands back a member without the .npy magic as its raw bytes (found by fuzzing: validate() then
    # raised AttributeError on bytes.shape)
    raw = sorted(k for k, v in files.items() if not isinstance(v, np.ndarray))
    if raw:
        raise DataError(f"{p}: {', '.join(f'{k}.npy' for k in raw)} in the archive {'is' if len(raw) == 1 else 'are'} "
                        f"not .npy arrays. {_NPZ_FIX}")
    return files


def _labels(p: Path, y: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """``y`` as int64: integer arrays as they are, floats only when every value is a whole number
    (a fractional label is never rounded or truncated); strings, bools and the rest are refused."""
    fix = f"Fix: save y as int64 class indices in [0, {spec.num_classes})"
    if y.dtype.kind in "iu":
        return y.astype(np.int64, copy=False)
    if y.dtype.kind == "f":
        flat = y.ravel()
        bad = np.flatnonzero(~np.isfinite(flat) | (flat != np.round(flat)))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{p}: 'y' must hold integer class labels; {bad.size} of {flat.size} are not whole "
                            f"numbers (y[{i}] = {flat[i].item()!r}). {fix}")
        return y.astype(np.int64)
    kind = {"U": "strings", "S": "bytes", "b": "booleans", "O": "objects", "c": "complex numbers"}.get(y.dtype.kind,
                                                                                                     "values")
    example = f" such as {y.ravel()[0].item()!r}" if y.size else ""
    raise DataError(f"{p}: 'y' must hold integer class labels, got {kind} ({y.dtype}){example}. {fix}")


def load_client(path: str | os.PathLike, spec: DatasetSpec, name: str | None = None) -> ClientData:
    """Load one client's ``.npz`` and validate it against ``spec``; every error names the file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"client file {p} does not exist")
    files = _read_npz(p)
    for key in ("y", "train"):
        if key not in files:
            raise DataError(f"{p}: missing array {key!r} (expected y, train and x_<modality> arrays)")
    unexpected = [k for k in files if k not in ("y", "train") and not k.startswith("x_")]
    if unexpected:
        raise DataError(f"{p}: unexpected arrays {unexpected}; only y, train and x_<modality> are allowed")
    c = ClientData(
        name=name or p.stem,
        x={k[2:]: files[k] for k in files if k.startswith("x_")},
        y=_labels(p, files["y"], spec),
        train=files["train"],
    )
    try:
        c.validate(spec)
    except DataError as e:
        raise DataError(f"{p}: {e}") from e
    return c


def _read_fleet_json(d: Path) -> tuple[dict, DatasetSpec, list[str]]:
    """``fleet.json``: the document, its spec and its client names, each name checked before any file
    is opened (a name is a path component: ``../x`` would read outside the directory)."""
    mp = d / "fleet.json"
    meta, spec = read_spec_document(mp, "fedmfs-fleet", FORMAT_VERSION, DataError, "a fleet directory")
    names = meta.get("clients", [])
    if not isinstance(names, list):
        raise DataError(f"{mp}: 'clients' must be a list of client names, got {type(names).__name__}")
    if not names:
        raise DataError(f"{mp}: the fleet lists no clients")
    seen: set[str] = set()
    for i, n in enumerate(names):
        if not isinstance(n, str) or not NAME.match(n):
            raise DataError(f"{mp}: 'clients'[{i}] {n!r} is not a client name: it must match {NAME.pattern} "
                            f"(it is the device id and names the file <name>.npz in {d}). Fix: rename the "
                            f"client in fleet.json and its .npz file")
        if n in seen:
            raise DataError(f"{mp}: 'clients' lists {n!r} twice. Fix: list each client once")
        seen.add(n)
    return meta, spec, names


def read_fleet_spec(directory: str | os.PathLike) -> DatasetSpec:
    """The spec of a fleet directory, its ``fleet.json`` checked as :func:`load_fleet` does, without
    reading any client's data (what the checks of a run's options need)."""
    return _read_fleet_json(Path(directory))[1]


def load_fleet(directory: str | os.PathLike) -> Fleet:
    """Load a fleet written by :func:`save_fleet` (or by hand, following docs/data.md)."""
    d = Path(directory)
    meta, spec, names = _read_fleet_json(d)
    clients = [load_client(d / f"{n}.npz", spec, n) for n in names]
    return Fleet(spec, clients, meta.get("metadata", {}))
