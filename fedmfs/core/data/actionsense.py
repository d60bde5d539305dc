"""Loader for the ActionSense (ActionNet) processed HDF5 file used by the paper and its follow-up.

The file (``data_processed_allStreams_10s_10hz_5subj_ex20-20_allActs.hdf5``) cannot be downloaded on
these machines, so the layout is the one the follow-up code (mmFedMC, ``ActionSense/utils_data.py``)
reads, documented in docs/data.md:

* one dataset per sensor stream, named ``example_matrices_<device>_<stream>``, shape (N, T, ...):

  =====================  ====================================================  ================
  modality               dataset                                               per-step shape
  =====================  ====================================================  ================
  ``eye``                ``example_matrices_eye-tracking-gaze_position``       (2,)
  ``emg_left``           ``example_matrices_myo-left_emg``                     (8,)
  ``emg_right``          ``example_matrices_myo-right_emg``                    (8,)
  ``tactile_left``       ``example_matrices_tactile-glove-left_tactile_data``  (32, 32)
  ``tactile_right``      ``example_matrices_tactile-glove-right_tactile_data`` (32, 32)
  ``xsens``              ``example_matrices_xsens-joints_rotation_xzy_deg``    (22, 3) -> (66,)
  =====================  ====================================================  ================

* ``example_label_indexes`` (N,) integers and ``example_subject_ids`` (N,) strings (``b"S00"``...);
  optionally ``example_labels`` (N,) strings and the file attribute ``activities_to_classify``.

ActionNet's own export (one concatenated ``example_matrices`` (N, T, F), columns in the order above,
tactile grids possibly aggregated) is read too. Labels: ActionNet numbers activities after a
baseline ``'None'`` at index 0; mmFedMC subtracts 1. So when ``activities_to_classify`` starts with
``'None'`` or no label is 0, baseline windows (index 0) are dropped and labels shifted down by one;
otherwise labels are taken as 0-based. A subject whose stream is all zeros (mmFedMC zeroes the
tactile streams of S06-S09) or all non-finite lacks that modality: its key is absent.
"""

from __future__ import annotations

import ast
import math
import os
from pathlib import Path

import numpy as np

from fedmfs.core.data.format import ClientData, Fleet
from fedmfs.core.data.partition import stratified_split
from fedmfs.core.errors import DataError
from fedmfs.core.fields import NAME
from fedmfs.core.modality import ACTIONSENSE_MODALITIES, DatasetSpec, ModalitySpec

__all__ = ["STREAMS", "load_actionsense_hdf5", "resample_steps"]

STREAMS: dict[str, str] = {
    "eye": "example_matrices_eye-tracking-gaze_position",
    "emg_left": "example_matrices_myo-left_emg",
    "emg_right": "example_matrices_myo-right_emg",
    "tactile_left": "example_matrices_tactile-glove-left_tactile_data",
    "tactile_right": "example_matrices_tactile-glove-right_tactile_data",
    "xsens": "example_matrices_xsens-joints_rotation_xzy_deg",
}
_CONCAT = "example_matrices"
_LABELS = "example_label_indexes"
_SUBJECTS = "example_subject_ids"


def resample_steps(x: np.ndarray, steps: int) -> np.ndarray:
    """Linear interpolation of (N, T, ...) along the time axis to (N, steps, ...); identity if equal."""
    t = x.shape[1]
    if t == steps:
        return x
    if t < 2:
        raise DataError(f"cannot resample a window of {t} step(s) to {steps}")
    pos = np.linspace(0.0, t - 1.0, steps)
    lo = np.minimum(np.floor(pos).astype(np.int64), t - 2)
    w = (pos - lo).astype(np.float32).reshape(1, steps, *([1] * (x.ndim - 2)))
    return x[:, lo] * (1 - w) + x[:, lo + 1] * w


def _decode(ids: np.ndarray, where: str) -> list[str]:
    try:
        return [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in ids.tolist()]
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text: {e}") from e


def _read(f, key: str, path: Path) -> np.ndarray:
    """Dataset ``key`` as an array; a group or an unreadable dataset of that name is a DataError."""
    import h5py

    d = f[key]
    if not isinstance(d, h5py.Dataset):
        raise DataError(f"{path}: {key} must be a dataset, found a {type(d).__name__}")
    try:
        return np.asarray(d[()])
    except (OSError, TypeError, ValueError) as e:   # h5py's answers to a damaged or exotic dataset
        raise DataError(f"{path}: dataset {key} is unreadable: {e}") from e


