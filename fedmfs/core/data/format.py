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
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmfs.core.errors import DataError
from fedmfs.core.fields import NAME
from fedmfs.core.fsio import atomic_write_with, read_spec_document
from fedmfs.core.modality import DatasetSpec

__all__ = ["FORMAT_VERSION", "ClientData", "Fleet", "Rows", "gather_rows", "load_client", "load_fleet",
           "read_fleet_spec", "row_chunks", "save_fleet"]

FORMAT_VERSION = 1
# rows gathered (or checked) from a memory-mapped array between two drops of its read pages
_GATHER_BYTES = 8 << 20


def _drop(a: np.ndarray) -> None:
    """Give back the read pages of a memory-mapped array (a no-op for others); a lazy import, as the
    runtime's helpers are the device's."""
    if isinstance(a, np.memmap):
        from fedmfs.core.runtime.memory import drop_pages

        drop_pages(a)


def _chunk_rows(a: np.ndarray) -> int:
    row = max(1, a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))
    return max(1, _GATHER_BYTES // row)


def row_chunks(a: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(i, a[rows[i:i + k]])`` for consecutive parts of ``rows``: one part for an array in memory; from
    a memory-mapped array a few MB at a time, the mapped pages read given back after each part (so a
    caller that copies each part where it belongs never holds more than one part beside its output)."""
    if not isinstance(a, np.memmap):
        yield 0, a[rows]
        return
    step = _chunk_rows(a)
    for i in range(0, len(rows), step):
        yield i, a[rows[i:i + step]]
        _drop(a)


def gather_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``a[rows]`` as a new array. From a memory-mapped array the rows are copied a few MB at a time and
    the mapped pages read are given back after each part, so the copy is all that stays resident."""
    if not isinstance(a, np.memmap):
        return a[rows]
    out = np.empty((len(rows), *a.shape[1:]), a.dtype)
    for i, part in row_chunks(a, rows):
        out[i:i + len(part)] = part
    return out


def _all_finite(a: np.ndarray) -> bool:
    """``np.isfinite(a).all()``, read a few MB at a time from a memory-mapped array (pages given back)."""
    if not isinstance(a, np.memmap):
        return bool(np.isfinite(a).all())
    step = _chunk_rows(a)
    for i in range(0, a.shape[0], step):
        ok = bool(np.isfinite(a[i:i + step]).all())
        _drop(a)
        if not ok:
            return False
    return True


class Rows(Mapping[str, np.ndarray]):
    """The windows of some rows of a client (its training or test split), per modality, gathered when a
    modality is asked for and not held: ``rows[m]`` is a new array each time (``x[m][idx]``), so only
    the modality in use is resident, not a copy of every modality. Read-only."""

    __slots__ = ("_x", "_idx")

    def __init__(self, x: Mapping[str, np.ndarray], idx: np.ndarray):
        self._x = x
        self._idx = idx

    def __getitem__(self, modality: str) -> np.ndarray:
        return gather_rows(self._x[modality], self._idx)

    def __iter__(self) -> Iterator[str]:
        return iter(self._x)

    def __len__(self) -> int:
        return len(self._x)

    @property
    def n(self) -> int:
        """Rows (windows) in the view."""
        return len(self._idx)


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
        """Copies of the training (or test) windows of every modality, and their labels."""
        m = self.train if train else ~self.train
        return {k: v[m] for k, v in self.x.items()}, self.y[m]

    def rows(self, train: bool) -> tuple[Rows, np.ndarray]:
        """The training (or test) windows as a :class:`Rows` view (no copy is held: a modality's rows are
        gathered when asked for), and their labels. Same values as :meth:`split`, in the same order."""
        idx = np.flatnonzero(self.train if train else ~self.train)
        return Rows(self.x, idx), self.y[idx]

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
            elif not _all_finite(arr):
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


def _map_member(p: Path, f, info: zipfile.ZipInfo | None) -> np.ndarray | None:
    """The array of an archive member stored uncompressed (what ``numpy.savez`` and :func:`save_fleet`
    write) as a read-only memory map of the archive, or None where that cannot be done (compressed,
    encrypted, an unusual header, a size that does not fit the member): the caller then reads it the
    usual way, with its checks and errors. The zip CRC of a mapped member is not checked."""
    if info is None or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    try:
        f.seek(info.header_offset)
        head = f.read(30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if dtype.hasobject or nbytes == 0 or offset + nbytes > start + info.compress_size:
            return None
        return np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    except _UNREADABLE:
        return None


def _read_npz(p: Path, mmap: bool = False) -> dict[str, np.ndarray]:
    """The arrays of the client file ``p``; with ``mmap`` the ``x_<modality>`` arrays memory-mapped where
    they are stored uncompressed (the others, and compressed members, read)."""
    try:
        z = np.load(p, allow_pickle=False)
    except _UNREADABLE as e:
        raise DataError(f"{p}: not a readable .npz archive ({_first_line(e)}). {_NPZ_FIX}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{p}: not an .npz archive (numpy reads one array from it, a .npy file). {_NPZ_FIX}")
    files: dict[str, Any] = {}
    try:
        with z, open(p, "rb") as f:
            infos = {i.filename: i for i in z.zip.infolist()} if mmap and z.zip is not None else {}
            for key in z.files:
                mapped = _map_member(p, f, infos.get(key + ".npy")) if mmap and key.startswith("x_") else None
                files[key] = mapped if mapped is not None else z[key]
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


def load_client(path: str | os.PathLike, spec: DatasetSpec, name: str | None = None,
                mmap: bool = False) -> ClientData:
    """Load one client's ``.npz`` and validate it against ``spec``; every error names the file.

    ``mmap``: the windows (``x_<modality>``) stay on disk, memory-mapped read-only from the archive where
    a member is stored uncompressed (a training device: its data need not be resident, see
    :meth:`ClientData.rows`); compressed members are read. The values are the same either way; the
    file must not change while it is mapped."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"client file {p} does not exist")
    files = _read_npz(p, mmap)
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
