"""Loader for UCI HAR's raw inertial signals: three 3-axis sensors, 128 steps, 30 subjects as clients.

Reads the text files of the original archive (``UCI HAR Dataset/``)::

    {train,test}/Inertial Signals/{body_acc,body_gyro,total_acc}_{x,y,z}_{train,test}.txt   128 floats a row
    {train,test}/y_{train,test}.txt          one label a row, 1..6 (mapped to 0..5)
    {train,test}/subject_{train,test}.txt    one subject id a row, 1..30
    activity_labels.txt                      optional: "<index> <name>" rows, for class names

The official train/test split is by *subject* (the test subjects never train), which cannot give every
client both splits; so the windows of both folders are pooled per subject and split per client,
stratified by class, with ``split`` the training share.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedmfs.core.data.format import ClientData, Fleet
from fedmfs.core.data.partition import stratified_split
from fedmfs.core.errors import DataError
from fedmfs.core.modality import UCIHAR_MODALITIES, DatasetSpec

__all__ = ["UCIHAR_CLASSES", "UCIHAR_STEPS", "load_uci_har", "read_text_matrix"]

UCIHAR_STEPS = 128
UCIHAR_CLASSES = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING")
_AXES = ("x", "y", "z")
_DIR = "UCI HAR Dataset"


def read_text_matrix(path: Path, columns: int | None = None) -> np.ndarray:
    """Whitespace-separated numbers, one row a line (blank lines skipped), as float64 (rows, columns).

    Every row must have the same number of values (``columns`` if given); the first offending line is
    named in the error.
    """
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        lines = [ln.split() for ln in path.read_text(encoding="ascii").splitlines()]
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: not a readable text file: {e}") from e
    rows = [(i + 1, t) for i, t in enumerate(lines) if t]
    if not rows:
        raise DataError(f"{path}: the file is empty")
    width = columns if columns is not None else len(rows[0][1])
    for lineno, toks in rows:
        if len(toks) != width:
            raise DataError(f"{path}, line {lineno}: {len(toks)} values, expected {width} (ragged row)")
    try:
        return np.array([t for _, toks in rows for t in toks], dtype=np.float64).reshape(len(rows), width)
    except ValueError as e:
        raise DataError(f"{path}: a value is not a number: {e}") from e


def _root(root: Path) -> Path:
    if (root / _DIR).is_dir():
        return root / _DIR
    if root.is_dir():
        return root
    raise DataError(f"UCI HAR directory {root} does not exist")


def _class_names(root: Path) -> tuple[str, ...]:
    f = root / "activity_labels.txt"
    if not f.is_file():
        return UCIHAR_CLASSES
    names = {}
    for ln in f.read_text(encoding="ascii", errors="replace").splitlines():
        parts = ln.split()
        if len(parts) == 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return tuple(names.get(i, UCIHAR_CLASSES[i - 1]) for i in range(1, 7))


def _read_part(root: Path, part: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    d = root / part
    if not d.is_dir():
        raise DataError(f"{root}: missing folder {part!r} (expected {part}/Inertial Signals, y_{part}.txt, "
                        f"subject_{part}.txt)")
    y = read_text_matrix(d / f"y_{part}.txt", 1)[:, 0]
    subj = read_text_matrix(d / f"subject_{part}.txt", 1)[:, 0]
    if len(subj) != len(y):
        raise DataError(f"{d}: subject_{part}.txt has {len(subj)} rows, y_{part}.txt has {len(y)}")
    if np.any(y != np.round(y)) or y.min() < 1 or y.max() > 6:
        raise DataError(f"{d / f'y_{part}.txt'}: labels must be integers 1..6, got [{y.min()}, {y.max()}]")
    # bounded above too: 1e300 is a whole number, but not an int64 (found by fuzzing: it became a negative seed)
    if np.any(subj != np.round(subj)) or subj.min() < 1 or subj.max() >= 2**31:
        raise DataError(f"{d / f'subject_{part}.txt'}: subject ids must be positive integers below 2^31")
    xs = {}
    for m in UCIHAR_MODALITIES:
        axes = []
        for ax in _AXES:
            f = d / "Inertial Signals" / f"{m.name}_{ax}_{part}.txt"
            a = read_text_matrix(f, UCIHAR_STEPS)
            if a.shape[0] != len(y):
                raise DataError(f"{f}: {a.shape[0]} rows, but y_{part}.txt has {len(y)}")
            axes.append(a)
        xs[m.name] = np.stack(axes, axis=-1).astype(np.float32)  # (N, 128, 3)
    return xs, (y - 1).astype(np.int64), subj.astype(np.int64)


def load_uci_har(
    root: str | os.PathLike,
    split: float = 0.8,
    seed: int = 0,
    *,
    parts: tuple[str, ...] = ("train", "test"),
    hidden: int = 64,
) -> Fleet:
    """Load UCI HAR as a fleet: one client per subject (``subject01`` ... ``subject30``).

    ``root`` is the ``UCI HAR Dataset`` folder or its parent; ``parts`` are the folders read and
    pooled; ``split`` is the stratified per-client train share.
    """
    r = _root(Path(root))
    loaded = [_read_part(r, part) for part in parts]
    x = {m.name: np.concatenate([l[0][m.name] for l in loaded]) for m in UCIHAR_MODALITIES}
    y = np.concatenate([l[1] for l in loaded])
    subj = np.concatenate([l[2] for l in loaded])
    spec = DatasetSpec(tuple(m.with_hidden(hidden) for m in UCIHAR_MODALITIES), 6, UCIHAR_STEPS, _class_names(r))
    clients = []
    for s in np.unique(subj):
        rows = np.flatnonzero(subj == s)
        ys = y[rows]
        clients.append(ClientData(
            f"subject{int(s):02d}",
            {m: np.ascontiguousarray(a[rows]) for m, a in x.items()},
            ys,
            stratified_split(ys, split, np.random.default_rng([int(seed), int(s)])),
        ))
    fleet = Fleet(spec, clients, {"source": "uci-har", "parts": list(parts), "split": split, "seed": int(seed)})
    fleet.validate()
    return fleet
