"""A synthetic fleet shaped like ActionSense, with a known ground truth of modality informativeness.

Why: the paper's data cannot be downloaded here, and a system that selects modalities by their Shapley
value needs data whose modalities are *known* to differ in usefulness, so that tests can check the
ranking the system finds against the truth.

The generative model (per modality ``m``, class ``c``, window ``n``, step ``t``)::

    x[n, t] = g_k * (a_m * e_c(t) * P_m[c] + s_w * z_n + s_e * u[n, t]) + o_k      then clipped to [-1, 1]

* ``P_m[c]`` is a unit-norm class prototype over the flattened feature vector (a random pattern on a
  random subset of channels; a Gaussian blob on the grid for the tactile modalities). Only a subset of
  the classes is encoded by a modality (``P_m[c] = 0`` for the others), so modalities carry information
  the others lack.
* ``a_m`` is the modality's signal amplitude (its tier); ``e_c(t) = 1 + 0.5 sin(2 pi f_c t / T + p_c)``
  is a class-specific temporal envelope with a whole number of cycles (so the time mean of the signal
  is ``a_m P_m[c]``, and an LSTM reading the last step can still learn it).
* ``z_n`` is Gaussian window-level noise, constant over the window (it does not average away over time,
  which keeps the tiers distinct for any number of steps); ``u`` is uniform white noise per step.
* ``g_k``, ``o_k`` are a client-specific gain and offset per channel (sensor placement differs between
  people), and each client has its own class counts (label skew); every class stays present at every
  client.

The ground truth goes to ``fleet.metadata``: ``informativeness`` (the expected accuracy of a
nearest-class-centroid classifier on time-averaged windows, centroids estimated from one client's
training windows, by Monte Carlo; higher is more informative), ``informativeness_order`` (most -> least),
the per-modality amplitudes and encoded classes.

The ``headroom`` preset (the others are unchanged, bit for bit) is built so that a modality ranking has
something to get right and the ``all`` baseline stays well below its ceiling:

* **Overlap** instead of disjoint blocks: ``SyntheticPreset.cover`` lists, per modality, the class
  *slots* it encodes (mapped to classes through the seed's random class permutation). Each class is
  encoded by one to three modalities, no modality encodes more than 8 of the 20 classes (none suffices
  alone), and ``emg_left``/``emg_right`` encode exactly the same classes (a redundant pair; the right arm
  is the stronger). Every class a tactile glove encodes is also encoded by a non-tactile modality, so
  the clients without gloves (S06-S09) can resolve every class.
* **Informativeness not aligned with size**: eye (2 features) is the strongest, xsens (66) medium,
  the EMG pair (8 each) moderate, the tactile grids (12x12 = 144) weak and redundant.
* **Noise modalities** ``noise3``, ``noise16``, ``noise64``, ``noise256`` (``SyntheticPreset.noise_widths``,
  added by :func:`add_noise_modalities` on every client).
* **A Shapley ground truth** in ``metadata["shapley_truth"]`` = {client: {modality: phi}}: the exact
  Shapley values (all coalitions of the client's present modalities) of the coalition game

      v(S) = mean over classes c of  max over m in S of  g[m, c],     v({}) = 0,

  where ``g[m, c] = max(0, r[m, c] - 1/C)`` and ``r[m, c]`` is the Monte-Carlo probability that a
  nearest-class-centroid classifier on modality ``m``'s time-averaged windows (centroids from one
  client's number of training windows, as for ``informativeness``) labels a window of class ``c``
  correctly. ``g[m, c] = 0`` for a class ``m`` does not encode (telling a class by the absence of every
  pattern is not credited), so noise modalities get exactly 0. ``metadata["class_gain"]`` holds ``g``
  ({modality: [20 floats]}), ``metadata["shapley_truth_fleet"]`` the truth of a client with every
  modality, and ``informativeness_order`` follows it (most -> least, noise modalities last).

The **fleet families** (``FAMILIES``, issue 17) are presets built like ``headroom`` (its sizes, cover,
Shapley truth and difficulty) with modalities of their own (``SyntheticPreset.modalities``; any
``tactile*`` one is absent on S06-S09), each stressing one thing a selection rule can get wrong:

* ``noisy``: five pure-noise modalities (3, 9, 32, 64, 256 features) beside five informative ones of 2 to
  144 features; the noise gets exactly 0 in the truth.
* ``redundant``: three pairs (``SyntheticPreset.pairs``, ``metadata["redundant_pairs"]``), a small and a
  much larger modality encoding the same classes (2 / 144, 8 / 144, 8 / 66 features), and one modality
  with classes of its own.
* ``largeweak``: informativeness falls as size grows; the largest modality (16x16) is the weakest, yet
  not noise.

The seed drives the data and which classes each modality encodes (the class permutation); the
structure (names, shapes, cover slots, amplitudes) is the preset's, so ``PRESETS[name].spec()`` is
every seed's spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fedmfs.core.data.format import ClientData, Fleet
from fedmfs.core.data.partition import stratified_split
from fedmfs.core.modality import ACTIONSENSE_MODALITIES, DatasetSpec, ModalitySpec

__all__ = [
    "FAMILIES",
    "GENERATOR",
    "PRESETS",
    "SUBJECTS",
    "TACTILE_MISSING",
    "ModalityTruth",
    "SyntheticPreset",
    "make_synthetic",
    "add_noise_modalities",
]

GENERATOR = "fedmfs.synthetic/1"

# The paper's nine subjects (S01 is absent from ActionSense) and the four without tactile gloves.
SUBJECTS = ("S00", "S02", "S03", "S04", "S05", "S06", "S07", "S08", "S09")
TACTILE_MISSING = ("S06", "S07", "S08", "S09")

NUM_CLASSES = 20


@dataclass(frozen=True, slots=True)
class ModalityTruth:
    """How one modality is generated: its amplitude (signal tier) and how many classes it encodes."""

    amplitude: float
    classes: int
    active_fraction: float = 0.5  # share of channels a prototype uses (vector modalities)


@dataclass(frozen=True, slots=True)
class SyntheticPreset:
    """A size of synthetic fleet; ``small`` and ``actionsense`` share the default truth table (the same
    ranking); ``headroom`` has its own, with an overlapping ``cover`` and noise modalities."""

    name: str
    steps: int
    windows_per_class: int
    tactile_shape: tuple[int, int]
    hidden: int
    description: str
    window_noise: float = 0.25
    step_noise: float = 0.15
    # Grids (tactile): noise of the same power but in the span of a few smooth fields (a glove's map
    # moves in a few ways, not pixel by pixel), plus a little white noise per cell.
    grid_noise_rank: int = 4
    grid_white_noise: float = 0.02
    grid_step_noise: float = 0.0
    # Most -> least informative; amplitudes spaced by about a factor 2 between neighbouring tiers.
    truth: dict[str, ModalityTruth] = field(default_factory=lambda: {
        # Complementary information: every modality alone identifies its own disjoint block of classes
        # (the fusion needs it for exactly those), so its Shapley impact follows the block's size.
        "xsens": ModalityTruth(amplitude=2.0, classes=8),
        "emg_right": ModalityTruth(amplitude=2.2, classes=5),
        "eye": ModalityTruth(amplitude=3.0, classes=3, active_fraction=1.0),
        "tactile_right": ModalityTruth(amplitude=3.0, classes=2),
        "tactile_left": ModalityTruth(amplitude=3.0, classes=1),
        "emg_left": ModalityTruth(amplitude=0.05, classes=0),
    })

    # Overlapping coverage (the headroom preset): per modality, the class *slots* (0..19) it encodes,
    # mapped to classes through the seed's class permutation. None: disjoint blocks of truth[m].classes.
    cover: dict[str, tuple[int, ...]] | None = None
    # Pure-noise modalities ``noise<w>`` added to every client (add_noise_modalities), one per width.
    noise_widths: tuple[int, ...] = ()
    # The generated modalities (name, per-step shape) in spec order; () = the six ActionSense ones,
    # tactile grids of ``tactile_shape``. Whatever the names, ``tactile*`` ones are absent on S06-S09.
    modalities: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Redundant pairs (smaller, larger) encoding the same classes, recorded in the metadata.
    pairs: tuple[tuple[str, str], ...] = ()

    def spec(self) -> DatasetSpec:
        """The DatasetSpec of this preset: the feature shapes actually generated and the hidden size
        (the noise modalities, if any, after the generated ones)."""
        mods = []
        if self.modalities:
            mods = [ModalitySpec(name, tuple(shape), self.hidden) for name, shape in self.modalities]
        for m in () if self.modalities else ACTIONSENSE_MODALITIES:
            shape = self.tactile_shape if m.name.startswith("tactile") else m.feature_shape
            mods.append(ModalitySpec(m.name, tuple(shape), self.hidden))
        mods += [ModalitySpec(f"noise{w}", (w,), self.hidden) for w in self.noise_widths]
        return DatasetSpec(tuple(mods), NUM_CLASSES, self.steps, tuple(f"class{c:02d}" for c in range(NUM_CLASSES)))

    def order(self) -> list[str]:
        """Modalities from most to least informative: the declaration order of ``truth``."""
        return list(self.truth)


PRESETS: dict[str, SyntheticPreset] = {
    "small": SyntheticPreset(
        name="small", steps=20, windows_per_class=20, tactile_shape=(16, 16), hidden=32,
        description="fast: tests and the default demo (T=20, ~6 windows/class/client, 16x16 tactile grids)",
    ),
    "actionsense": SyntheticPreset(
        name="actionsense", steps=100, windows_per_class=20, tactile_shape=(32, 32), hidden=64,
        description="the paper's size (T=100, ~20 windows/class/client, 32x32 tactile grids, hidden 64)",
    ),
    "headroom": SyntheticPreset(
        name="headroom", steps=12, windows_per_class=15, tactile_shape=(12, 12), hidden=16,
        description=("overlapping, partly redundant modalities, informativeness not aligned with size, four "
                     "noise modalities (3, 16, 64, 256 features) and a per-client Shapley ground truth "
                     "(T=12, ~15 windows/class/client, 12x12 tactile grids, hidden 16)"),
        # Isotropic noise on the grids: smooth low-rank noise would make the weak gloves swamp a
        # nearest-centroid classifier on all modalities (and the `all` baseline would measure that).
        grid_noise_rank=0,
        # Strong to weak (the Shapley truth's order); amplitudes moderate, so that no class is certain.
        truth={
            "eye": ModalityTruth(amplitude=1.4, classes=8, active_fraction=1.0),
            "xsens": ModalityTruth(amplitude=1.05, classes=8),
            "emg_right": ModalityTruth(amplitude=1.2, classes=6),
            "emg_left": ModalityTruth(amplitude=0.8, classes=6),
            "tactile_right": ModalityTruth(amplitude=0.9, classes=6),
            "tactile_left": ModalityTruth(amplitude=0.7, classes=6),
        },
        cover={
            "eye": (0, 1, 2, 3, 4, 5, 6, 7),
            "xsens": (6, 7, 8, 9, 10, 11, 12, 13),
            "emg_right": (14, 15, 16, 17, 18, 19),
            "emg_left": (14, 15, 16, 17, 18, 19),  # the redundant pair: the same classes as emg_right
            "tactile_right": (0, 1, 2, 8, 9, 14),
            "tactile_left": (3, 4, 10, 11, 15, 16),
        },
        noise_widths=(3, 16, 64, 256),
    ),
    # --- fleet families (issue 17): headroom's sizes and difficulty, one property each, a Shapley truth ---
    "noisy": SyntheticPreset(
        name="noisy", steps=12, windows_per_class=15, tactile_shape=(12, 12), hidden=16, grid_noise_rank=0,
        description=("family: five pure-noise modalities (3, 9, 32, 64, 256 features) next to five informative "
                     "ones of 2 to 144 features; noise gets Shapley truth 0 (T=12, hidden 16)"),
        modalities=(("eye", (2,)), ("emg", (8,)), ("imu", (24,)), ("xsens", (66,)), ("tactile", (12, 12))),
        truth={
            "eye": ModalityTruth(amplitude=1.3, classes=7, active_fraction=1.0),
            "imu": ModalityTruth(amplitude=1.0, classes=7),
            "emg": ModalityTruth(amplitude=1.1, classes=6),
            "xsens": ModalityTruth(amplitude=0.95, classes=8),
            "tactile": ModalityTruth(amplitude=0.8, classes=6),
        },
        cover={
            "eye": (0, 1, 2, 3, 4, 5, 6),
            "emg": (7, 8, 9, 10, 11, 12),
            "imu": (13, 14, 15, 16, 17, 18, 19),
            "xsens": (3, 4, 5, 10, 11, 12, 16, 17),
            "tactile": (0, 1, 8, 9, 14, 15),
        },
        noise_widths=(3, 9, 32, 64, 256),
    ),
    "redundant": SyntheticPreset(
        name="redundant", steps=12, windows_per_class=15, tactile_shape=(12, 12), hidden=16, grid_noise_rank=0,
        description=("family: three redundant pairs, a small and a much larger modality encoding the same "
                     "classes (2 / 144, 8 / 144, 8 / 66 features), and one modality of its own (T=12, hidden 16)"),
        modalities=(("eye", (2,)), ("emg_left", (8,)), ("emg_right", (8,)), ("imu", (24,)), ("xsens", (66,)),
                    ("tactile_left", (12, 12)), ("tactile_right", (12, 12))),
        truth={
            "eye": ModalityTruth(amplitude=1.1, classes=6, active_fraction=1.0),
            "emg_right": ModalityTruth(amplitude=1.0, classes=6),
            "imu": ModalityTruth(amplitude=0.9, classes=6),
            "xsens": ModalityTruth(amplitude=1.1, classes=5),
            "tactile_right": ModalityTruth(amplitude=1.0, classes=6),
            "tactile_left": ModalityTruth(amplitude=0.9, classes=6),
            "emg_left": ModalityTruth(amplitude=0.7, classes=5),
        },
        cover={
            "eye": (0, 1, 2, 3, 4, 5),
            "tactile_right": (0, 1, 2, 3, 4, 5),  # pair: eye (2 features) / tactile_right (144)
            "emg_right": (6, 7, 8, 9, 10, 11),
            "tactile_left": (6, 7, 8, 9, 10, 11),  # pair: emg_right (8) / tactile_left (144)
            "imu": (17, 18, 19, 0, 6, 12),  # of its own: three classes nothing else encodes
            "xsens": (12, 13, 14, 15, 16),
            "emg_left": (12, 13, 14, 15, 16),  # pair: emg_left (8) / xsens (66)
        },
        pairs=(("eye", "tactile_right"), ("emg_right", "tactile_left"), ("emg_left", "xsens")),
    ),
    "largeweak": SyntheticPreset(
        name="largeweak", steps=12, windows_per_class=15, tactile_shape=(12, 12), hidden=16, grid_noise_rank=0,
        description=("family: informativeness falls as size grows, from a 2-feature modality (the strongest) to "
                     "a 16x16 one (the weakest, not noise) (T=12, hidden 16)"),
        modalities=(("eye", (2,)), ("emg_left", (8,)), ("emg_right", (8,)), ("imu", (24,)), ("xsens", (66,)),
                    ("tactile", (12, 12)), ("camera", (16, 16))),
        truth={
            "eye": ModalityTruth(amplitude=1.3, classes=8, active_fraction=1.0),
            "emg_right": ModalityTruth(amplitude=1.1, classes=7),
            "emg_left": ModalityTruth(amplitude=1.0, classes=6),
            "imu": ModalityTruth(amplitude=0.9, classes=6),
            "xsens": ModalityTruth(amplitude=0.85, classes=6),
            "tactile": ModalityTruth(amplitude=0.8, classes=5),
            "camera": ModalityTruth(amplitude=0.7, classes=6),
        },
        cover={
            "eye": (0, 1, 2, 3, 4, 5, 6, 7),
            "emg_right": (8, 9, 10, 11, 12, 13, 14),
            "emg_left": (14, 15, 16, 17, 18, 19),
            "imu": (2, 3, 9, 10, 16, 17),
            "xsens": (4, 5, 11, 12, 18, 19),
            "tactile": (0, 6, 7, 13, 15),
            "camera": (1, 4, 8, 11, 14, 18),
        },
    ),
}

# The fleet families of issue 17: every one a preset (make_synthetic(name, seed), --preset NAME).
FAMILIES = ("noisy", "redundant", "largeweak")


def _rng(seed: int, *parts: int) -> np.random.Generator:
    """An independent, stable stream per (seed, purpose, ...): changing one client never shifts another."""
    return np.random.default_rng([int(seed), *map(int, parts)])


def _check_cover(p: SyntheticPreset) -> None:
    """An overlapping cover is well formed: known slots, one per truth modality, sizes as declared, and
    every class encoded by a non-tactile modality (the clients without gloves can resolve every class)."""
    cover = p.cover or {}
    if set(cover) != set(p.truth):
        raise ValueError(f"preset {p.name!r}: cover names {sorted(cover)}, truth names {sorted(p.truth)}")
    for name, slots in cover.items():
        if len(set(slots)) != len(slots) or not all(0 <= c < NUM_CLASSES for c in slots):
            raise ValueError(f"preset {p.name!r}: cover of {name!r} must be distinct slots in [0, {NUM_CLASSES})")
        if len(slots) != p.truth[name].classes:
            raise ValueError(f"preset {p.name!r}: {name!r} covers {len(slots)} classes, truth says {p.truth[name].classes}")
    plain = {c for name, slots in cover.items() if not name.startswith("tactile") for c in slots}
    if len(plain) != NUM_CLASSES:
        missing = sorted(set(range(NUM_CLASSES)) - plain)
        raise ValueError(f"preset {p.name!r}: slots {missing} are encoded by no non-tactile modality")


def _blocks(p: SyntheticPreset, rng: np.random.Generator) -> dict[str, list[int]]:
    """Disjoint class blocks, one per modality in truth order, over a random permutation of the classes;
    or, if the preset has a ``cover``, its (overlapping) slots mapped through that permutation."""
    perm = rng.permutation(NUM_CLASSES).tolist()
    if p.cover is not None:
        _check_cover(p)
        return {name: sorted(perm[c] for c in p.cover[name]) for name in p.truth}
    out, start = {}, 0
    for name, truth in p.truth.items():
        out[name] = sorted(perm[start:start + truth.classes])
        start += truth.classes
    if start > NUM_CLASSES:
        raise ValueError(f"the truth table encodes {start} classes, more than {NUM_CLASSES}")
    return out


def _prototypes(spec: ModalitySpec, truth: ModalityTruth, rng: np.random.Generator,
                encoded: list[int]) -> tuple[np.ndarray, list[int]]:
    """Unit-norm class prototypes (C, F) for the classes this modality encodes, zero rows for the rest."""
    f = spec.features
    protos = np.zeros((NUM_CLASSES, f), dtype=np.float64)
    if len(spec.feature_shape) == 2:
        # Tactile: one Gaussian pressure blob per class, at a class-specific place and width.
        h, w = spec.feature_shape
        yy, xx = np.mgrid[0:h, 0:w]
        for c in encoded:
            cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
            width = rng.uniform(0.08, 0.18) * max(h, w)
            protos[c] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2)).ravel()
    elif f == 2:
        # Gaze (2-D): prototypes evenly spaced on the unit circle, in a random class order.
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(len(encoded)) / len(encoded)
        for c, a in zip(rng.permutation(encoded), angles):
            protos[c] = (np.cos(a), np.sin(a))
    else:
        k = max(1, int(round(truth.active_fraction * f)))
        for c in encoded:
            ch = rng.choice(f, size=k, replace=False)
            protos[c, ch] = rng.standard_normal(k)
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    protos = np.divide(protos, norms, out=np.zeros_like(protos), where=norms > 0)
    return protos, encoded


def _smooth_basis(shape: tuple[int, int], k: int, rng: np.random.Generator) -> np.ndarray:
    """K unit-norm smooth fields on a grid (Gaussian bumps): the few ways a glove's pressure map moves."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((k, h * w), dtype=np.float32)
    for i in range(k):
        cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
        width = rng.uniform(0.1, 0.3) * max(h, w)
        b = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2)).ravel()
        out[i] = b / np.linalg.norm(b)
    return out


