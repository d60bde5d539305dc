"""Partitioning a data set over clients: natural (by subject), Dirichlet label skew, missing modalities.

Every function is deterministic in its seed and keeps the invariants the training code relies on:
each client has at least one modality and at least two training windows, and each client's
train/test split is stratified by class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedmfs.core.data.format import ClientData, Fleet
from fedmfs.core.errors import DataError
from fedmfs.core.modality import DatasetSpec, ModalitySpec

__all__ = [
    "MIN_TRAIN",
    "by_subject",
    "dirichlet_label_skew",
    "drop_modalities",
    "infer_spec",
    "stratified_split",
]

MIN_TRAIN = 2


def stratified_split(y: np.ndarray, split: float, rng: np.random.Generator | int) -> np.ndarray:
    """A bool mask, True for training windows: about ``split`` of each class goes to training.

    Per class of ``n`` windows, ``round(n * (1 - split))`` go to test (half rounds up), so a class with
    3 windows gives 2 train / 1 test at split 0.8 and a single window always trains. At least
    ``MIN_TRAIN`` windows train whenever there are that many.
    """
    if not 0.0 < split <= 1.0:
        raise ValueError(f"split must be in (0, 1], got {split}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    y = np.asarray(y)
    train = np.ones(y.shape[0], dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_test = min(int(math.floor(idx.size * (1.0 - split) + 0.5)), idx.size - 1)
        if n_test > 0:
            train[rng.permutation(idx)[:n_test]] = False
    short = min(MIN_TRAIN, y.size) - int(train.sum())
    if short > 0:
        train[rng.permutation(np.flatnonzero(~train))[:short]] = True
    return train


def infer_spec(x: Mapping[str, np.ndarray], y: np.ndarray, hidden: int = 64) -> DatasetSpec:
    """A DatasetSpec read off arrays (N, T, *feature_shape): modality order as given, classes = max(y)+1."""
    if not x:
        raise DataError("no modality arrays given")
    steps = {a.shape[1] for a in x.values() if a.ndim >= 3}
    if len(steps) != 1 or any(a.ndim < 3 for a in x.values()):
        raise DataError(f"modality arrays must be (N, T, *features) with one T, got "
                        f"{ {k: a.shape for k, a in x.items()} }")
    mods = tuple(ModalitySpec(k, tuple(int(d) for d in a.shape[2:]), hidden) for k, a in x.items())
    return DatasetSpec(mods, max(2, int(np.max(y)) + 1), steps.pop())


def by_subject(fleet: Fleet) -> Fleet:
    """The natural partition: one client per subject, as loaded (validated, returned unchanged)."""
    fleet.validate()
    return fleet


def dirichlet_label_skew(
    x: Mapping[str, np.ndarray],
    y: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    spec: DatasetSpec | None = None,
    split: float = 0.8,
    min_windows: int = 3,
    prefix: str = "client",
) -> Fleet:
    """Split pooled windows over ``num_clients`` with class proportions drawn from Dirichlet(``alpha``).

    Small ``alpha`` (e.g. 0.1) gives each client a few dominant classes; large ``alpha`` (e.g. 100)
    approaches an even (IID) split. Each client gets at least ``min_windows`` windows (taken from the
    largest client if the draw left it short), hence at least two training windows. Clients are named
    ``<prefix>00``, ``<prefix>01``, ...; ``metadata["partition"]`` records the parameters.
    """
    y = np.asarray(y, dtype=np.int64)
    n = y.shape[0]
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    min_windows = max(min_windows, MIN_TRAIN)
    if n < num_clients * min_windows:
        raise DataError(f"{n} windows cannot give {num_clients} clients {min_windows} windows each")
    bad = [k for k, a in x.items() if a.shape[0] != n]
    if bad:
        raise DataError(f"arrays {bad} do not have the {n} rows of y")
    spec = spec or infer_spec(x, y)
    rng = np.random.default_rng([int(seed), 101])

    owner = np.empty(n, dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
        for k, part in enumerate(np.split(idx, cuts)):
            owner[part] = k
    # Repair: a client short of windows takes random ones from the currently largest client.
    for k in range(num_clients):
        while (need := min_windows - int((owner == k).sum())) > 0:
            big = int(np.bincount(owner, minlength=num_clients).argmax())
            take = rng.permutation(np.flatnonzero(owner == big))[:need]
            owner[take] = k

    width = max(2, len(str(num_clients - 1)))
    clients = []
    for k in range(num_clients):
        idx = np.flatnonzero(owner == k)
        yk = y[idx]
        clients.append(ClientData(
            f"{prefix}{k:0{width}d}",
            {m: np.ascontiguousarray(a[idx]) for m, a in x.items()},
            yk,
            stratified_split(yk, split, np.random.default_rng([int(seed), 102, k])),
        ))
    fleet = Fleet(spec, clients, {"partition": {"kind": "dirichlet_label_skew", "alpha": float(alpha),
                                                "num_clients": int(num_clients), "seed": int(seed)}})
    fleet.validate()
    return fleet


def drop_modalities(fleet: Fleet, prob: float, seed: int, keep_at_least: int = 1) -> Fleet:
    """Make modalities missing at random: each (client, modality) is dropped with probability ``prob``.

    A client keeps at least ``keep_at_least`` (>= 1) of the modalities it had; if the draw dropped
    more, randomly chosen dropped ones are restored. Arrays are shared with ``fleet``, not copied.
    ``metadata["dropped"]`` lists what each client lost.
    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    keep_at_least = max(1, int(keep_at_least))
    rng = np.random.default_rng([int(seed), 201])
    clients, dropped = [], {}
    for c in fleet.clients:
        names = list(c.x)
        drop = rng.random(len(names)) < prob
        floor = min(keep_at_least, len(names))
        excess = floor - int((~drop).sum())
        if excess > 0:
            drop[rng.permutation(np.flatnonzero(drop))[:excess]] = False
        dropped[c.name] = [m for m, d in zip(names, drop) if d]
        clients.append(ClientData(c.name, {m: a for m, a, d in zip(names, c.x.values(), drop) if not d},
                                  c.y, c.train))
    meta = dict(fleet.metadata)
    meta["dropped"] = dropped
    meta["drop_modalities"] = {"prob": float(prob), "seed": int(seed), "keep_at_least": keep_at_least}
    return Fleet(fleet.spec, clients, meta)