def _feature_shape(name: str, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """Per-step shape of a stream as our spec has it: tactile stays a grid, xsens is flattened."""
    if name.startswith("tactile"):
        if len(shape) == 2:
            return shape
        side = math.isqrt(int(np.prod(shape)))
        if side * side != int(np.prod(shape)):
            raise DataError(f"{where}: tactile steps must be square grids, got per-step shape {shape}")
        return (side, side)
    return (int(np.prod(shape)),)


def _read_streams(f, path: Path, wanted: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-modality arrays (N, T, *raw) from either the per-stream or the concatenated layout."""
    present = [m for m in wanted if STREAMS[m] in f]
    if len(present) == len(wanted):
        return {m: _read(f, STREAMS[m], path) for m in wanted}
    if _CONCAT in f and not present:
        x = _read(f, _CONCAT, path)
        if x.ndim != 3:
            raise DataError(f"{path}: {_CONCAT} must be (N, T, F), got {x.shape}")
        fixed = 2 + 8 + 8 + 66
        grid = (x.shape[2] - fixed) // 2
        if grid <= 0 or 2 * grid + fixed != x.shape[2] or math.isqrt(grid) ** 2 != grid:
            raise DataError(f"{path}: {_CONCAT} has {x.shape[2]} columns; expected 2+8+8+2*g+66 with g a square")
        widths = {"eye": 2, "emg_left": 8, "emg_right": 8, "tactile_left": grid, "tactile_right": grid, "xsens": 66}
        out, col = {}, 0
        for m in STREAMS:
            if m in wanted:
                out[m] = x[:, :, col:col + widths[m]]
            col += widths[m]
        return out
    missing = [STREAMS[m] for m in wanted if STREAMS[m] not in f]
    raise DataError(
        f"{path}: missing dataset(s) {missing}; expected one example_matrices_<device>_<stream> dataset "
        f"per modality ({', '.join(f'{m}: {STREAMS[m]}' for m in wanted)}) or ActionNet's single "
        f"{_CONCAT!r}; found {sorted(f.keys())}"
    )


def _labels(f, y: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(keep mask, 0-based labels, class names) following the convention in the module docstring."""
    names: list[str] = []
    raw = f.attrs.get("activities_to_classify")
    if raw is not None:
        try:
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8")
            value = ast.literal_eval(raw) if isinstance(raw, str) else list(raw)
            if not isinstance(value, list | tuple):
                raise TypeError(f"a {type(value).__name__}")
            names = [str(s) for s in value]
        # literal_eval raises TypeError on e.g. "{[1]: 2}", RecursionError or MemoryError on deep nesting
        except (ValueError, SyntaxError, TypeError, UnicodeDecodeError, RecursionError, MemoryError) as e:
            raise DataError(f"{path}: attribute activities_to_classify is not a list of names: {e}") from e
    baseline = (names[:1] == ["None"]) if names else (y.size > 0 and int(y.min()) >= 1)
    keep = y >= 1 if baseline else np.ones(y.shape, bool)
    y = (y - 1 if baseline else y).astype(np.int64)
    if names:
        names = names[1:] if baseline else names
    elif "example_labels" in f:
        texts = _read(f, "example_labels", path).reshape(-1)
        if texts.shape != y.shape:
            raise DataError(f"{path}: example_labels has {texts.size} rows but {_LABELS} has {y.size}")
        by_index: dict[int, str] = {}
        for i, s in zip(y[keep].tolist(), _decode(texts[keep], f"{path}: example_labels")):
            by_index.setdefault(i, s)
        n = int(y[keep].max()) + 1 if keep.any() else 0
        names = [by_index.get(i, f"class{i:02d}") for i in range(n)]
    return keep, y, tuple(names)


def load_actionsense_hdf5(
    path: str | os.PathLike,
    subjects: list[str] | None = None,
    steps: int | None = 100,
    split: float = 0.8,
    seed: int = 0,
    *,
    modalities: tuple[str, ...] | None = None,
    hidden: int = 64,
) -> Fleet:
    """Load the ActionSense processed HDF5 as a fleet, one client per subject.

    ``subjects`` restricts the clients (default: every subject in the file); ``steps`` resamples the
    windows to that many steps (``None`` keeps the file's); ``split`` is the stratified train share per
    client; ``modalities`` restricts the streams read (default: all six).
    """
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is in the [train] extra
        raise DataError("reading ActionSense needs h5py: pip install 'fedmfs[train]'") from e
    p = Path(path)
    if not p.is_file():
        raise DataError(f"ActionSense file {p} does not exist")
    wanted = tuple(modalities or STREAMS)
    unknown = [m for m in wanted if m not in STREAMS]
    if unknown:
        raise DataError(f"unknown ActionSense modalities {unknown}; known: {', '.join(STREAMS)}")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise DataError(f"{p} is not a readable HDF5 file: {e}") from e
    with f:
        for key in (_LABELS, _SUBJECTS):
            if key not in f:
                raise DataError(f"{p}: missing dataset {key!r} (expected {_LABELS!r}, {_SUBJECTS!r} and the "
                                f"example_matrices_* streams); found {sorted(f.keys())}")
        y_all = _read(f, _LABELS, p).reshape(-1)
        if not np.issubdtype(y_all.dtype, np.integer) and not np.issubdtype(y_all.dtype, np.floating):
            raise DataError(f"{p}: {_LABELS} must be numbers, got dtype {y_all.dtype}")
        y_all = y_all.astype(np.int64)
        sid_all = _decode(_read(f, _SUBJECTS, p).reshape(-1), f"{p}: {_SUBJECTS}")
        keep, y_all, class_names = _labels(f, y_all, p)
        raw = _read_streams(f, p, wanted)
    n = y_all.shape[0]
    if len(sid_all) != n:
        raise DataError(f"{p}: {_SUBJECTS} has {len(sid_all)} rows but {_LABELS} has {n}")
    for m, a in raw.items():
        if a.ndim < 3 or a.shape[0] != n:
            raise DataError(f"{p}: {STREAMS[m]} must be (N={n}, T, ...), got {a.shape}")
        if a.dtype.kind not in "biuf":
            raise DataError(f"{p}: {STREAMS[m]} must hold numbers, got dtype {a.dtype}")
    if not keep.any():
        raise DataError(f"{p}: no labelled windows (only baseline label 0)")

    num_classes = max(len(class_names), int(y_all[keep].max()) + 1)
    if num_classes < 2:
        raise DataError(f"{p}: the labelled windows have {num_classes} class; a classifier needs at least 2")
    if class_names and len(class_names) != num_classes:
        class_names = ()
    t_file = {a.shape[1] for a in raw.values()}
    if len(t_file) != 1:
        raise DataError(f"{p}: streams disagree on the window length: { {m: a.shape[1] for m, a in raw.items()} }")
    t_out = steps or t_file.pop()
    default_hidden = {m.name: m for m in ACTIONSENSE_MODALITIES}
    shapes = {m: _feature_shape(m, tuple(a.shape[2:]), f"{p}: {STREAMS.get(m, m)}") for m, a in raw.items()}
    try:
        spec = DatasetSpec(
            tuple(ModalitySpec(m, shapes[m], hidden) for m in default_hidden if m in raw),
            num_classes, t_out, class_names,
        )
    except ValueError as e:    # e.g. a stream with an empty per-step shape
        raise DataError(f"{p}: the streams do not make a dataset spec: {e}") from e

    sids = np.array(sid_all)
    available = sorted(set(sids[keep].tolist()))
    chosen = list(subjects) if subjects is not None else available
    missing = [s for s in chosen if s not in available]
    if missing:
        raise DataError(f"{p}: subjects {missing} not in the file; it has {available}")
    clients = []
    for k, s in enumerate(chosen):
        if not NAME.match(s):
            raise DataError(f"{p}: {_SUBJECTS}: subject id {s!r} cannot name a client: it must match "
                            f"{NAME.pattern} (the device id). Fix: leave it out (--subjects) or rename it in the file")
        rows = np.flatnonzero((sids == s) & keep)
        xs = {}
        for m, a in raw.items():
            x = np.asarray(a[rows], dtype=np.float32)
            finite = np.isfinite(x)
            if not finite.any() or not np.any(x[finite]):
                continue  # the subject lacks this sensor (all zeros or all NaN)
            x = np.where(finite, x, np.float32(0.0))  # ActionNet fills gaps with 0; so do we
            x = resample_steps(x, t_out).astype(np.float32, copy=False)
            xs[m] = np.ascontiguousarray(x.reshape(rows.size, t_out, *shapes[m]))
        if not xs:
            raise DataError(f"{p}: subject {s} has no non-zero stream")
        ys = y_all[rows]
        clients.append(ClientData(s, xs, ys, stratified_split(ys, split, np.random.default_rng([int(seed), k]))))
    fleet = Fleet(spec, clients, {"source": "actionsense-hdf5", "file": p.name, "split": split, "seed": int(seed),
                                  "steps_in_file": int(next(iter(raw.values())).shape[1])})
    fleet.validate()
    return fleet
