"""The ``fedmfs`` command: ``simulate`` a fleet on one machine, ``compare`` methods over seeds (locally or
on Ray), ``data`` tools, ``methods``."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from fedmfs.core.aggregation import RULES
from fedmfs.core.errors import ConfigError, FedMFSError
from fedmfs.core.selection import SelectionPolicy
from fedmfs.sim.config import SimConfig, all_methods

__all__ = ["main"]

log = logging.getLogger("fedmfs")


def _simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate",
        help="run FedMFS (or a baseline) on a fleet on this machine and write a report",
        description=(
            "Run federated rounds on one machine and write DIR/report.json, PNG plots (accuracy vs "
            "cumulative MB, Shapley per modality per round, uploads per modality) and summary.md. "
            "Data: a synthetic ActionSense-shaped fleet (--preset) or a fleet directory (--data). "
            "Precedence: command line > --config file > defaults."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML file with the same keys as these options (and a [train] table)")
    p.add_argument("--preset", default=None,
                   help="synthetic data preset: small (fast), actionsense (paper size), headroom "
                        "(overlapping and noise modalities, a Shapley ground truth), or a fleet family with "
                        "headroom's sizes and truth: noisy (five noise modalities of 3-256 features), redundant "
                        "(small/large pairs with the same classes), largeweak (the largest modality the "
                        "weakest); docs/data.md [small]")
    p.add_argument("--data", type=Path, default=None, help="a fleet directory (docs/data.md) instead of a preset")
    d, a = SelectionPolicy(), SimConfig()
    p.add_argument("--method", default=None,
                   help=f"{' | '.join(all_methods())} [{d.method}]; see `fedmfs methods`")
    p.add_argument("--rounds", type=int, default=None, help=f"federated rounds [{a.rounds}]")
    p.add_argument("--gamma", type=int, default=None,
                   help=f"modality models each client uploads per round (0 uploads nothing: refused) [{d.gamma}]")
    p.add_argument("--alpha-s", type=float, default=None, help=f"weight of normalised Shapley impact [{d.alphas.s:.3g}]")
    p.add_argument("--alpha-c", type=float, default=None,
                   help=f"weight of (1 - normalised model size) [{d.alphas.c:.3g}]")
    p.add_argument("--alpha-r", type=float, default=None,
                   help=f"weight of recency (rounds since the last upload) [{d.alphas.r:.3g}]")
    p.add_argument("--cap-bytes", type=int, default=None,
                   help="per-device upload cap in bytes per round; selection becomes an exact knapsack; at "
                        "least the smallest model's encoded size, or nothing is uploaded (refused) [no cap]")
    p.add_argument("--cap-rule", default=None,
                   help=f"what a binding cap maximises: impact (Shapley, recency bonus) | priority (0.1.0) [{d.cap_rule}]")
    p.add_argument("--priority", default=None,
                   help=f"the priority's form: evidence (a modality is sent only if its Shapley score is above 0 "
                        f"and at least --evidence times the client's best; then impact, size and recency rank "
                        f"them) | paper (the paper's min-max formula over every modality) [{d.priority}]")
    p.add_argument("--evidence", type=float, default=None,
                   help=f"with --priority evidence: the share of the client's best score a modality needs to be "
                        f"sent, in [0, 1] [{d.evidence:g}]")
    p.add_argument("--upload-seconds", type=float, default=None,
                   help="dynamic bandwidth: the seconds a round's uploads may take; a device caps its round at "
                        "its measured link rate x this (and at --cap-bytes) [no time budget]")
    p.add_argument("--codec", default=None, help=f"encoding of the uploaded weights: fp32 | fp16 | int8 [{d.codec}]")
    p.add_argument("--seed", type=int, default=None, help=f"seed of data, initial models and training [{a.seed}]")
    p.add_argument("--aggregation", default=None,
                   help=f"per-modality rule on the coordinator: {' | '.join(RULES)} [{a.aggregation}]")
    p.add_argument("--transport", default=None, choices=["inproc", "mqtt"],
                   help="mqtt: the real coordinator and one edge daemon process per client over a broker "
                   "(the bytes in the report are the ones that crossed it); inproc: every client in this "
                   "process, for fast sweeps; both give the same models for the same seed [mqtt; inproc for holistic]")
    p.add_argument("--broker", default=None, help="mqtt://[USER[:PASSWORD]@]HOST:PORT of an external broker (with "
                   "--transport mqtt; it beats FEDMFS_BROKER). A password goes to a mode-600 file in the work "
                   "directory, never into the configs, the command lines or report.json (shown as ***); "
                   "default: an in-process amqtt broker on 127.0.0.1")
    p.add_argument("--per-device", action="store_true",
                   help="with --transport inproc: each device trains its round alone when it asks (the reference "
                        "path) instead of every device's round in the same batched steps (the same models to 1e-5, "
                        "docs/benchmarks.md); set [train] engine = \"reference\" in --config for the per-model "
                        "nn.LSTM loop too")
    p.add_argument("--out", type=Path, default=None, help="output directory [runs/<method>]")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _resolve(args) -> dict:
    from fedmfs.core.config import check_keys, load_toml, train_config_from
    from fedmfs.sim.config import SIM_KEYS

    conf: dict = {}
    train_table: dict = {}
    from_config: frozenset[str] = frozenset()
    if args.config:
        raw = load_toml(args.config)
        train_table = raw.pop("train", {}) if isinstance(raw.get("train", {}), dict) else {}
        check_keys(raw, SIM_KEYS, str(args.config))
        conf.update(raw)
        from_config = frozenset(raw)
    for k in SIM_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            conf[k] = v
    conf.setdefault("preset", "small")
    if "transport" not in conf:
        # a baseline has no modality uploads for the fleet services: it runs in process
        conf["transport"] = "inproc" if conf.get("method") == "holistic" else "mqtt"
    conf["train"] = train_config_from(train_table, f"{args.config} [train]") if train_table else None
    # the keys the file set and no option overrode: a message about one names the file and key
    conf["from_config"] = frozenset(k for k in from_config if getattr(args, k, None) is None)
    return conf


def _origin(args, conf: dict, key: str) -> str:
    """Where a setting came from, for a message: its option, or the config file and key."""
    if key in conf["from_config"]:
        return f"{args.config}: {key}"
    return f"--{key.replace('_', '-')}"


def _fix(args, conf: dict, key: str, value: object) -> str:
    """How to set ``key`` to ``value`` where the user set it."""
    if key in conf["from_config"]:
        return f"{key} = {value} in {args.config}"
    return f"--{key.replace('_', '-')} {value}"


def _check_alphas(args, conf: dict) -> None:
    """Each alpha a finite number >= 0, and not all three 0 (a NaN would reach every priority and the report)."""
    from fedmfs.core.selection import Alphas

    d = Alphas()
    defaults = {"alpha_s": d.s, "alpha_c": d.c, "alpha_r": d.r}
    for k, default in defaults.items():
        v = conf.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise ConfigError(f"{_origin(args, conf, k)} {v}: an alpha is a weight of the priority and must be a "
                              f"finite number >= 0. Fix: e.g. {_fix(args, conf, k, default)} (the default)")
    if all(conf.get(k, default) == 0 for k, default in defaults.items()):
        raise ConfigError(f"{', '.join(_origin(args, conf, k) for k in defaults)}: all three alphas are 0, so "
                          f"the priority is 0 for every modality. Fix: make at least one > 0 (the defaults are "
                          f"{', '.join(_fix(args, conf, k, v) for k, v in defaults.items())})")


def _check_out(args, conf: dict, out: Path) -> None:
    """``out`` is a directory, or can be made one: checked before the run, whose results it receives."""
    where = _origin(args, conf, "out") if "out" in conf else "--out (the default)"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where} {out} is a file, not a directory. Fix: give a directory for the report "
                          f"(created if needed), or move the file away")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{where} {out}: cannot create it, {parent} is a file. Fix: give a directory path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} {out}: {parent} is not writable. Fix: give a directory you may write to")


def _check_uploads(args, conf: dict, cfg: SimConfig, spec) -> None:
    """Refuse the settings under which no client could ever upload (a run that silently trains locally):
    gamma 0 for a method that uploads gamma models, a byte cap below every model's encoded size."""
    from fedmfs.core.selection import METHODS
    from fedmfs.sim.compare import upload_sizes

    if cfg.baseline is None and cfg.method == "local":
        return     # uploads nothing by design
    if cfg.baseline is None and not METHODS[cfg.method].every_modality and cfg.policy.gamma == 0:
        raise ConfigError(f"{_origin(args, conf, 'gamma')} 0: no client would upload anything (gamma is the number "
                          f"of modality models a client uploads per round). Fix: {_fix(args, conf, 'gamma', 1)} "
                          f"or more, or --method local for a run without uploads")
    cap = cfg.policy.cap_bytes
    if cap is None:
        return
    sizes = upload_sizes(cfg, spec)
    name = min(sizes, key=lambda m: sizes[m])
    size, most = sizes[name]
    if cap < size:
        which = "the smallest" if len(sizes) > 1 else "its one model"
        raise ConfigError(f"{_origin(args, conf, 'cap_bytes')} {cap} is smaller than every model a client can "
                          f"upload: {which}, {name}, is {size} bytes with codec {cfg.policy.codec} (up to {most} "
                          f"with its round and sample count in the header), so nothing would be uploaded. "
                          f"Fix: {_fix(args, conf, 'cap_bytes', most)} or more, or no cap")


