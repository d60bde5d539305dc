"""Atomic file writes: a temp file in the same directory, fsync, rename. A reader sees the old file or
the new one, never a torn one; a crash leaves at most a stray ``.<name>.*.tmp``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from fedmfs.core.modality import DatasetSpec

__all__ = ["atomic_write", "atomic_write_with", "read_spec_document", "fsync_skipped"]

# Off only inside fsync_skipped(): a simulation's throwaway directory, where a crash loses the run anyway.
_FSYNC = True


@contextmanager
def fsync_skipped() -> Iterator[None]:
    """Writes in this block are still atomic (temp file, rename) but not fsynced: for the in-process
    simulator, whose services write their state into a temporary directory (an fsync is ~5 ms, and a
    simulated round writes hundreds of files). Never for a real device or coordinator."""
    global _FSYNC
    before, _FSYNC = _FSYNC, False
    try:
        yield
    finally:
        _FSYNC = before


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, mode: int | None = None,
                      keep_existing: bool = False, sync_dir: bool = False) -> None:
    """Let ``write`` fill a temporary file in the same directory, then fsync it and rename it over
    ``path``. The temp file's mode is set before anything is written into it: ``keep_existing`` keeps
    the mode (and, as root, the owner) of the file it replaces, otherwise or for a new file ``mode``
    (None: mkstemp's 600). ``sync_dir`` also fsyncs the directory, so the rename survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st: os.stat_result | None = None
    if keep_existing:
        try:
            st = path.stat()
        except FileNotFoundError:
            pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if st is not None:
            try:
                os.fchown(fd, st.st_uid, st.st_gid)
            except PermissionError:   # not root: the file stays ours, which it already was
                pass
            os.fchmod(fd, st.st_mode & 0o7777)
        elif mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if _FSYNC:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir and _FSYNC:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write(path: str | os.PathLike, data: bytes, **options) -> None:
    """Write ``data`` to ``path`` atomically (``options``: those of :func:`atomic_write_with`)."""
    atomic_write_with(path, lambda f: f.write(data), **options)


def read_spec_document(path: str | os.PathLike, fmt: str, version: int, error: type[Exception],
                       what: str) -> tuple[dict, DatasetSpec]:
    """Read a versioned JSON document that carries a dataset spec (a fleet, a model set, a state set).

    Checks ``format`` and ``version`` and parses ``spec``; every failure raises ``error`` naming the
    file and what is wrong. ``what`` completes "<dir> is not <what>" when the file is missing.
    """
    from fedmfs.core.errors import PayloadError
    from fedmfs.core.modality import DatasetSpec
    from fedmfs.core.safejson import loads

    p = Path(path)
    try:
        doc = loads(p.read_bytes(), p.name)     # bounded: nesting, integer digits; every failure a PayloadError
    except FileNotFoundError as e:
        raise error(f"{p.parent} is not {what}: {p.name} is missing") from e
    except (OSError, PayloadError) as e:
        raise error(f"{p}: unreadable or invalid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise error(f"{p}: 'format' must be {fmt!r}")
    if doc.get("version") != version:
        raise error(f"{p}: unsupported version {doc.get('version')!r}; this fedmfs reads {version}")
    try:
        spec = DatasetSpec.from_dict(doc["spec"])
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise error(f"{p}: bad or missing 'spec': {e}") from e
    return doc, spec
