"""Methods compared as a paper reports them: seeds, confidence intervals, equal rounds and equal bytes.

``fedmfs compare`` (and its wrapper ``bench/compare.py``) is the command line over this module; everything
it prints is computed here. Running the grid (in this process or as Ray tasks, results saved as each
run ends, resumable) is :mod:`fedmfs.sim.grid`.

The protocol (docs/benchmarks.md):

* **Seeds.** Every (variant, seed) pair is one run of :func:`fedmfs.sim.driver.run_simulation` over
  the ``inproc`` transport (:func:`fedmfs.sim.grid.run_job`) on the fleet ``fleet_factory(seed)``
  with ``SimConfig.seed = seed``. Defaults are tuned on :data:`TUNING_SEEDS` on the validation
  split (:meth:`Fleet.validation_view`: a stratified quarter of each client's *training* windows is
  held out; its test windows are never read); figures are reported on :data:`REPORTING_SEEDS` on
  the real test split, run once.
* **Equal rounds.** Each variant's final-round accuracy after the same number of rounds: mean over
  seeds with a Student-t 95% confidence interval (:func:`mean_ci`), and its paired difference to the
  ``all`` baseline, seed by seed (:func:`paired_diff_ci`).
* **Equal bytes** (the paper's Table II protocol): at a budget of cumulative upload bytes, a method's
  accuracy is that of its last round whose cumulative upload fits the budget
  (:func:`accuracy_at_bytes`): the run as if it had stopped when the next round would overspend.
  The default budgets are the reference variant's (FedMFS's) largest total upload over the seeds
  (every FedMFS run fits it whole) and half of it, so every method that spends more per round than
  FedMFS is cut short.
* **Rare modalities.** Next to the mean over clients, the accuracy of the clients holding a rare
  modality (a modality some clients lack and at most two thirds hold: the synthetic presets' tactile
  gloves; :func:`fedmfs.sim.report.modality_groups`), where a wrong selection hurts first: mean and
  CI over seeds, and the reference's paired differences to each of ``against``, at equal rounds and at
  equal bytes (the same Table II rule, :func:`accuracy_at_bytes` with ``key="rare_accuracy"``). Runs
  saved before the field count as n/a for it.
* **Pareto plot** (:func:`pareto_plot`): final accuracy against mean cumulative MB, every variant with
  its confidence intervals, and the front of variants no other beats on both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmfs.core.data.format import Fleet
from fedmfs.core.modality import DatasetSpec
from fedmfs.core.selection import Alphas, SelectionPolicy
from fedmfs.core.settings import TrainConfig
from fedmfs.sim.report import RARE_SHARE

if TYPE_CHECKING:
    from fedmfs.sim.config import SimConfig

__all__ = [
    "REPORTING_SEEDS",
    "TUNING_SEEDS",
    "SPLITS",
    "Variant",
    "SyntheticFleet",
    "default_variants",
    "modality_payload_sizes",
    "upload_sizes",
    "mean_ci",
    "paired_diff_ci",
    "accuracy_at_bytes",
    "run_grid",
    "load_runs",
    "summarize",
    "headline_checks",
    "format_summary",
    "pareto_front",
    "pareto_plot",
    "ranking_checks",
    "client_ranking",
]

REPORTING_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
TUNING_SEEDS: tuple[int, ...] = (100, 101, 102, 103, 104)
SPLITS = ("validation", "test")
VALIDATION_FRACTION = 0.25


# ------------------------------------------------------------------------------------ statistics

def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_ci(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float]:
    """(mean, half width of the two-sided ``level`` confidence interval) of ``values`` under Student's t:
    half = t_{(1 + level) / 2, n - 1} * s / sqrt(n), s the sample standard deviation (ddof 1).
    None and NaN values are left out; the half width is NaN for fewer than two values, the mean NaN
    for none."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return math.nan, math.nan
    mean = float(np.mean(v))
    if n < 2:
        return mean, math.nan
    # scipy (the test extra) only here, where the statistics need it
    from scipy.stats import t

    sd = float(np.std(v, ddof=1))
    return mean, float(t.ppf((1.0 + level) / 2.0, n - 1)) * sd / math.sqrt(n)