def cmd_simulate(args) -> int:
    from fedmfs.core import data
    from fedmfs.core.data.format import read_fleet_spec
    from fedmfs.core.data.synthetic import PRESETS
    from fedmfs.core.selection import Alphas
    from fedmfs.sim import driver
    from fedmfs.sim.report import write_report

    # every check of the options and the data before any work: a refusal is one line, not a lost run
    conf = _resolve(args)
    _check_alphas(args, conf)
    kw = {k: conf[k] for k in ("gamma", "cap_bytes", "codec", "cap_rule", "priority", "evidence", "upload_seconds",
                               "rounds", "seed", "aggregation") if k in conf}
    if any(f"alpha_{x}" in conf for x in "scr"):
        d = Alphas()
        kw["alphas"] = Alphas(conf.get("alpha_s", d.s), conf.get("alpha_c", d.c), conf.get("alpha_r", d.r))
    if conf["train"] is not None:
        kw["train"] = conf["train"]
    cfg = SimConfig.build(conf.get("method"), **kw)
    out = Path(conf.get("out") or f"runs/{cfg.method}")
    _check_out(args, conf, out)
    if conf.get("data"):
        spec = read_fleet_spec(conf["data"])
    elif conf["preset"] in PRESETS:
        spec = PRESETS[conf["preset"]].spec()
    else:
        raise ConfigError(f"{_origin(args, conf, 'preset')} {conf['preset']}: unknown synthetic preset. Fix: one "
                          f"of {', '.join(PRESETS)}, or --data DIR")
    _check_uploads(args, conf, cfg, spec)
    if conf.get("data"):
        fleet = data.load_fleet(conf["data"])
    else:
        fleet = data.make_synthetic(conf["preset"], seed=cfg.seed)
    if args.per_device and conf["transport"] != "inproc":
        raise ConfigError("--per-device is an option of --transport inproc (over MQTT every device is its own "
                          "process and always trains alone)")
    report = driver.run_simulation(fleet, cfg, conf["transport"], conf.get("broker"), progress=not args.quiet,
                                   pooled=not args.per_device)
    path = write_report(report, out, plots=not args.no_plots)
    acc = report["final_accuracy"]
    print(f"final accuracy {'-' if acc is None else f'{acc * 100:.2f}%'}  total upload "
          f"{report['total_upload_bytes'] / 1e6:.3f} MB over {cfg.rounds} rounds  -> {path}")
    return 0


