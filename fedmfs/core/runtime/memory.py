"""Keeping the on-device runtime's resident memory flat: glibc heap trims, dropped input pages, RSS.

The runtime's inputs (a modality's windows, tens of MB on ActionSense shapes) and ONNX Runtime's
per-call copies of them are large and short-lived. On glibc they leave freed memory held in the heap,
and memory-mapped inputs leave their read pages in the RSS; the helpers here give both back. They
are no-ops where the platform lacks the call (musl, macOS, no /proc). Standard library + numpy only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

__all__ = [
    "FUSION_RSS_SLACK",
    "TRIM_BETWEEN_CALLS",
    "TRIM_MIN_FREE",
    "drop_pages",
    "release_free_heap",
    "resident_bytes",
]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _load_glibc():
    """glibc's ``malloc_trim`` and ``mallinfo2`` (None where absent: musl, macOS, glibc < 2.33)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None, None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info = getattr(libc, "mallinfo2", None)
    if info is not None:
        info.argtypes, info.restype = [], _MallInfo2
    return trim, info


_MALLOC_TRIM, _MALLINFO2 = _load_glibc()
TRIM_MIN_FREE = 1 << 20
# in a run of modality-model calls on row chunks, trim once per this many bytes of input chunks (at
# 12 MiB the heap grew by up to ~10 MB between trims on ActionSense shapes; at 2 MiB by ~6 MB, the
# Shapley check's CPU time 0.4 -> 0.5 s)
TRIM_BETWEEN_CALLS = 2 << 20
# and in the coalition graph's chunk calls, a trim once RSS is this much above its start
FUSION_RSS_SLACK = 10 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """This process's resident set size from /proc/self/statm (None where there is no /proc)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def release_free_heap(min_free: int = TRIM_MIN_FREE) -> None:
    """Hand freed heap memory back to the OS when more than 1 MiB of it is held (glibc
    ``malloc_trim(0)``; a no-op elsewhere).

    Why: after a large array (a modality's windows) is freed, glibc raises its mmap and trim
    thresholds to that size, so the following multi-MB buffers (ORT's per-call copies) come from
    the heap and stay resident after being freed: measured +12 MB of peak RSS on ActionSense
    shapes. Only when that much is free, because re-touching trimmed pages costs page faults.
    """
    if _MALLOC_TRIM is None:
        return
    if _MALLINFO2 is not None and _MALLINFO2().fordblks < min_free:
        return
    _MALLOC_TRIM(0)


def drop_pages(a: np.ndarray) -> None:
    """Unmap the resident pages of a read-only memory-mapped input (``np.load(..., mmap_mode="r")``
    of a spooled .npy file) once a row chunk of it has been used; a no-op for other arrays.

    Why: a device reads its windows from disk; mapped pages it has read stay in its RSS (file-backed
    but counted) until unmapped, so without this a tactile modality's 20 MB of windows would end up
    resident anyway. Re-reading a dropped page just faults it back in from the page cache. Only for
    mode "r": a copy-on-write map ("c") may hold private edits that dropping would discard."""
    mm = getattr(a, "_mmap", None)
    if mm is None or getattr(a, "mode", None) != "r" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError, AttributeError):  # closed map, or a platform without madvise
        pass