def paired_diff_ci(a: Sequence[float | None], b: Sequence[float | None],
                   level: float = 0.95) -> tuple[float, float]:
    """(mean, CI half width) of the per-seed differences a[i] - b[i] (``a`` and ``b`` aligned by seed);
    pairs where either side is None or NaN are left out. Pairing removes what the seed's fleet does to
    both methods alike, so this interval is narrower than the two means' intervals suggest."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)
         if x is not None and y is not None and math.isfinite(float(x)) and math.isfinite(float(y))]
    return mean_ci(d, level)


def accuracy_at_bytes(rounds: Sequence[Mapping[str, Any]], budget: float, key: str = "accuracy") -> float | None:
    """The paper's Table II rule: the accuracy of the last round whose cumulative upload bytes (the
    sum of ``rounds[j]["upload_bytes"]`` for j <= i) is at most ``budget``: the run stopped before the
    round that would overspend. None when round 0 alone exceeds the budget (no round fits), or when the
    round found has no accuracy. A budget above the run's total gives its final round: the run did
    not spend the budget, so budgets are meant to be at most the totals of the runs compared.
    ``key`` names the round's accuracy read (``rare_accuracy``: the rare modalities' clients; a
    round without it has none)."""
    acc = None
    cumulative = 0
    for r in rounds:
        cumulative += int(r["upload_bytes"])
        if cumulative > budget:
            break
        acc = r.get(key)
    return None if acc is None else float(acc)


# ------------------------------------------------------------------------------------ the variants

@dataclass(frozen=True)
class Variant:
    """One line of the comparison: a method with its settings.

    ``settings`` are :meth:`SimConfig.build` keywords (``gamma``, ``alphas``, ``cap_bytes``, ``codec``,
    ``cap_rule``); what is not given takes its one declared default (:class:`SelectionPolicy`). Two
    settings are resolved against the fleet's spec, because they depend on its model sizes:
    ``cap_of_largest`` sets ``cap_bytes`` to that multiple of the largest modality model's payload in the
    variant's codec; ``gamma_all`` sets gamma to the number of modalities (the cap alone limits)."""

    name: str
    method: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    family: str = "method"         # what it sweeps, for the plot: method, gamma, codec, alpha, cap
    cap_of_largest: float | None = None
    gamma_all: bool = False

    def sim_kwargs(self, spec: DatasetSpec) -> dict[str, Any]:
        kw = dict(self.settings)
        if self.gamma_all:
            kw["gamma"] = len(spec.names)
        if self.cap_of_largest is not None:
            codec = kw.get("codec", SelectionPolicy().codec)
            kw["cap_bytes"] = max(1, int(self.cap_of_largest * max(modality_payload_sizes(spec, codec).values())))
        return kw


def modality_payload_sizes(spec: DatasetSpec, codec: str = "fp32") -> dict[str, int]:
    """Bytes of each modality model's upload in ``codec`` (freshly initialised weights; a real upload's
    header differs by a few bytes): what selection and caps count."""
    from fedmfs.core.payload import encoded_size
    from fedmfs.learner.models import build_modality_models, state_to_numpy

    return {m: encoded_size(state_to_numpy(model), codec, m) for m, model in build_modality_models(spec).items()}


def upload_sizes(cfg: SimConfig, spec: DatasetSpec) -> dict[str, tuple[int, int]]:
    """Every model a client of this run can upload (one per modality; the holistic baseline's one
    model) with its encoded bytes in the run's codec, ``(least, most)``.

    A real upload's header carries its round and sample count, so its size lies between the payload
    with round 0 and one sample and the one with the run's last round and the largest sample count a
    header may carry (a few bytes apart); a byte cap below the least is never met. Computed from the
    spec's model shapes (freshly initialised weights: the size does not depend on the values), so
    nothing is trained."""
    from fedmfs.core.payload import MAX_SAMPLES, Codec, ModelHeader, encode_model
    from fedmfs.learner.models import build_modality_models, state_to_numpy

    if cfg.baseline == "holistic":
        from fedmfs.sim.holistic import HolisticModel

        states = {"holistic": state_to_numpy(HolisticModel(spec))}
    else:
        states = {m: state_to_numpy(model) for m, model in build_modality_models(spec).items()}
    codec = Codec(cfg.policy.codec)
    last = max(0, cfg.rounds - 1)
    return {m: (len(encode_model(st, ModelHeader(0, m, 1, codec))),
                len(encode_model(st, ModelHeader(last, m, MAX_SAMPLES, codec)))) for m, st in states.items()}