def cmd_methods(args) -> int:
    for k, v in all_methods().items():
        print(f"{k:13s} {v}")
    return 0


# the processed file of the paper (ActionNet's export; the layout mmFedMC's utils_data.py reads)
_ACTIONSENSE_FILE = "data_processed_allStreams_10s_10hz_5subj_ex20-20_allActs.hdf5"
_ACTIONSENSE_HINT = (f"--hdf5 takes the processed ActionSense file ({_ACTIONSENSE_FILE}, the layout in "
                     f"docs/data.md, section ActionSense)")


def _split_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _check_actionsense_file(path: Path, modalities: list[str] | None) -> None:
    """The three ways a user's --hdf5 goes wrong, each with its fix; the loader checks the rest."""
    from fedmfs.core.data.actionsense import STREAMS
    from fedmfs.core.errors import DataError

    if not path.exists():
        raise DataError(f"{path}: no such file. Fix: {_ACTIONSENSE_HINT}; check the path")
    if not path.is_file():
        raise DataError(f"{path} is a directory, not a file. Fix: {_ACTIONSENSE_HINT}; a fleet "
                        f"directory is read by `fedmfs simulate --data DIR`")
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is in the [train] extra
        raise DataError("reading ActionSense needs h5py. Fix: pip install 'fedmfs[train]'") from e
    if not h5py.is_hdf5(path):
        raise DataError(f"{path} is not an HDF5 file (no HDF5 signature). Fix: {_ACTIONSENSE_HINT}")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
    except OSError as e:
        raise DataError(f"{path} is an HDF5 file h5py cannot read ({e}). Fix: check the file is complete "
                        f"(a partial download or copy is truncated)") from e
    wanted = modalities or list(STREAMS)
    unknown = [m for m in wanted if m not in STREAMS]
    if unknown:
        raise ConfigError(f"--modalities: unknown {unknown}; the ActionSense modalities are {', '.join(STREAMS)}")
    lacking = [k for k in ("example_label_indexes", "example_subject_ids") if k not in keys]
    if lacking:
        raise DataError(f"{path}: lacks the dataset(s) {lacking}; it has {keys}. Fix: {_ACTIONSENSE_HINT}: "
                        f"one window per row with example_label_indexes, example_subject_ids and one "
                        f"example_matrices_<device>_<stream> dataset per modality")
    have = [m for m in wanted if STREAMS[m] in keys]
    if len(have) == len(wanted) or (not have and "example_matrices" in keys):
        return  # per-stream datasets, or ActionNet's single concatenated example_matrices
    missing = [STREAMS[m] for m in wanted if STREAMS[m] not in keys]
    fix = (f"read the streams it has with --modalities {','.join(have)}, or use a file with every stream"
           if have else f"{_ACTIONSENSE_HINT}")
    raise DataError(f"{path}: lacks the stream dataset(s) {missing}; it has {keys}. Fix: {fix}")