def _noise(shape: tuple[int, ...], scale: float, basis: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of mean per-feature variance ``scale**2``: isotropic, or in the span of ``basis`` (K, F)."""
    if basis is None:
        return scale * rng.standard_normal(shape, dtype=np.float32)
    k, f = basis.shape
    coef = rng.standard_normal((*shape[:-1], k), dtype=np.float32)
    return (coef @ basis) * np.float32(scale * math.sqrt(f / k))


def _expected_accuracy(protos: np.ndarray, amplitude: float, noise: float, n_train: int,
                       rng: np.random.Generator, basis: np.ndarray | None = None,
                       per_class: int = 20, reps: int = 3) -> float:
    """Expected accuracy of a nearest-class-centroid classifier on time-averaged windows (Monte Carlo).

    Centroids are estimated from ``n_train`` windows per class, as one client has them, so the score
    reflects how learnable a modality is from a client's data (more features need more windows), not
    just how far apart its prototypes are. Classes a modality does not encode share the zero
    prototype and score the chance rate among themselves.
    """
    centres = amplitude * protos  # (C, F)
    c, f = centres.shape
    hits = 0.0
    for _ in range(reps):
        cent = centres + _noise((n_train, c, f), noise, basis, rng).mean(0)
        y = np.repeat(np.arange(c), per_class)
        x = centres[y] + _noise((y.size, f), noise, basis, rng)
        d = (x**2).sum(1)[:, None] - 2 * x @ cent.T + (cent**2).sum(1)[None, :]
        hits += float((d.argmin(1) == y).mean())
    return hits / reps


def _per_class_accuracy(protos: np.ndarray, amplitude: float, noise: float, n_train: int,
                        rng: np.random.Generator, basis: np.ndarray | None = None,
                        per_class: int = 100, reps: int = 12) -> np.ndarray:
    """Per-class accuracies (C,) of the classifier of :func:`_expected_accuracy` (Monte Carlo): the
    probability that a window of class c is labelled c, centroids from ``n_train`` windows per class."""
    centres = amplitude * protos  # (C, F)
    c, f = centres.shape
    y = np.repeat(np.arange(c), per_class)
    hits = np.zeros(c, dtype=np.float64)
    for _ in range(reps):
        cent = centres + _noise((n_train, c, f), noise, basis, rng).mean(0)
        x = centres[y] + _noise((y.size, f), noise, basis, rng)
        d = (x**2).sum(1)[:, None] - 2 * x @ cent.T + (cent**2).sum(1)[None, :]
        hits += np.bincount(y, weights=(d.argmin(1) == y).astype(np.float64), minlength=c)
    return hits / (reps * per_class)


def _max_game_shapley(gain: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact Shapley values (M,) of v(S) = mean_c max_{m in S} gain[m, c] (v of the empty set 0, gains
    >= 0), by enumerating all 2^M coalitions; and v(all). Meant for M <= ~12 players."""
    m = gain.shape[0]
    if m == 0:
        return np.zeros(0), 0.0
    masks = np.arange(1 << m)
    member = ((masks[:, None] >> np.arange(m)[None, :]) & 1).astype(bool)  # (2^M, M)
    value = np.where(member[:, :, None], gain[None], 0.0).max(axis=1).mean(axis=1)  # (2^M,)
    size = member.sum(1)
    fact = [math.factorial(k) for k in range(m + 1)]
    weight = np.array([fact[k] * fact[m - k - 1] / fact[m] if k < m else 0.0 for k in range(m + 1)])
    phi = np.empty(m)
    for i in range(m):
        without = masks[~member[:, i]]  # coalitions lacking player i
        phi[i] = float((weight[size[without]] * (value[without | (1 << i)] - value[without])).sum())
    return phi, float(value[-1])


def _shapley_truth(gain: dict[str, np.ndarray], clients: list[ClientData],
                   names: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, float]]:
    """Per-client exact Shapley values of the max game over the client's present modalities, v(all) per
    client, and the truth of a client with every modality in ``names``."""
    per_client: dict[str, dict[str, float]] = {}
    v_all: dict[str, float] = {}
    for c in clients:
        present = [m for m in names if m in c.x]
        phi, v = _max_game_shapley(np.stack([gain[m] for m in present]))
        per_client[c.name] = {m: float(x) for m, x in zip(present, phi)}
        v_all[c.name] = v
    phi, _ = _max_game_shapley(np.stack([gain[m] for m in names]))
    return per_client, v_all, {m: float(x) for m, x in zip(names, phi)}