def default_variants() -> list[Variant]:
    """Every method, and FedMFS swept over gamma, codec, alphas and byte caps (the paper's Table II
    rows among them). ``fedmfs`` is the project's default policy, the centre of every sweep; the
    baselines upload in fp32 unless named otherwise; ``random`` draws as many modalities as FedMFS
    sends (gamma of the default policy)."""
    gamma = SelectionPolicy().gamma
    v = [
        Variant("fedmfs", "fedmfs"),
        Variant("all", "all"),
        Variant("random", "random", {"gamma": gamma}),
        Variant("holistic", "holistic"),
    ]
    v += [Variant(f"fedmfs-g{g}", "fedmfs", {"gamma": g}, "gamma") for g in (1, 2, 3) if g != gamma]
    v += [Variant(f"fedmfs-{c}", "fedmfs", {"codec": c}, "codec") for c in ("fp32", "fp16", "int8")
          if c != SelectionPolicy().codec]
    v.append(Variant("all-int8", "all", {"codec": "int8"}, "codec"))    # is FedMFS's gain only int8's?
    # the paper's two gamma = 1 rows (no recency), lighter recencies (mmFedMC's 1/3 each: 0.1.0's default)
    # and a heavier one than the default's
    for s, c, r in ((0.2, 0.8, 0.0), (0.5, 0.5, 0.0), (0.4, 0.4, 0.2), (1 / 3, 1 / 3, 1 / 3), (0.2, 0.2, 0.6),
                    (0.1, 0.1, 0.8)):
        if Alphas(s, c, r) != Alphas():
            v.append(Variant(f"fedmfs-a{s:.2g}-{c:.2g}-{r:.2g}", "fedmfs", {"alphas": Alphas(s, c, r)}, "alpha"))
    # the paper's priority formula (min-max over every modality, no evidence gate) with the same alphas,
    # and the evidence gate's share of the best score swept around its default
    v.append(Variant("fedmfs-paper", "fedmfs", {"priority": "paper"}, "priority"))
    v += [Variant(f"fedmfs-ev{e:g}", "fedmfs", {"evidence": e}, "evidence") for e in (0.0, 0.1, 0.35, 0.5)
          if e != SelectionPolicy().evidence]
    # compute saving: idle modalities (neither sent nor near the gamma-th priority) train every 3rd round
    v.append(Variant("fedmfs-idle3", "fedmfs", {"train": TrainConfig(idle_every=3)}, "compute"))
    # binding caps: every modality may go, as long as the round's uploads fit the cap; relative to the
    # largest model (tactile): a quarter (only the small models fit), a half (xsens fits), one
    v += [Variant(f"fedmfs-cap{f:g}", "fedmfs", {}, "cap", cap_of_largest=f, gamma_all=True)
          for f in (0.25, 0.5, 1.0)]
    return v


@dataclass(frozen=True)
class SyntheticFleet:
    """A fleet factory for :func:`run_grid`: ``make_synthetic(preset, seed)``, cut to its first
    ``clients`` clients if given (smoke runs). A class, so Ray tasks can receive it and a results
    directory can record it (its fields are part of a saved run's settings)."""

    preset: str
    clients: int | None = None

    def spec(self) -> DatasetSpec:
        """The preset's spec, without making a fleet (every seed's fleet has it)."""
        from fedmfs.core.data.synthetic import PRESETS

        return PRESETS[self.preset].spec()

    def __call__(self, seed: int) -> Fleet:
        from fedmfs.core.data import make_synthetic

        fleet = make_synthetic(self.preset, seed=seed)
        if self.clients is not None:
            fleet = Fleet(fleet.spec, fleet.clients[: self.clients], dict(fleet.metadata))
        return fleet


# ------------------------------------------------------------------------------------ running

def _spec_of(fleet_factory: Callable[[int], Fleet], seed: int) -> DatasetSpec:
    spec = getattr(fleet_factory, "spec", None)
    return spec() if callable(spec) else fleet_factory(seed).spec