def cmd_data(args) -> int:
    from fedmfs.core.data import load_actionsense_hdf5, make_synthetic, save_fleet

    source = args.data_cmd or "synthetic"
    if args.data_cmd is not None and any(v is not None for v in (args.legacy_preset, args.legacy_seed,
                                                                 args.legacy_out)):
        raise ConfigError(f"give --preset/--seed/--out after the source: `fedmfs data {source} ... --out DIR`")
    if source == "synthetic":
        preset = args.preset if args.data_cmd else (args.legacy_preset or "small")
        seed = args.seed if args.data_cmd else (0 if args.legacy_seed is None else args.legacy_seed)
        out = args.out if args.data_cmd else args.legacy_out
        if out is None:
            raise ConfigError("fedmfs data: --out DIR is required (`fedmfs data synthetic --preset small --out DIR`)")
        fleet = make_synthetic(preset, seed=seed)
    else:
        out = args.out
        mods = _split_list(args.modalities)
        _check_actionsense_file(args.hdf5, mods)
        if not 0.0 < args.split < 1.0:
            raise ConfigError(f"--split must be between 0 and 1 (the training share), got {args.split}")
        if args.steps is not None and args.steps < 0:
            raise ConfigError(f"--steps must be >= 0 (0 keeps the file's), got {args.steps}")
        kw: dict = {"split": args.split, "seed": args.seed, "subjects": _split_list(args.subjects)}
        if args.steps is not None:
            kw["steps"] = args.steps or None
        if mods:
            kw["modalities"] = tuple(mods)
        fleet = load_actionsense_hdf5(args.hdf5, **kw)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (it is created if needed)")
    try:
        d = save_fleet(fleet, out)
    except OSError as e:
        raise ConfigError(f"cannot write the fleet to {out}: {e}") from e
    spec = fleet.spec
    print(f"wrote {len(fleet.clients)} clients ({', '.join(c.name for c in fleet.clients)}), "
          f"{len(spec.modalities)} modalities, {spec.num_classes} classes, {spec.steps} steps to {d}")
    for c in fleet.clients:
        lacks = [m for m in spec.names if m not in c.x]
        if lacks:
            print(f"  {c.name}: {len(c)} windows ({c.n_train} train), lacks {', '.join(lacks)}")
    return 0


