"""Small HDF5 files in the processed ActionSense layout (mmFedMC's utils_data.py), for the loader's and
the `fedmfs data actionsense` command's tests (pyproject's pytest `pythonpath` puts this folder on the path)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from fedmfs.core.data.actionsense import STREAMS

RAW_SHAPES = {"eye": (2,), "emg_left": (8,), "emg_right": (8,), "tactile_left": (4, 4),
              "tactile_right": (4, 4), "xsens": (22, 3)}


def write_actionsense(path: Path, subjects=("S00", "S02", "S06"), per_class=3, classes=4, t=10,
                      zero_tactile=("S06",), one_based=True, drop: str | None = None, attrs=True,
                      signal: float = 0.01):
    """Windows whose values shift with the label by ``signal`` (0.01: rows can be tracked; 0.5: there
    is something to learn). Returns the labels and subject ids written."""
    rng = np.random.default_rng(0)
    sid, y = [], []
    for s in subjects:
        for c in range(classes):
            sid += [s] * per_class
            y += [c] * per_class
    y = np.array(y)
    n = len(y)
    with h5py.File(path, "w") as f:
        f.create_dataset("example_label_indexes", data=y + (1 if one_based else 0))
        f.create_dataset("example_subject_ids", data=np.array(sid, dtype="S3"))
        f.create_dataset("example_labels", data=np.array([f"act{c}" for c in y], dtype="S8"))
        if attrs and one_based:
            f.attrs["activities_to_classify"] = repr(["None"] + [f"act{c}" for c in range(classes)])
        for m, shape in RAW_SHAPES.items():
            if m == drop:
                continue
            x = rng.uniform(-1, 1, (n, t, *shape)).astype(np.float32)
            x += y.reshape(n, *([1] * (x.ndim - 1))) * signal  # label-dependent
            if m.startswith("tactile"):
                for s in zero_tactile:
                    x[np.array(sid) == s] = 0.0
            f.create_dataset(STREAMS[m], data=x)
    return y, np.array(sid)