def run_grid(fleet_factory: Callable[[int], Fleet], variants: Sequence[Variant], seeds: Sequence[int], rounds: int,
             split: str = "test", *, workers: int = 1, ray_address: str | None = None, out: str | Path | None = None,
             validation_fraction: float = VALIDATION_FRACTION, on_run: Callable[[dict[str, Any]], None] | None = None,
             on_resume: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run every (variant, seed) for ``rounds`` rounds; return one row per run, variant-major in the
    given orders: ``variant``, ``method``, ``family``, ``seed``, ``split``, ``config``, ``rounds`` (per
    round: ``accuracy``, ``upload_bytes``, ``cumulative_bytes``, ``rare_accuracy``,
    ``modality_set_accuracy``), ``final_accuracy``, ``rare_modalities``, ``total_upload_bytes``,
    ``last_shapley``, and where and how fast it ran (``seconds``, ``ran_on``).

    ``split="test"`` runs on the fleet as made (reporting); ``split="validation"`` on its
    :meth:`~Fleet.validation_view` (tuning). ``workers`` <= 1 without ``ray_address`` runs the grid
    here, one run after another (the reference); otherwise each run is a Ray task of one CPU, on a
    local Ray of ``workers`` CPUs started on demand or on the cluster at ``ray_address``
    (:mod:`fedmfs.sim.grid`; ``fleet_factory`` must then be picklable, e.g. :class:`SyntheticFleet`).
    Both call the same :func:`fedmfs.sim.grid.run_job`, so they give the same rows but for
    ``seconds`` and ``ran_on``. ``out``: the results directory: each run saved there as it ends, runs
    saved with the same settings loaded instead of run (``on_resume(rows)``), a saved run with other
    settings refused. ``on_run(row)`` is told of each new run as it ends."""
    from fedmfs.sim.config import SimConfig
    from fedmfs.sim.grid import Job, execute

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    specs: dict[int, DatasetSpec] = {}
    jobs = []
    for v in variants:
        for s in seeds:
            seed = int(s)
            if seed not in specs:
                specs[seed] = _spec_of(fleet_factory, seed)
            cfg = SimConfig.build(v.method, rounds=int(rounds), seed=seed, **v.sim_kwargs(specs[seed]))
            jobs.append(Job(fleet_factory, v.name, v.family, seed, int(rounds), split, validation_fraction, cfg))
    return execute(jobs, workers=workers, ray_address=ray_address, out=out, on_run=on_run, on_resume=on_resume)


def _saved_grid(path: Path) -> tuple[dict, list[dict]]:
    """(arguments, runs) of one saved grid: a ``--json`` file, or a results directory (its run files,
    in :func:`default_variants` order, then by name and seed)."""
    from fedmfs.core.errors import PayloadError
    from fedmfs.core.safejson import loads
    from fedmfs.sim.grid import read_run_file

    if path.is_dir():
        docs = [read_run_file(f) for f in sorted((path / "runs").glob("*.json")) if not f.name.startswith(".")]
        if not docs:
            raise ValueError(f"{path}: no saved runs in {path / 'runs'}")
        order = {v.name: i for i, v in enumerate(default_variants())}
        docs.sort(key=lambda d: (order.get(d["run"]["variant"], len(order)), d["run"]["variant"], d["run"]["seed"]))
        st = docs[0]["settings"]
        fleet = st.get("fleet", {})
        return ({"preset": fleet.get("preset"), "clients": fleet.get("clients"), "rounds": st.get("rounds"),
                 "split": st.get("split")}, [d["run"] for d in docs])
    try:
        saved = loads(path.read_bytes(), str(path))
    except PayloadError as e:
        raise ValueError(str(e)) from e
    if not isinstance(saved, dict) or not isinstance(saved.get("runs"), list):
        raise ValueError(f"{path}: not a saved grid (an object with runs)")
    return dict(saved.get("args", {})), saved["runs"]


def load_runs(paths: Sequence[str | Path]) -> tuple[list[dict], dict]:
    """The runs of several saved grids (``--json`` files or results directories of ``fedmfs
    compare``) as one, and their arguments: the grids must agree on preset, rounds and split, and hold
    each (variant, seed) once. Read as JSON within bounds (:mod:`fedmfs.core.safejson`)."""
    runs: list[dict] = []
    meta: dict = {}
    seen: dict[tuple[str, int], Path] = {}
    files = [Path(p) for p in paths]
    for path in files:
        m, saved_runs = _saved_grid(path)
        if meta:
            differ = [k for k in ("preset", "rounds", "split") if m.get(k) != meta.get(k)]
            if differ:
                raise ValueError(f"{path}: {', '.join(f'{k} {m.get(k)!r}' for k in differ)} differ from "
                                 f"{files[0]}'s ({', '.join(f'{k} {meta.get(k)!r}' for k in differ)}): "
                                 "summarise such grids apart")
        else:
            meta = dict(m)
        for r in saved_runs:
            key = (r["variant"], int(r["seed"]))
            if key in seen:
                raise ValueError(f"{path}: {key[0]} seed {key[1]} is also in {seen[key]}: keep one of them")
            seen[key] = path
            runs.append(r)
    meta["seeds"] = sorted({int(r["seed"]) for r in runs})
    meta["variants"] = list(dict.fromkeys(r["variant"] for r in runs))
    return runs, meta


# ------------------------------------------------------------------------------------ the summary

def _est(values: Sequence[float | None], level: float) -> dict[str, Any]:
    m, h = mean_ci(values, level)
    return {"mean": m, "ci": h, "n": len(_finite(values))}


def _paired(a: Mapping[int, float | None], b: Mapping[int, float | None], level: float) -> dict[str, Any]:
    seeds = sorted(set(a) & set(b))
    x, y = [a[s] for s in seeds], [b[s] for s in seeds]
    m, h = paired_diff_ci(x, y, level)
    n = sum(1 for p, q in zip(x, y) if p is not None and q is not None)
    return {"mean": m, "ci": h, "n": n}


def summarize(runs: Sequence[Mapping[str, Any]], *, baseline: str = "all", reference: str = "fedmfs",
              against: Sequence[str] = ("all", "holistic", "random"), budget_fractions: Sequence[float] = (1.0, 0.5),
              budgets: Sequence[float] | None = None, level: float = 0.95) -> dict[str, Any]:
    """The figures of :func:`run_grid`'s rows, JSON-ready.

    ``variants[name]``: ``final_accuracy`` and ``total_mb`` (mean, ci, n), ``bytes_ratio`` (its mean
    total over ``baseline``'s), ``diff_vs_baseline`` (paired final-accuracy difference).
    ``equal_bytes``: one entry per budget (``budgets`` in bytes, or ``budget_fractions`` of
    ``reference``'s largest total over the seeds, so that 1.0 leaves every run of it whole): each
    variant's accuracy at the budget and the paired differences of ``reference`` against each of
    ``against``. Accuracies are fractions (0..1).

    The clients holding a rare modality, beside the mean: ``variants[name]["rare_accuracy"]`` (its
    final round, mean, ci, n) and ``rare_diff_vs_baseline``; per budget ``rare_accuracy`` and
    ``rare_diff`` (as ``accuracy`` and ``diff``); ``rare``: ``modalities`` (the runs' rare modalities),
    ``runs_without`` (runs saved without the field: n/a, left out of n) and ``diff`` (``reference``
    against each of ``against`` at equal rounds)."""
    order: list[str] = []
    by: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in runs:
        if r["variant"] not in by:
            order.append(r["variant"])
            by[r["variant"]] = {}
        by[r["variant"]][int(r["seed"])] = r
    final = {v: {s: r["final_accuracy"] for s, r in rs.items()} for v, rs in by.items()}
    rare = {v: {s: _final_rare(r) for s, r in rs.items()} for v, rs in by.items()}
    totals = {v: [float(r["total_upload_bytes"]) for r in rs.values()] for v, rs in by.items()}
    base_total = float(np.mean(totals[baseline])) if baseline in totals else math.nan
    variants: dict[str, Any] = {}
    for v in order:
        first = next(iter(by[v].values()))
        mb = [t / 1e6 for t in totals[v]]
        variants[v] = {
            "method": first["method"], "family": first.get("family", "method"), "config": first.get("config"),
            "seeds": sorted(by[v]),
            "final_accuracy": _est(list(final[v].values()), level),
            "total_mb": _est(mb, level),
            "bytes_ratio": float(np.mean(totals[v])) / base_total if base_total else math.nan,
            "diff_vs_baseline": _paired(final[v], final[baseline], level) if baseline in final else None,
            "rare_accuracy": _est(list(rare[v].values()), level),
            "rare_diff_vs_baseline": _paired(rare[v], rare[baseline], level) if baseline in rare else None,
            "seconds": float(np.mean([r.get("seconds", math.nan) for r in by[v].values()])),
            # the share of the uploads that were pure noise (modalities named noise<w>), per seed
            "noise_upload_share": _est([x for x in (_noise_share(r) for r in by[v].values()) if x is not None], level),
            # CPU seconds of the run per round, and the (device, modality) trainings skipped as idle
            "cpu_per_round": _est([r["cpu_seconds"] / max(1, len(r["rounds"])) for r in by[v].values()
                                   if "cpu_seconds" in r], level),
            "skipped_per_round": _est([_skipped_per_round(r) for r in by[v].values()
                                       if all("skipped" in x for x in r["rounds"])], level),
        }
    if budgets is None:   # the reference's largest total: its whole run fits on every seed
        budgets = ([f * max(totals[reference]) for f in budget_fractions] if reference in totals else [])
    equal = []
    for b in budgets:
        acc = {v: {s: accuracy_at_bytes(r["rounds"], b) for s, r in rs.items()} for v, rs in by.items()}
        rare_b = {v: {s: accuracy_at_bytes(r["rounds"], b, "rare_accuracy") for s, r in rs.items()}
                  for v, rs in by.items()}
        equal.append({
            "budget_bytes": float(b),
            "accuracy": {v: _est(list(acc[v].values()), level) for v in order},
            "rounds_used": {v: float(np.mean([sum(1 for _ in _fitting(r["rounds"], b)) for r in by[v].values()]))
                            for v in order},
            "diff": {o: _paired(acc[reference], acc[o], level) for o in against if o in acc and reference in acc},
            "rare_accuracy": {v: _est(list(rare_b[v].values()), level) for v in order},
            "rare_diff": {o: _paired(rare_b[reference], rare_b[o], level)
                          for o in against if o in rare_b and reference in rare_b},
        })
    seeds = sorted({int(r["seed"]) for r in runs})
    rounds = sorted({len(r["rounds"]) for r in runs})
    splits = sorted({r.get("split", "test") for r in runs})
    rare_summary = {
        "modalities": list(dict.fromkeys(m for r in runs for m in r.get("rare_modalities", ()))),
        "runs_without": sum(1 for r in runs if "rare_modalities" not in r),
        "diff": {o: _paired(rare[reference], rare[o], level) for o in against if o in rare and reference in rare},
    }
    return {"seeds": seeds, "rounds": rounds, "splits": splits, "level": level, "baseline": baseline,
            "reference": reference, "variants": variants, "equal_bytes": equal, "rare": rare_summary,
            "headline": headline_checks(variants, baseline)}


def _final_rare(run: Mapping[str, Any]) -> float | None:
    """The accuracy of a run's clients holding a rare modality after its last round; None for a run
    saved without it, or whose fleet has no rare modality."""
    return run["rounds"][-1].get("rare_accuracy") if run["rounds"] else None


def _fitting(rounds: Sequence[Mapping[str, Any]], budget: float) -> Iterable[Mapping[str, Any]]:
    cumulative = 0
    for r in rounds:
        cumulative += int(r["upload_bytes"])
        if cumulative > budget:
            return
        yield r


def headline_checks(variants: Mapping[str, Any], baseline: str = "all",
                    claims: Sequence[tuple[str, float]] = (("fedmfs", 0.1), ("fedmfs-int8", 0.05)),
                    points: float = 1.0) -> list[dict[str, Any]]:
    """The project's targets: each (variant, byte ratio) of ``claims`` is within ``points`` accuracy
    points of ``baseline`` at no more than that share of its bytes. ``met`` judges the mean paired
    difference; ``met_ci`` asks the interval's lower end to be within the points too (NaN CI: False)."""
    out = []
    for name, ratio in claims:
        if name not in variants or baseline not in variants:
            continue
        v = variants[name]
        d = v["diff_vs_baseline"]
        low = d["mean"] - d["ci"]
        bytes_ok = bool(v["bytes_ratio"] <= ratio)
        out.append({"variant": name, "max_ratio": ratio, "points": points, "bytes_ratio": v["bytes_ratio"],
                    "diff": d, "bytes_ok": bytes_ok,
                    "met": bytes_ok and bool(d["mean"] >= -points / 100),
                    "met_ci": bytes_ok and bool(math.isfinite(low) and low >= -points / 100)})
    return out


def _pm(e: Mapping[str, Any] | None, scale: float = 100.0, fmt: str = "{:.2f}", sign: bool = False) -> str:
    if e is None or not math.isfinite(e["mean"]):
        return "n/a"
    f = ("{:+" + fmt[2:]) if sign else fmt
    m = f.format(e["mean"] * scale)
    return m if not math.isfinite(e["ci"]) else f"{m} ± {fmt.format(e['ci'] * scale)}"


def _rare_line(rare: Mapping[str, Any]) -> str:
    """What the ``rare acc %`` column is, or why it is n/a."""
    without = f"; {rare['runs_without']} runs saved without it count as n/a" if rare["runs_without"] else ""
    if rare["modalities"]:
        return (f"rare acc %: mean accuracy of the clients holding a rare modality ({', '.join(rare['modalities'])}: "
                f"some clients lack it, at most {RARE_SHARE:.0%} hold it){without}")
    if rare["runs_without"]:
        return f"rare acc %: n/a: {rare['runs_without']} runs were saved without the rare-modality accuracy"
    return f"rare acc %: n/a: no modality is rare in these fleets (every client holds it, or more than {RARE_SHARE:.0%} do)"


def _skipped_per_round(run: Mapping[str, Any]) -> float:
    return sum(sum(r["skipped"].values()) for r in run["rounds"]) / max(1, len(run["rounds"]))


def _noise_share(run: Mapping[str, Any]) -> float | None:
    """Uploads of pure-noise modalities (the synthetic presets name them ``noise<width>``) over all
    uploads of a run; None for a run saved without per-round uploads, or one that uploaded nothing."""
    if not all("uploaded" in r for r in run["rounds"]):
        return None
    total = sum(sum(r["uploaded"].values()) for r in run["rounds"])
    noise = sum(n for r in run["rounds"] for m, n in r["uploaded"].items() if m.startswith("noise"))
    return noise / total if total else None


def format_summary(s: Mapping[str, Any]) -> str:
    """The summary as the plain-text tables the command prints (accuracies in %, ± = CI half width)."""
    pct = f"{s['level'] * 100:g}%"
    lines = [f"seeds {s['seeds']}, rounds {s['rounds']}, split {'/'.join(s['splits'])}; "
             f"mean ± {pct} CI half width (Student t) over seeds; differences paired by seed",
             "", "At equal rounds (final round):",
             f"{'variant':22s} {'final acc %':>16s} {'rare acc %':>16s} {'upload MB':>18s} "
             f"{'bytes/' + s['baseline']:>10s} {'acc - ' + s['baseline'] + ' (points)':>22s} {'n':>3s} {'s/run':>7s}"]
    for name, v in s["variants"].items():
        lines.append(f"{name:22s} {_pm(v['final_accuracy']):>16s} {_pm(v.get('rare_accuracy')):>16s} "
                     f"{_pm(v['total_mb'], 1.0, '{:.3f}'):>18s} "
                     f"{v['bytes_ratio']:10.4f} {_pm(v['diff_vs_baseline'], sign=True):>22s} "
                     f"{v['final_accuracy']['n']:3d} {v['seconds']:7.1f}")
    extra = [(n, v) for n, v in s["variants"].items() if v.get("noise_upload_share", {}).get("n")
             or v.get("cpu_per_round", {}).get("n")]
    if extra:
        lines += ["", "What went up and what it cost (noise: uploads of modalities named noise<w>, of all uploads; "
                      "CPU: the run's process, per round; skipped: idle modality trainings per round)",
                  f"{'variant':22s} {'noise uploads %':>16s} {'CPU s/round':>14s} {'skipped/round':>14s}"]
        for name, v in extra:
            lines.append(f"{name:22s} {_pm(v.get('noise_upload_share')):>16s} "
                         f"{_pm(v.get('cpu_per_round'), 1.0, '{:.2f}'):>14s} "
                         f"{_pm(v.get('skipped_per_round'), 1.0, '{:.1f}'):>14s}")
    rare = s.get("rare") or {"modalities": [], "runs_without": 0, "diff": {}}
    lines += ["", _rare_line(rare)]
    for o, d in rare["diff"].items():
        lines.append(f"  {s['reference']} - {o} (rare-modality clients): {_pm(d, sign=True)} points (n = {d['n']})")
    for e in s["equal_bytes"]:
        lines += ["", f"At equal cumulative upload: {e['budget_bytes'] / 1e6:.3f} MB "
                      "(accuracy of the last round that fits; n/a: not even round 0 fits)",
                  f"{'variant':22s} {'accuracy %':>16s} {'rare acc %':>16s} {'rounds used':>11s} {'n':>3s}"]
        rare_acc = e.get("rare_accuracy", {})
        for name, a in e["accuracy"].items():
            lines.append(f"{name:22s} {_pm(a):>16s} {_pm(rare_acc.get(name)):>16s} "
                         f"{e['rounds_used'][name]:11.1f} {a['n']:3d}")
        for o, d in e["diff"].items():
            lines.append(f"  {s['reference']} - {o}: {_pm(d, sign=True)} points (n = {d['n']})")
        for o, d in e.get("rare_diff", {}).items():
            lines.append(f"  {s['reference']} - {o} (rare-modality clients): {_pm(d, sign=True)} points "
                         f"(n = {d['n']})")
    if s["headline"]:
        lines += ["", "Targets:"]
        for h in s["headline"]:
            lines.append(
                f"  {h['variant']} within {h['points']:g} point of {s['baseline']} at <= 1/{1 / h['max_ratio']:g} "
                f"of its bytes: byte ratio {h['bytes_ratio']:.4f} ({'ok' if h['bytes_ok'] else 'NOT ok'}), "
                f"accuracy difference {_pm(h['diff'], sign=True)} points: "
                f"{'met' if h['met'] else 'NOT met'} on the mean, "
                f"{'met' if h['met_ci'] else 'NOT met'} by the CI's lower end")
    return "\n".join(lines)


def client_ranking(scores: Mapping[str, float], noise: set[str] | frozenset[str],
                   truth: Mapping[str, float]) -> tuple[bool | None, str | None, float | None]:
    """One client's scores against the truth: (every noise modality below every informative one, or
    None without both kinds; the missing pair as text, or None; Spearman over the modalities the truth
    lists, its ties averaged, or None for fewer than three)."""
    from scipy.stats import spearmanr

    inf = [m for m in scores if m not in noise]
    nz = [m for m in scores if m in noise]
    ok, miss = None, None
    if inf and nz:
        top, low = max(nz, key=scores.__getitem__), min(inf, key=scores.__getitem__)
        ok = scores[top] < scores[low]
        if not ok:
            miss = f"{top} {scores[top]:+.3g} >= {low} {scores[low]:+.3g}"
    ms = [m for m in truth if m in scores]
    rho = float(spearmanr([scores[m] for m in ms], [truth[m] for m in ms]).statistic) if len(ms) > 2 else None
    return ok, miss, rho


def ranking_checks(runs: Sequence[Mapping[str, Any]], metadata_of: Callable[[int], Mapping[str, Any]],
                   methods: Sequence[str] = ("fedmfs",)) -> dict[str, dict[str, Any]]:
    """How each run's scores after its last round rank the modalities against the preset's truth
    (``metadata_of(seed)``: a fleet's metadata with ``noise_modalities`` and per-client
    ``shapley_truth``), per variant of ``methods``: ``separated`` (share of clients, over seeds, whose
    every noise modality scores below every informative one), ``spearman`` (mean per client, all its
    modalities, the truth's ties averaged) and the clients that miss, with the pair that misses."""
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["method"] not in methods or not r.get("last_shapley"):
            continue
        meta = metadata_of(int(r["seed"]))
        truth, noise = meta.get("shapley_truth"), set(meta.get("noise_modalities", ()))
        if not truth or not noise:
            continue
        row = out.setdefault(r["variant"], {"separated": [], "spearman": [], "misses": []})
        for client, scores in r["last_shapley"].items():
            ok, miss, rho = client_ranking(scores, noise, truth[client])
            if ok is None:
                continue
            row["separated"].append(ok)
            if miss:
                row["misses"].append(f"seed {r['seed']} {client}: {miss}")
            if rho is not None:
                row["spearman"].append(rho)
    return {v: {"separated": float(np.mean(x["separated"])), "spearman": _est(x["spearman"], 0.95),
                "clients": len(x["separated"]), "misses": x["misses"]} for v, x in out.items()}


# ------------------------------------------------------------------------------------ the plot

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has at most the bytes (x) and at least the
    accuracy (y) with one of them strictly better. In increasing x; NaN points are never on it."""
    ok = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    ok.sort(key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = -math.inf
    for i in ok:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


_FAMILY_COLOURS = {"method": "tab:blue", "gamma": "tab:orange", "codec": "tab:green", "alpha": "tab:purple",
                   "cap": "tab:red", "priority": "tab:brown", "evidence": "tab:olive",
                   "compute": "tab:cyan"}


def pareto_plot(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Final accuracy (%) against mean cumulative upload (MB, log scale) of every variant, error bars
    the confidence intervals of both, each point labelled, the Pareto front drawn as a step line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    vs = [summary["variants"][n] for n in names]
    pts = [(v["total_mb"]["mean"], v["final_accuracy"]["mean"] * 100) for v in vs]
    fig, ax = plt.subplots(figsize=(9, 6))
    seen = set()
    for name, v, (x, y) in zip(names, vs, pts):
        if not (math.isfinite(x) and math.isfinite(y) and x > 0):
            continue
        fam = v.get("family", "method")
        xe, ye = v["total_mb"]["ci"], v["final_accuracy"]["ci"] * 100
        # on a log axis an interval reaching 0 MB cannot be drawn: its lower arm stops just above 0
        xerr = [[min(xe, 0.99 * x)], [xe]] if math.isfinite(xe) else None
        ax.errorbar(x, y, xerr=xerr, yerr=ye if math.isfinite(ye) else None,
                    fmt="o", capsize=3, color=_FAMILY_COLOURS.get(fam, "tab:gray"),
                    label=None if fam in seen else fam)
        seen.add(fam)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = [i for i in pareto_front(pts) if pts[i][0] > 0]
    if front:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="black",
                linestyle="--", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative upload over the run (MB, log scale)")
    ax.set_ylabel("final accuracy (%, mean over clients)")
    ax.set_title(f"Accuracy vs communication: seeds {summary['seeds']}, rounds {summary['rounds']}, "
                 f"split {'/'.join(summary['splits'])}; bars: {summary['level'] * 100:g}% CI", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p