def _data_parser(sub) -> None:
    import inspect

    from fedmfs.core.data import load_actionsense_hdf5

    loader = inspect.signature(load_actionsense_hdf5).parameters
    d = sub.add_parser(
        "data", help="write a fleet directory (docs/data.md): synthetic, or from the ActionSense HDF5",
        usage="fedmfs data {synthetic,actionsense} [options] --out DIR\n       fedmfs data --preset P [--seed N] --out DIR",
        description=(
            "Write a fleet directory (docs/data.md format) for `fedmfs simulate --data DIR`. Sources: "
            "`synthetic` (a generated ActionSense-shaped fleet) and `actionsense` (the processed "
            "ActionSense HDF5, one client per subject). The older form `fedmfs data --preset P "
            "[--seed N] --out DIR` still writes a synthetic fleet."
        ),
    )
    # the older form, without a source; hidden from --help (the description names it)
    d.add_argument("--preset", dest="legacy_preset", default=None, help=argparse.SUPPRESS)
    d.add_argument("--seed", dest="legacy_seed", type=int, default=None, help=argparse.SUPPRESS)
    d.add_argument("--out", dest="legacy_out", type=Path, default=None, help=argparse.SUPPRESS)
    src = d.add_subparsers(dest="data_cmd", metavar="{synthetic,actionsense}")
    s = src.add_parser("synthetic", help="a synthetic ActionSense-shaped fleet",
                       description="Write a synthetic ActionSense-shaped fleet (docs/data.md, Synthetic fleet).")
    s.add_argument("--preset", default="small",
                   help="small (fast), actionsense (paper size), headroom, or a fleet family: noisy, "
                        "redundant, largeweak (docs/data.md) [small]")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator [0]")
    s.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write (created if needed)")
    a = src.add_parser(
        "actionsense", help="the processed ActionSense HDF5 file, one client per subject",
        description=(f"Turn the processed ActionSense file ({_ACTIONSENSE_FILE}; layout in docs/data.md) "
                     "into a fleet directory: one client per subject, a stratified train/test split per "
                     "client, a subject whose stream is all zeros lacks that modality."),
    )
    a.add_argument("--hdf5", type=Path, required=True, metavar="FILE", help="the processed HDF5 file")
    a.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write (created if needed)")
    a.add_argument("--split", type=float, default=loader["split"].default,
                   help=f"training share of each client's windows, stratified by class [{loader['split'].default}]")
    a.add_argument("--seed", type=int, default=loader["seed"].default,
                   help=f"seed of the split [{loader['seed'].default}]")
    a.add_argument("--steps", type=int, default=None,
                   help=f"resample every window to this many steps; 0 keeps the file's [{loader['steps'].default}]")
    a.add_argument("--subjects", default=None, metavar="S00,S02", help="comma-separated subject ids to keep [every subject]")
    a.add_argument("--modalities", default=None, metavar="M1,M2",
                   help="comma-separated modalities to read (eye,emg_left,emg_right,tactile_left,"
                   "tactile_right,xsens) [all six]")


def _default_preset() -> str:
    from fedmfs.core.data.synthetic import PRESETS

    return "headroom" if "headroom" in PRESETS else "small"


