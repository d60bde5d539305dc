"""The run report: ``report.json``, PNG plots and a short markdown summary.

The report of a FedMFS run is built once, by :func:`build_report`, from what the coordinator keeps in
its ledger (rounds, accepted uploads, the devices' reports with their round records, their Stage #2
evaluations, refusals and the global models), whatever the transport that carried it.

Headline fields scripts may rely on: ``rounds[i].accuracy`` (mean test accuracy over clients, 0..1)
and ``rounds[i].upload_bytes`` (bytes uploaded by all clients in round i).

Accuracy by modality set (:func:`modality_groups`, :func:`group_accuracy`): a wrong selection hurts
first the clients of a modality few others hold (its global model is averaged over few uploads), and
the mean over all clients hides them. Clients whose present modalities are the same form one
*modality set*, named by its modalities in spec order joined by ``+`` (``eye+emg_left+...``). A
modality is *rare* when some clients lack it and at most :data:`RARE_SHARE` (two thirds) of the
clients hold it: in the synthetic presets the tactile gloves, held by 5 of the 9 clients. Fields:

* ``modality_groups`` (once): ``rare_share``, ``rare_modalities`` (spec order), ``rare_clients``
  (the clients holding at least one rare modality), ``holders`` (per modality, the clients that have
  it) and ``sets`` (per set name: its ``modalities`` and ``clients``), all in the fleet's order.
* per round: ``modality_set_accuracy`` (set name -> mean accuracy of its clients),
  ``modality_accuracy`` (modality -> mean accuracy of the clients that have it) and
  ``rare_accuracy`` (mean accuracy of ``rare_clients``; None when no modality is rare). Means are
  over the clients that evaluated that round (as ``accuracy``), None when none of the group did.
* ``final_rare_accuracy``: the last round's ``rare_accuracy``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmfs.core.fsio import atomic_write

__all__ = ["RARE_SHARE", "modality_groups", "group_accuracy", "report_envelope", "build_report", "write_report",
           "plot_report", "report_json", "summary_markdown"]

# A modality held by at most this share of the clients (and not by all of them) is rare.
RARE_SHARE = 2 / 3


def modality_groups(clients: Mapping[str, Sequence[str]], names: Sequence[str],
                    rare_share: float = RARE_SHARE) -> dict[str, Any]:
    """The fleet's clients grouped by their present modalities (``clients``: name -> modalities,
    ``names``: the spec's modalities in order): ``rare_share``, ``rare_modalities``, ``rare_clients``,
    ``holders`` and ``sets``, as the module docstring says. A modality is rare when 0 < holders < n
    and holders <= ``rare_share`` * n, n the number of clients: a fleet where every client has every
    modality has none."""
    n = len(clients)
    holders = {m: [c for c, ms in clients.items() if m in ms] for m in names}
    rare = [m for m in names if 0 < len(holders[m]) < n and len(holders[m]) <= rare_share * n]
    sets: dict[str, dict[str, list[str]]] = {}
    for c, ms in clients.items():
        present = [m for m in names if m in ms]
        sets.setdefault("+".join(present), {"modalities": present, "clients": []})["clients"].append(c)
    return {"rare_share": rare_share, "rare_modalities": rare,
            "rare_clients": [c for c, ms in clients.items() if any(m in ms for m in rare)],
            "holders": holders, "sets": sets}


def group_accuracy(groups: Mapping[str, Any], client_accuracy: Mapping[str, float | None]) -> dict[str, Any]:
    """One round's accuracy per group of :func:`modality_groups`: ``modality_set_accuracy``,
    ``modality_accuracy`` and ``rare_accuracy``, each the plain mean over the group's clients that
    have an accuracy that round (None when none has; ``rare_accuracy`` None without rare modalities)."""
    def mean(members: Sequence[str]) -> float | None:
        v = [client_accuracy[c] for c in members if client_accuracy.get(c) is not None]
        return float(np.mean(v)) if v else None

    return {"modality_set_accuracy": {k: mean(s["clients"]) for k, s in groups["sets"].items()},
            "modality_accuracy": {m: mean(cs) for m, cs in groups["holders"].items()},
            "rare_accuracy": mean(groups["rare_clients"]) if groups["rare_modalities"] else None}


def report_envelope(fleet, cfg, rounds: list[dict], digests: dict[str, str], transport: str, **extra) -> dict:
    """The report every transport returns: config, data set, per-round rows (each with its accuracy
    per modality group added), headline totals."""
    groups = modality_groups({c.name: list(c.modalities) for c in fleet.clients}, fleet.spec.names)
    rounds = [{**r, **group_accuracy(groups, r.get("client_accuracy") or {})} for r in rounds]
    return {
        "fedmfs_report": 1,
        "config": cfg.to_dict(),
        "dataset": {
            "spec": fleet.spec.to_dict(),
            "clients": {c.name: {"modalities": list(c.modalities), "train": c.n_train,
                                 "test": int((~c.train).sum())} for c in fleet.clients},
            "metadata": fleet.metadata,
        },
        "modality_groups": groups,
        "rounds": rounds,
        "final_accuracy": rounds[-1]["accuracy"] if rounds else None,
        "final_rare_accuracy": rounds[-1]["rare_accuracy"] if rounds else None,
        "total_upload_bytes": int(sum(r["upload_bytes"] for r in rounds)),
        "global_digests": digests,
        "transport": transport,
        **extra,
    }


def build_report(fleet, cfg, state_dir: str | os.PathLike, transport: str, **extra) -> dict:
    """The report of a run from the coordinator's ledger in ``state_dir``.

    Per round: the mean of the devices' Stage #2 accuracies on that round's globals, the accepted
    uploads (device order, then modality order), each device's :class:`~fedmfs.core.records.RoundRecord`
    as its report carried it (with what was accepted), refusals, and the bytes on the wire."""
    from fedmfs.coordinator.ledger import Ledger
    from fedmfs.core.payload import decode_model, state_digest
    from fedmfs.core.wire import decode_global

    led = Ledger(state_dir, readonly=True)
    try:
        rounds_rows, uploads, reports = led.rounds(), led.uploads(), led.reports()
        evaluations, refusals = led.evaluations(), led.refusals()
        digests = {}
        for g in led.latest_globals():
            _, payload = decode_global(led.global_frame(g), None)
            digests[g["modality"]] = state_digest(decode_model(payload)[1])
    finally:
        led.close()
    names = fleet.spec.names
    order = {c.name: i for i, c in enumerate(fleet.clients)}
    versions = dict.fromkeys(names, 0)
    cumulative = wire_total = 0
    rounds = []
    for rr in rounds_rows:
        r = rr.round
        ups = sorted((u for u in uploads if u["round"] == r),
                     key=lambda u: (order.get(u["device"], len(order)), names.index(u["modality"])))
        for m in rr.aggregated:
            versions[m] += 1
        accs = {e.device: e.accuracy for e in sorted(evaluations, key=lambda e: order.get(e.device, 0))
                if e.round == r}
        reps = sorted((x for x in reports if x.round == r), key=lambda x: order.get(x.device, len(order)))
        nbytes = sum(u["nbytes"] for u in ups)
        cumulative += nbytes
        wire = sum(x.wire_bytes for x in reps)
        wire_total += wire
        rounds.append({
            "round": r,
            "accuracy": float(np.mean(list(accs.values()))) if accs else None,
            "client_accuracy": accs,
            "uploads": [{"device": u["device"], "modality": u["modality"], "bytes": u["nbytes"]} for u in ups],
            "upload_bytes": nbytes,
            "cumulative_bytes": cumulative,
            "aggregated": dict(rr.aggregated),
            "clients": {x.device: {**x.record.to_dict(), "accepted": list(x.accepted)} for x in reps},
            "global_versions": dict(versions),
            "seconds": (rr.closed_at - rr.opened_at) if rr.closed_at else None,
            "wire_bytes": wire,
            "refusals": [x for x in refusals if x["round"] == r],
        })
    total = int(sum(r["upload_bytes"] for r in rounds))
    return report_envelope(fleet, cfg, rounds, digests, transport, wire_bytes=wire_total,
                           wire_over_payload=(wire_total / total) if total else None, **extra)


def write_report(report: dict, out: str | os.PathLike, plots: bool = True) -> Path:
    """Write ``DIR/report.json`` (with the names of the plots), the PNG plots and ``summary.md``."""
    from fedmfs.adapters.mqtt import redact_url

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = plot_report(report, d)
    on_disk = report
    if isinstance(report.get("broker"), str):     # a broker URL is shown, its password never
        on_disk = {**report, "broker": redact_url(report["broker"])}
    atomic_write(d / "report.json", report_json(on_disk).encode())
    atomic_write(d / "summary.md", summary_markdown(report).encode())
    return d / "report.json"


def _strict(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def report_json(report: dict) -> str:
    """The report as strict JSON (RFC 8259): Python's json writes NaN and Infinity by default, which
    other JSON readers refuse, so a non-finite number (an unevaluated round's mean, a fleet's metadata)
    is written as null, and ``allow_nan=False`` makes any that slipped through an error, not a file."""
    return json.dumps(_strict(report), indent=1, sort_keys=False, allow_nan=False)


def _modalities(report: dict) -> list[str]:
    return [m["name"] for m in report["dataset"]["spec"]["modalities"]]


def plot_report(report: dict, d: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    mods = _modalities(report)
    files = []
    cum = np.array([r["cumulative_bytes"] for r in rounds]) / 1e6
    acc = np.array([np.nan if r["accuracy"] is None else r["accuracy"] for r in rounds], dtype=float) * 100
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(cum, acc, marker="o", label=report["config"]["method"])
    ax.set_xlabel("cumulative upload (MB)")
    ax.set_ylabel("mean test accuracy over clients (%)")
    ax.set_title("Accuracy vs communication")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(d / "accuracy_vs_mb.png", dpi=110)
    plt.close(fig)
    files.append("accuracy_vs_mb.png")

    if any(r["clients"] for r in rounds):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in mods:
            vals = []
            for r in rounds:
                v = [c["shapley"][m] for c in r["clients"].values() if m in c["shapley"]]
                vals.append(np.mean(v) if v else np.nan)
            ax.plot(range(len(rounds)), vals, marker=".", label=m)
        ax.set_xlabel("round")
        ax.set_ylabel("mean |Shapley| over clients")
        ax.set_title("Modality impact per round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(d / "shapley_per_round.png", dpi=110)
        plt.close(fig)
        files.append("shapley_per_round.png")

    counts = {m: 0 for m in mods}
    for r in rounds:
        for u in r["uploads"]:
            counts[u["modality"]] = counts.get(u["modality"], 0) + 1
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(list(counts), list(counts.values()), color="tab:blue")
    ax.set_ylabel("uploads over the run")
    ax.set_title("Uploads per modality")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(d / "uploads_per_modality.png", dpi=110)
    plt.close(fig)
    files.append("uploads_per_modality.png")
    return files


def _pct(accuracy: float | None) -> str:
    """A percentage, or a dash for a round no device evaluated."""
    return "-" if accuracy is None else f"{accuracy * 100:.2f}%"


def _modality_set_table(report: dict) -> list[str]:
    """The final round's accuracy per modality set, per modality and of the rare modalities' clients
    (recomputed from ``dataset.clients`` for a report written before these fields)."""
    groups = report.get("modality_groups") or modality_groups(
        {c: d["modalities"] for c, d in report["dataset"]["clients"].items()}, _modalities(report))
    last = report["rounds"][-1]
    acc = group_accuracy(groups, last.get("client_accuracy") or {})
    rare = groups["rare_modalities"]
    share = f"{groups['rare_share']:.0%}"
    lines = ["", f"Final round ({last['round']}) by modality set (rare: a modality some clients lack and at most "
                 f"{share} of them hold: {', '.join(rare) if rare else 'none'}):", "",
             "| modality set | clients | has a rare modality | accuracy |", "|---|---|---|---|"]
    for name, g in groups["sets"].items():
        flag = "yes" if any(m in rare for m in g["modalities"]) else "no"
        lines.append(f"| {name} | {', '.join(g['clients'])} | {flag} | {_pct(acc['modality_set_accuracy'][name])} |")
    lines.append("")
    if rare:
        lines.append(f"- clients holding a rare modality ({', '.join(groups['rare_clients'])}): "
                     f"**{_pct(acc['rare_accuracy'])}** (all clients: {_pct(last['accuracy'])})")
    lines.append("- per modality, the clients that have it: "
                 + ", ".join(f"{m} {_pct(a)}" for m, a in acc["modality_accuracy"].items()))
    return lines


def summary_markdown(report: dict) -> str:
    cfg = report["config"]
    rounds = report["rounds"]
    lines = [
        f"# fedmfs run: {cfg['method']}",
        "",
        f"- rounds: {cfg['rounds']}, gamma: {cfg['gamma']}, alphas: {cfg['alphas']}, cap: {cfg['cap_bytes']}, "
        f"seed: {cfg['seed']}, transport: {report.get('transport', 'inproc')}",
        f"- clients: {len(report['dataset']['clients'])}, modalities: {', '.join(_modalities(report))}",
        f"- final mean accuracy: **{_pct(report['final_accuracy'])}**",
        f"- total upload: **{report['total_upload_bytes'] / 1e6:.3f} MB** "
        f"({report['total_upload_bytes'] / max(1, len(rounds)) / 1e6:.3f} MB per round)",
        "",
        "| round | accuracy | upload MB | cumulative MB |",
        "|---|---|---|---|",
    ]
    for r in rounds:
        lines.append(f"| {r['round']} | {_pct(r['accuracy'])} | {r['upload_bytes'] / 1e6:.4f} | "
                     f"{r['cumulative_bytes'] / 1e6:.4f} |")
    if rounds:
        lines += _modality_set_table(report)
    counts: dict[str, int] = {}
    for r in rounds:
        for u in r["uploads"]:
            counts[u["modality"]] = counts.get(u["modality"], 0) + 1
    lines += ["", "Uploads per modality: " + ", ".join(f"{m} {n}" for m, n in sorted(counts.items())), ""]
    for p in report.get("plots", []):
        lines.append(f"![{p}]({p})")
    return "\n".join(lines) + "\n"