def _class_counts(preset: SyntheticPreset, rng: np.random.Generator) -> np.ndarray:
    """Per-client label skew: each class count is drawn around windows_per_class, never below 3."""
    w = preset.windows_per_class
    counts = np.rint(w * np.exp(rng.normal(0.0, 0.35, NUM_CLASSES))).astype(np.int64)
    return np.clip(counts, max(3, w // 2), 2 * w)


def make_synthetic(preset: str = "small", seed: int = 0) -> Fleet:
    """Generate the synthetic ActionSense-shaped fleet ``preset`` (see ``PRESETS``), deterministic in ``seed``.

    Nine clients named like the paper's subjects; ``tactile_left``/``tactile_right`` are absent on
    S06-S09; a stratified 80/20 train/test split per client; float32 arrays in [-1, 1].
    """
    try:
        p = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown synthetic preset {preset!r}; known: {', '.join(PRESETS)}") from None
    spec = p.spec()
    # The generated modalities (the noise ones, if any, are added at the end by add_noise_modalities).
    base = DatasetSpec(tuple(ms for ms in spec.modalities if ms.name in p.truth), spec.num_classes,
                       spec.steps, spec.class_names)
    t = p.steps
    steps = np.arange(t, dtype=np.float64)

    # Fleet-level truth: prototypes, encoded classes, temporal envelopes (shared by every client).
    protos: dict[str, np.ndarray] = {}
    encoded: dict[str, list[int]] = {}
    informativeness: dict[str, float] = {}
    # Noise of a time-averaged window: window-level noise plus the white noise averaged over T steps.
    avg_noise = math.sqrt(p.window_noise**2 + p.step_noise**2 / t)
    n_train = max(2, int(round(0.8 * p.windows_per_class)))
    bases: dict[str, np.ndarray | None] = {}
    class_gain: dict[str, np.ndarray] = {}  # the Shapley truth's per-class gains (presets with a cover)
    blocks = _blocks(p, _rng(seed, 8))
    for j, ms in enumerate(base.modalities):
        truth = p.truth[ms.name]
        protos[ms.name], encoded[ms.name] = _prototypes(ms, truth, _rng(seed, 1, j), blocks[ms.name])
        grid = len(ms.feature_shape) == 2 and p.grid_noise_rank > 0
        shape2 = (ms.feature_shape[0], ms.feature_shape[-1])
        bases[ms.name] = _smooth_basis(shape2, p.grid_noise_rank, _rng(seed, 7, j)) if grid else None
        informativeness[ms.name] = round(_expected_accuracy(
            protos[ms.name], truth.amplitude, avg_noise, n_train, _rng(seed, 2, j), bases[ms.name]), 4)
        if p.cover is not None:
            r = _per_class_accuracy(protos[ms.name], truth.amplitude, avg_noise, n_train, _rng(seed, 9, j),
                                    bases[ms.name])
            g = np.maximum(r - 1.0 / NUM_CLASSES, 0.0)
            g[np.linalg.norm(protos[ms.name], axis=1) == 0] = 0.0  # no credit for classes it does not encode
            class_gain[ms.name] = g
    env_rng = _rng(seed, 3)
    freq = env_rng.integers(1, 4, NUM_CLASSES)
    phase = env_rng.uniform(0, 2 * np.pi, NUM_CLASSES)
    envelope = 1.0 + 0.5 * np.sin(2 * np.pi * freq[:, None] * steps[None, :] / t + phase[:, None])  # (C, T)

    clients = []
    for k, name in enumerate(SUBJECTS):
        crng = _rng(seed, 4, k)
        counts = _class_counts(p, crng)
        y = np.repeat(np.arange(NUM_CLASSES), counts)
        y = y[crng.permutation(y.size)]
        train = stratified_split(y, 0.8, _rng(seed, 5, k))
        xs: dict[str, np.ndarray] = {}
        for j, ms in enumerate(base.modalities):
            if name in TACTILE_MISSING and ms.name.startswith("tactile"):
                continue
            mrng = _rng(seed, 6, k, j)
            f = ms.features
            amp = p.truth[ms.name].amplitude
            gain = (1.0 + 0.15 * mrng.standard_normal(f)).astype(np.float32)
            offset = (0.1 * mrng.standard_normal(f)).astype(np.float32)
            signal = (amp * protos[ms.name][y]).astype(np.float32)  # (N, F)
            basis = bases[ms.name]
            # White noise: uniform, drawn as int8 (10x faster than normals: the paper-size preset draws
            # ~0.5 G values for the tactile grids alone). On grids most of the noise is smooth instead.
            white = p.step_noise if basis is None else p.grid_white_noise
            x = mrng.integers(-128, 128, (y.size, t, f), dtype=np.int8).astype(np.float32)
            x *= np.float32(white * math.sqrt(3.0) / 128.0)
            centre = np.float32(0.5 * white * math.sqrt(3.0) / 128.0)  # the int8 draw's mean is -0.5
            x += _noise((y.size, 1, f), p.window_noise, basis, mrng) + centre
            if basis is not None and p.grid_step_noise:
                x += _noise((y.size, t, f), p.grid_step_noise, basis, mrng)
            x += envelope[y][:, :, None].astype(np.float32) * signal[:, None, :]
            # One scale per modality (SNR unchanged) so that values stay in [-1, 1] up to rare outliers.
            peak = 1.5 * amp * float(np.abs(protos[ms.name]).max()) + 3.0 * math.hypot(p.window_noise, p.step_noise)
            x *= gain * np.float32(1.0 / peak)
            x += offset
            np.clip(x, -1.0, 1.0, out=x)
            xs[ms.name] = x.reshape(y.size, t, *ms.feature_shape)
        clients.append(ClientData(name, xs, y.astype(np.int64), train))

    order = sorted(informativeness, key=lambda m: (-informativeness[m], p.order().index(m)))
    metadata = {
        "generator": GENERATOR,
        "preset": p.name,
        "seed": int(seed),
        "informativeness": informativeness,
        "informativeness_order": p.order(),
        "score_order": order,
        "amplitude": {m: tr.amplitude for m, tr in p.truth.items()},
        "encoded_classes": encoded,
        "tactile_missing": list(TACTILE_MISSING),
        "window_noise": p.window_noise,
        "step_noise": p.step_noise,
    }
    if p.pairs:
        metadata["redundant_pairs"] = [list(pair) for pair in p.pairs]
    fleet = Fleet(base, clients, metadata)
    if p.noise_widths:
        fleet = add_noise_modalities(fleet, p.noise_widths, seed=seed, hidden=p.hidden)  # validates
    else:
        fleet.validate()
    if fleet.spec != spec:
        raise RuntimeError(f"preset {p.name!r}: generated spec {fleet.spec} is not the preset's {spec}")
    if p.cover is not None:
        fleet.metadata.update(_truth_metadata(fleet, class_gain, p.order()))
    return fleet


def _truth_metadata(fleet: Fleet, gain: dict[str, np.ndarray], declared: list[str]) -> dict:
    """The Shapley ground truth of a preset with a cover (see the module docstring), JSON-ready."""
    md = fleet.metadata
    noise = list(md.get("noise_modalities", []))
    gain = {**gain, **{m: np.zeros(NUM_CLASSES) for m in noise}}
    names = list(fleet.spec.names)
    per_client, v_all, whole = _shapley_truth(gain, fleet.clients, names)
    informative = sorted(declared, key=lambda m: (-whole[m], declared.index(m)))
    inf = md["informativeness"]
    return {
        "shapley_truth": per_client,
        "shapley_truth_value_all": v_all,
        "shapley_truth_fleet": whole,
        "class_gain": {m: [float(v) for v in gain[m]] for m in names},
        "informativeness_order": informative + noise,
        "score_order": sorted(inf, key=lambda m: (-inf[m], names.index(m))),
        "encoded_classes": {**md["encoded_classes"], **{m: [] for m in noise}},
    }


def add_noise_modalities(fleet: Fleet, widths: tuple[int, ...] = (3, 16, 64, 256), seed: int = 0,
                         hidden: int | None = None) -> Fleet:
    """``fleet`` with one pure-noise modality ``noise<w>`` of ``w`` features per width, on every client:
    Gaussian noise per window and step, independent of the label, scaled like the other modalities.
    The noise modalities join the end of the ground truth (``informativeness`` = chance, listed in
    ``metadata["noise_modalities"]``), so a scoring rule can be checked to rank them last."""
    if not widths or len(set(widths)) != len(widths) or min(widths) < 1:
        raise ValueError(f"widths must be distinct positive feature counts, got {widths}")
    spec = fleet.spec
    h = hidden or spec.modalities[0].hidden
    extra = tuple(ModalitySpec(f"noise{w}", (w,), h) for w in widths)
    new_spec = DatasetSpec(spec.modalities + extra, spec.num_classes, spec.steps, spec.class_names)
    clients = []
    for i, c in enumerate(fleet.clients):
        xs = dict(c.x)
        for j, ms in enumerate(extra):
            rng = _rng(seed, 0x0015E, i, j)
            xs[ms.name] = np.clip(rng.normal(0.0, 0.35, (len(c.y), spec.steps, ms.features)), -1, 1).astype(np.float32)
        clients.append(ClientData(c.name, xs, c.y, c.train))
    meta = dict(fleet.metadata)
    chance = 1.0 / spec.num_classes
    meta["informativeness"] = {**meta.get("informativeness", {}), **{ms.name: chance for ms in extra}}
    meta["informativeness_order"] = list(meta.get("informativeness_order", spec.names)) + [ms.name for ms in extra]
    meta["noise_modalities"] = [ms.name for ms in extra]
    out = Fleet(new_spec, clients, meta)
    out.validate()
    return out