def _compare_parser(sub) -> None:
    from fedmfs.core.data.synthetic import PRESETS
    from fedmfs.sim.compare import REPORTING_SEEDS, SPLITS, TUNING_SEEDS, default_variants

    names = [v.name for v in default_variants()]
    p = sub.add_parser(
        "compare",
        help="FedMFS against every baseline and its own sweeps over seeds, as a paper reports it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Run every (variant, seed) of a comparison grid (one in-process FedMFS round driver each, docs/benchmarks.md)
and print, over the seeds, each variant's final accuracy (mean +- 95% CI, Student t), cumulative upload,
byte ratio and paired difference to `all`; accuracies at equal cumulative upload (the paper's Table II
protocol); the project's targets; with --plot a Pareto plot of accuracy vs MB.

Where the runs go: by default each run is a Ray task of one CPU on a local Ray started on demand
(--workers CPUs, loopback only, stopped at the end); --ray-address HOST:PORT runs them on an existing
cluster (every node needs fedmfs installed; results are written by this process); --serial (or
--workers 1) runs them here one after another, the reference, and needs no Ray. Ray is the `cluster`
extra: pip install 'fedmfs[cluster]'. A run gives the same results wherever it ran.

Results: each run is saved as it finishes to OUT/runs/<variant>.seed<seed>.json, with its settings;
OUT/summary.json (runs and summary) and OUT/summary.txt are written at the end. The same command again
on the same OUT resumes a stopped grid: runs saved with the same settings (preset, clients, rounds,
split, the variant's whole config) are loaded, not rerun. A saved run with other settings is refused
before anything runs (the file and what differs are named): give another --out, or delete the file.

Tuning and reporting never share seeds or windows: choose defaults with --split validation (seeds
100-104), report once with --split test (seeds 0-4).

  fedmfs compare --split validation --rounds 20                    # tuning, local Ray
  fedmfs compare --rounds 20 --plot pareto.png                     # reporting
  fedmfs compare --preset small --rounds 2 --seeds 0 1 --variants fedmfs all --clients 3 --check-serial
  fedmfs compare --load runs/compare/headroom-test-r20 --plot pareto.png   # summary of saved runs""")
    p.add_argument("--preset", default=None, help=f"synthetic preset (default: headroom if defined, else small; "
                                                  f"known now: {', '.join(PRESETS)})")
    p.add_argument("--rounds", type=int, default=20, help="federated rounds of every run [20]")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="test: reporting, on the real test windows; validation: tuning, on held-out training "
                        "windows [test]")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help=f"default: {' '.join(map(str, REPORTING_SEEDS))} with --split test (reporting), "
                        f"{' '.join(map(str, TUNING_SEEDS))} with --split validation (tuning)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="variants to run (default: all of them): " + ", ".join(names))
    p.add_argument("--clients", type=int, default=None, help="keep only the first N clients (smoke runs)")
    p.add_argument("--workers", type=int, default=None,
                   help="CPUs of the local Ray started on demand, one run per CPU; 1 runs the grid in this "
                        "process, as --serial [this machine's CPUs]")
    p.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                   help="run on this existing Ray cluster (the head's address as `ray start --head` prints "
                        "it, or auto) instead of a local Ray; its CPUs decide how many runs at once "
                        "[RAY_ADDRESS if set and neither --serial nor --workers is given, else a local Ray]")
    p.add_argument("--serial", action="store_true",
                   help="run the grid in this process, one run after another (the reference; no Ray needed)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="results directory: a file per run as it finishes, the summary at the end; the same "
                        "command on the same DIR resumes [runs/compare/<preset>-<split>-r<rounds>[-c<clients>]]")
    p.add_argument("--check-serial", action="store_true",
                   help="after the grid, run it again in this process and check every run equals its "
                        "serial twin (every field but the wall clock); exit 1 if one differs")
    p.add_argument("--budgets-mb", type=float, nargs="+", default=None,
                   help="equal-bytes budgets in MB (default: FedMFS's largest total upload over the seeds, and "
                        "half of it)")
    p.add_argument("--json", type=Path, help="also write the runs and the summary to this file")
    p.add_argument("--plot", type=Path, help="write the Pareto plot (accuracy vs cumulative MB) here")
    p.add_argument("--load", type=Path, nargs="+", metavar="PATH",
                   help="summarise saved runs instead of running: results directories (--out) or --json files "
                        "(several: their runs together; they must share preset, rounds and split, and a "
                        "(variant, seed) may appear once)")


def _print_run(row: dict, note: str = "") -> None:
    acc = row["final_accuracy"]
    print(f"  {row['variant']:22s} seed {row['seed']:4d}  final accuracy "
          f"{'-' if acc is None else f'{acc * 100:6.2f}%'}  upload {row['total_upload_bytes'] / 1e6:8.3f} MB"
          f"  {row['seconds']:6.1f} s{note}", flush=True)


def cmd_compare(args) -> int:
    import json
    import time

    from fedmfs.core.data.synthetic import PRESETS
    from fedmfs.core.fsio import atomic_write
    from fedmfs.sim.compare import (
        REPORTING_SEEDS,
        TUNING_SEEDS,
        SyntheticFleet,
        default_variants,
        format_summary,
        load_runs,
        pareto_plot,
        ranking_checks,
        run_grid,
        summarize,
    )
    from fedmfs.sim.grid import result_differences

    meta: dict = {}
    out: Path | None = None
    if args.load:
        if args.check_serial or args.ray_address or args.serial or args.workers is not None:
            raise ConfigError("--load summarises saved runs: it runs nothing, so it takes no --serial, --workers, "
                              "--ray-address or --check-serial")
        runs, meta = load_runs(args.load)
    else:
        variants = default_variants()
        names = [v.name for v in variants]
        chosen = variants
        if args.variants:
            unknown = [n for n in args.variants if n not in names]
            if unknown:
                raise ConfigError(f"--variants: unknown {unknown}; known: {', '.join(names)}")
            chosen = [v for v in variants if v.name in args.variants]
        preset = args.preset or _default_preset()
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset}: unknown synthetic preset. Fix: one of {', '.join(PRESETS)}")
        if args.rounds < 1:
            raise ConfigError(f"--rounds {args.rounds}: a run has at least 1 round")
        if args.clients is not None and args.clients < 1:
            raise ConfigError(f"--clients {args.clients}: keep at least 1 client")
        serial = args.serial or args.workers == 1
        # command line > RAY_ADDRESS (Ray's own variable, set on a cluster's machines) > a local Ray
        if args.ray_address is None and not serial and args.workers is None and os.environ.get("RAY_ADDRESS"):
            args.ray_address = os.environ["RAY_ADDRESS"]
        if args.ray_address and (serial or args.workers is not None):
            raise ConfigError("--ray-address runs the grid on that cluster (its CPUs decide how many runs at "
                              "once): give it without --serial or --workers")
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers {args.workers}: at least 1 (1 runs the grid in this process)")
        if args.check_serial and serial:
            raise ConfigError("--check-serial compares the Ray runs with serial ones: give it without --serial "
                              "or --workers 1")
        workers = 1 if serial else (args.workers or os.cpu_count() or 1)
        seeds = args.seeds or list(REPORTING_SEEDS if args.split == "test" else TUNING_SEEDS)
        if args.split == "test" and set(seeds) & set(TUNING_SEEDS):
            print(f"warning: reporting on tuning seeds {sorted(set(seeds) & set(TUNING_SEEDS))}", file=sys.stderr)
        if args.split == "validation" and set(seeds) & set(REPORTING_SEEDS):
            print(f"warning: tuning on reporting seeds {sorted(set(seeds) & set(REPORTING_SEEDS))}", file=sys.stderr)
        out = args.out or Path("runs/compare") / (f"{preset}-{args.split}-r{args.rounds}"
                                                  + (f"-c{args.clients}" if args.clients else ""))
        where = ("in this process" if serial else f"on the Ray cluster at {args.ray_address}" if args.ray_address
                 else f"on a local Ray of {workers} CPUs")
        meta = {"preset": preset, "rounds": args.rounds, "split": args.split, "seeds": seeds,
                "variants": [v.name for v in chosen], "clients": args.clients,
                "runner": "serial" if serial else ("ray " + args.ray_address if args.ray_address else
                                                   f"local ray, {workers} workers")}
        print(f"preset {preset}, rounds {args.rounds}, split {args.split}, seeds {seeds}, "
              f"{len(chosen)} variants x {len(seeds)} seeds, {where}; results in {out}", flush=True)

        def on_resume(rows: list[dict]) -> None:
            print(f"  resuming: {len(rows)} of {len(chosen) * len(seeds)} runs already saved in {out} "
                  f"with these settings", flush=True)

        fleet = SyntheticFleet(preset, args.clients)
        t0 = time.monotonic()
        try:
            runs = run_grid(fleet, chosen, seeds, args.rounds, args.split, workers=workers,
                            ray_address=args.ray_address, out=out, on_run=_print_run, on_resume=on_resume)
        except KeyboardInterrupt:
            saved = len(list((out / "runs").glob("*.json"))) if (out / "runs").is_dir() else 0
            print(f"\nstopped: {saved} runs saved in {out / 'runs'}; the same command resumes the grid",
                  file=sys.stderr)
            return 130
        grid_s = time.monotonic() - t0
        if args.check_serial:
            print("\nthe same grid in this process, one run after another (--check-serial):", flush=True)
            t0 = time.monotonic()
            serial_runs = run_grid(fleet, chosen, seeds, args.rounds, args.split, workers=1,
                                   on_run=lambda r: _print_run(r, "  (serial)"))
            serial_s = time.monotonic() - t0
            diffs = result_differences(runs, serial_runs)
            same = len(runs) - len({d.split(":")[0] for d in diffs})
            new = sum(1 for r in runs if r.get("ran_on") != "this process")
            print(f"\nserial check: {same} of {len(runs)} runs equal their serial run in every field but the wall "
                  f"clock (accuracies, per-round rows, bytes, config, Shapley scores); {len(diffs)} differences")
            for d in diffs:
                print(f"  {d}")
            print(f"wall clock: grid {where} {grid_s:.1f} s for {new} runs (the other {len(runs) - new} loaded), "
                  f"serial {serial_s:.1f} s for {len(runs)}: ratio serial/grid {serial_s / max(grid_s, 1e-9):.2f}")
            if diffs:
                return 1
    budgets = None if args.budgets_mb is None else [b * 1e6 for b in args.budgets_mb]
    summary = summarize(runs, budgets=budgets)
    if meta:
        print(f"\npreset {meta.get('preset')}, clients {meta.get('clients') or 'all'}")
    print(format_summary(summary))
    preset = meta.get("preset")
    if preset in PRESETS and PRESETS[preset].noise_widths:
        # the default runs' scores against the preset's Shapley truth (noise modalities last?)
        from fedmfs.core.data.synthetic import make_synthetic

        cache: dict[int, dict] = {}

        def metadata_of(seed: int) -> dict:
            if seed not in cache:
                cache[seed] = make_synthetic(preset, seed).metadata
            return cache[seed]

        ranks = ranking_checks(runs, metadata_of)
        summary["ranking"] = ranks
        print("\nModality scores after the last round against the preset's Shapley truth:")
        for name, rk in ranks.items():
            sp = rk["spearman"]
            print(f"  {name:22s} noise below every informative modality at {rk['separated'] * 100:.0f}% of "
                  f"{rk['clients']} client runs; Spearman {sp['mean']:+.3f} ± {sp['ci']:.3f}")
            for miss in rk["misses"]:
                print(f"    miss: {miss}")
    doc = (json.dumps({"args": meta, "runs": runs, "summary": summary}, indent=1) + "\n").encode()
    if out is not None:
        atomic_write(out / "summary.json", doc, mode=0o644)
        atomic_write(out / "summary.txt", (format_summary(summary) + "\n").encode(), mode=0o644)
        print(f"summary: {out / 'summary.json'}")
    if args.json:
        atomic_write(args.json, doc, mode=0o644)
    if args.plot:
        print(f"plot: {pareto_plot(summary, args.plot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedmfs",
        description="Federated multimodal learning with selective modality communication (FedMFS).",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _simulate_parser(sub)
    m = sub.add_parser("methods", help="list the selection methods and baselines")
    m.set_defaults()
    _data_parser(sub)
    _compare_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"simulate": cmd_simulate, "methods": cmd_methods, "data": cmd_data,
                "compare": cmd_compare}[args.cmd](args)
    except FedMFSError as e:
        print(f"fedmfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:  # bad values from configs / options surface as clear errors
        print(f"fedmfs: error: {e}", file=sys.stderr)
        return ConfigError.exit_code


if __name__ == "__main__":
    sys.exit(main())
