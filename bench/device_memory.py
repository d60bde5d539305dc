"""Device memory and CPU benchmark: peak RSS and CPU time per round of a real `fedmfs-edge run`, and of
the inference-only device path, on the synthetic presets.

For each preset it writes a fleet of ONE client (client ``--client`` of the preset's synthetic fleet,
made with ``fedmfs data synthetic``), starts Mosquitto on 127.0.0.1, the real coordinator and one
real ``fedmfs-edge run --exit-when-done`` process for ``--rounds`` rounds (the configs are the ones
``fedmfs simulate`` writes: :func:`fedmfs.sim.processes.write_fleet_configs`), and measures the edge
process:

* peak RSS: VmHWM from /proc/<pid>/status, sampled every 50 ms and read once more by the process
  itself at exit (an ``atexit`` hook of the wrapper that runs ``fedmfs.edge.cli.main``);
* CPU time (user + sys) per round: the process's CPU time when it logs "stage 2 after round r",
  minus the one at round r - 1 (round 1 includes start-up: imports and loading the data);
* RSS between rounds (when Stage #2 of a round is done: what the long-lived daemon holds while idle).

Then, on the personalised model set that run exported, the inference-only device, each a fresh
process in which ``import torch`` fails:

* ``predict``: ``fedmfs-edge predict --config edge.toml --input B.npz``, B = the client's first 50 test
  windows (a batch, as docs/deploy.md advises);
* ``shapley``: load the model set, predict 50 windows and compute exact Shapley values of those 50
  against 50 background windows, the windows spooled on disk as .npy and memory-mapped per modality
  (what bench/onnx_shapley.py measures on random weights: the "85 MB" of docs/benchmarks.md);
* ``predict_file``: ``fedmfs-edge predict`` over the whole client file (for reference: predict reads
  its input whole).

The measured code is a git commit (``--ref``, default HEAD), extracted with ``git archive``: the edge and
inference processes import fedmfs from there (uncommitted work in the tree is not measured; the
coordinator and the bench itself run from the tree). ``--baseline REF`` runs every measurement a second
time with the code of commit REF and prints the ratios new / baseline, measured in the same run.

Rerun (docs/deploy.md, "Memory and disk"):

    nice -n 5 python bench/device_memory.py --preset actionsense --preset headroom --rounds 2 \
        --baseline bddb5ac --out bench/results/device_memory.json

Needs /usr/sbin/mosquitto and the training install. The actionsense fleet takes ~1.8 GB of disk
(``--fleet-cache DIR`` keeps and reuses the generated fleets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import numpy as np
from _trees import TREE_IMPORTS, checkout

HERE = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
TICKS = os.sysconf("SC_CLK_TCK")

# The wrapper every measured process runs: optionally imports fedmfs from another source tree (the
# baseline commit), optionally blocks torch (the inference-only device), runs the given module's
# main(argv) and writes its own VmHWM and CPU time at exit.
WRAPPER = textwrap.dedent("""
    import atexit, importlib.abc, importlib.util, json, os, sys
    tree, out, block_torch, module = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    argv = sys.argv[5:]
""") + TREE_IMPORTS + textwrap.dedent("""
    if block_torch:
        class Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    raise ImportError(f"{name} is blocked: an inference-only device")
                return None

        sys.meta_path.insert(0, Blocker())

    def report():
        st = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status")
              if l.startswith(("VmHWM", "VmRSS"))}
        t = os.times()
        with open(out, "w") as f:
            json.dump({"hwm_kb": st["VmHWM"], "rss_kb": st["VmRSS"], "cpu_s": t.user + t.system,
                       "torch": "torch" in sys.modules,
                       "fedmfs": sys.modules["fedmfs"].__file__ if "fedmfs" in sys.modules else None}, f)

    atexit.register(report)
    if module == "shapley":     # the inference-only Shapley check on spooled, memory-mapped windows
        import numpy as np
        from collections.abc import Mapping
        from fedmfs.core.runtime.modelset import load_model_set

        class Spool(Mapping):
            def __init__(self, d, prefix, names): self.d, self.prefix, self.names = d, prefix, names
            def __getitem__(self, k):
                return np.load(f"{self.d}/{self.prefix}_{k}.npy", mmap_mode="r", allow_pickle=False)
            def __iter__(self): return iter(self.names)
            def __len__(self): return len(self.names)

        rt = load_model_set(argv[0], threads=1)
        names = argv[2].split(",")
        x, bg = Spool(argv[1], "x", names), Spool(argv[1], "bg", names)
        pred = rt.predict(x)
        res = rt.shapley(x, bg)
        print(json.dumps({"scores": [float(s) for s in res.scores], "pred": pred.argmax(-1).tolist()}))
        sys.exit(0)
    import importlib
    sys.exit(importlib.import_module(module).main(argv))
""")


def _status_kb(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            st = {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmHWM", "VmRSS"))}
        return st["VmRSS"], st["VmHWM"]
    except (OSError, KeyError, ValueError):
        return None


def _cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, IndexError, ValueError):
        return None


class Sampler(threading.Thread):
    """Samples a process's RSS, VmHWM and CPU time every ``every`` seconds, and notes the CPU time and
    RSS when its log file gains a line with one of ``marks`` (e.g. "stage 2 after round")."""

    def __init__(self, pid: int, log: Path, marks: tuple[str, ...], every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.log, self.marks, self.every = pid, log, marks, every
        self.hwm_kb = 0
        self.events: list[dict] = []
        self.stop = threading.Event()
        self._pos = 0

    def run(self) -> None:
        while not self.stop.is_set():
            s, cpu = _status_kb(self.pid), _cpu_s(self.pid)
            if s is not None:
                self.hwm_kb = max(self.hwm_kb, s[1])
            self._scan(s, cpu)
            self.stop.wait(self.every)

    def _scan(self, s, cpu) -> None:
        try:
            with open(self.log, "rb") as f:
                f.seek(self._pos)
                chunk = f.read()
        except OSError:
            return
        cut = chunk.rfind(b"\n") + 1
        self._pos += cut
        for line in chunk[:cut].decode(errors="replace").splitlines():
            if any(m in line for m in self.marks):
                self.events.append({"line": line, "cpu_s": cpu, "rss_kb": s[0] if s else None,
                                    "hwm_kb": s[1] if s else None})


def _run_measured(module: str, argv: list[str], log: Path, tree: str, block_torch: bool, timeout: float,
                  marks: tuple[str, ...] = (), stdout=None) -> dict:
    out = log.with_suffix(".exit.json")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("NOTIFY_SOCKET", "FEDMFS_BROKER"):
        env.pop(k, None)
    with open(log, "ab") as lf:
        p = subprocess.Popen([sys.executable, "-c", WRAPPER, tree, str(out), "1" if block_torch else "0", module,
                              *argv], stdout=stdout or lf, stderr=lf, env=env)
        s = Sampler(p.pid, log, marks)
        s.start()
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired as e:
            p.kill()
            p.wait(10)
            raise RuntimeError(f"{module} {' '.join(argv)} did not finish within {timeout:.0f} s; log {log}") from e
        finally:
            s.stop.set()
            s.join(5)
    if rc != 0:
        raise RuntimeError(f"{module} {' '.join(argv)} exited {rc}; log {log}")
    fin = json.loads(out.read_text())
    return {"peak_rss_mib": max(fin["hwm_kb"], s.hwm_kb) / 1024, "cpu_s": fin["cpu_s"], "torch": fin["torch"],
            "fedmfs": fin["fedmfs"], "events": s.events}


def _start_mosquitto(d: Path) -> tuple[subprocess.Popen, int]:
    sys.path.insert(0, str(HERE / "tests"))
    from netutil import free_port, wait_port

    for _ in range(5):
        port = free_port()
        conf = d / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"log_dest file {d / 'mosquitto.log'}\n")
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_port(port, 10):
            return proc, port
        proc.kill()
        proc.wait(5)
    raise RuntimeError("mosquitto did not start")


def _fleet(preset: str, cache: Path, seed: int) -> Path:
    d = cache / f"fleet-{preset}-seed{seed}"
    if not (d / "fleet.json").exists():
        subprocess.run([sys.executable, "-m", "fedmfs.cli", "data", "synthetic", "--preset", preset, "--seed",
                        str(seed), "--out", str(d)], check=True, timeout=1800)
    return d


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def measure(preset: str, fleet_dir: Path, client: int, rounds: int, work: Path, tree: str,
            timeout: float) -> dict:
    """One training device for ``rounds`` rounds over Mosquitto, then the inference-only processes."""
    from fedmfs.core.data.format import Fleet, load_client, read_fleet_spec
    from fedmfs.sim.config import SimConfig
    from fedmfs.sim.processes import write_fleet_configs

    spec = read_fleet_spec(fleet_dir)
    names = json.loads((fleet_dir / "fleet.json").read_text())["clients"]
    data = load_client(fleet_dir / f"{names[client]}.npz", spec, names[client])
    work.mkdir(parents=True, exist_ok=True)
    broker, port = _start_mosquitto(work)
    try:
        files = write_fleet_configs(Fleet(spec, [data]), SimConfig.build("fedmfs", rounds=rounds), work,
                                    f"mqtt://127.0.0.1:{port}", f"bench-{os.getpid()}", protocol="auto")
        _fit_train_table(files["edges"][data.name], tree)
        (work / "logs").mkdir(exist_ok=True)
        coord = subprocess.Popen([sys.executable, "-m", "fedmfs.coordinator.cli", "run", "--config",
                                  str(files["coordinator"]), "--exit-when-done", "--connect-timeout", "60"],
                                 stdout=open(work / "logs" / "coordinator.log", "ab"), stderr=subprocess.STDOUT,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            edge_toml = files["edges"][data.name]
            edge = _run_measured("fedmfs.edge.cli", ["run", "--config", str(edge_toml), "--exit-when-done",
                                                     "--connect-timeout", "60"], work / "logs" / "edge.log", tree,
                                 False, timeout, marks=("stage 2 after round", "trained in"))
            coord.wait(60)
        finally:
            _stop(coord)
    finally:
        _stop(broker)
    ends = [e for e in edge["events"] if "stage 2 after round" in e["line"]]
    if len(ends) != rounds:
        raise RuntimeError(f"saw {len(ends)} round ends in {work / 'logs' / 'edge.log'}, expected {rounds}")
    cpu = [e["cpu_s"] - (ends[i - 1]["cpu_s"] if i else 0.0) for i, e in enumerate(ends)]
    train = {"peak_rss_mib": edge["peak_rss_mib"], "cpu_s_per_round": cpu, "cpu_s_total": edge["cpu_s"],
             "idle_rss_mib": [e["rss_kb"] / 1024 for e in ends], "client_file_mb": (
                 fleet_dir / f"{data.name}.npz").stat().st_size / 1e6,
             "windows": len(data), "log": [e["line"] for e in edge["events"]], "fedmfs": edge["fedmfs"]}

    # inference-only: the personalised model set the run exported, in torch-free processes
    from fedmfs.edge.config import load_edge_config

    model_dir = load_edge_config(edge_toml).state_dir / "model"
    test = np.nonzero(~data.train)[0][:50]
    rest = np.nonzero(data.train)[0][:50]
    batch = work / "batch50.npz"
    np.savez(batch, **{f"x_{m}": data.x[m][test] for m in data.x}, y=data.y[test])
    spool = work / "spool"
    spool.mkdir(exist_ok=True)
    for m in data.x:
        np.save(spool / f"x_{m}.npy", data.x[m][test])
        np.save(spool / f"bg_{m}.npy", data.x[m][rest])
    del data
    inf = {}
    for what, module, argv in (
        ("predict", "fedmfs.edge.cli", ["predict", "--config", str(edge_toml), "--input", str(batch)]),
        ("shapley", "shapley", [str(model_dir), str(spool), ",".join(m for m in spec.names
                                                                     if (spool / f"x_{m}.npy").exists())]),
        ("predict_file", "fedmfs.edge.cli", ["predict", "--config", str(edge_toml), "--input",
                                             str(fleet_dir / f"{names[client]}.npz")]),
    ):
        with open(work / "logs" / f"{what}.out", "wb") as so:
            r = _run_measured(module, argv, work / "logs" / f"{what}.log", tree, True, timeout, stdout=so)
        if r["torch"]:
            raise RuntimeError(f"{what} imported torch")
        inf[what] = {"peak_rss_mib": r["peak_rss_mib"], "cpu_s": r["cpu_s"],
                     "output_sha256": _sha(work / "logs" / f"{what}.out")}
    return {"training": train, "inference": inf, "work": str(work)}


def _fit_train_table(edge_toml: Path, tree: str) -> None:
    """Leave out of edge.toml's [train] the settings the measured code does not know (an older commit:
    bddb5ac has no ``engine`` and refuses the key), when they have their default value (the old code's
    behaviour); a setting set otherwise cannot be measured on that code."""
    from dataclasses import fields

    from fedmfs.core.settings import TrainConfig

    probe = ("import dataclasses, json, sys; sys.path.insert(0, sys.argv[1]); "
             "from fedmfs.core.settings import TrainConfig; "
             "print(json.dumps([f.name for f in dataclasses.fields(TrainConfig)]))")
    known = set(json.loads(subprocess.run([sys.executable, "-c", probe, tree], check=True, capture_output=True,
                                          text=True).stdout))
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    out, section = [], None
    for line in edge_toml.read_text().splitlines():
        if line.startswith("["):
            section = line.strip()
        elif section == "[train]" and "=" in line:
            key, value = (t.strip() for t in line.split("=", 1))
            if key not in known:
                if json.loads(value) != defaults.get(key):
                    raise RuntimeError(f"[train] {key} = {value} is not known to the code measured ({tree})")
                continue
        out.append(line)
    edge_toml.write_text("\n".join(out) + "\n")


def _sha(p: Path) -> str:
    import hashlib
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _fmt(r: dict) -> list[str]:
    t, i = r["training"], r["inference"]
    cpu = ", ".join(f"{c:.1f}" for c in t["cpu_s_per_round"])
    return [f"training peak RSS {t['peak_rss_mib']:.0f} MiB; CPU s per round [{cpu}] (round 1 includes start-up); "
            f"RSS between rounds {', '.join(f'{v:.0f}' for v in t['idle_rss_mib'])} MiB",
            "inference-only (torch blocked): " + "; ".join(f"{k} {v['peak_rss_mib']:.0f} MiB ({v['cpu_s']:.1f} s CPU)"
                                                          for k, v in i.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", help="synthetic preset (repeatable) [actionsense, headroom]")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--client", type=int, default=0, help="index of the client in the preset's fleet [0]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref", default="HEAD", help="the git commit to measure [HEAD]")
    ap.add_argument("--baseline", default=None, help="a git commit to measure too, in the same run")
    ap.add_argument("--fleet-cache", type=Path, default=None, help="keep and reuse the generated fleets here")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds any one process may run")
    a = ap.parse_args()
    presets = a.preset or ["actionsense", "headroom"]
    tmp = Path(tempfile.mkdtemp(prefix="fedmfs-devmem-"))
    cache = a.fleet_cache or tmp
    cache.mkdir(parents=True, exist_ok=True)
    result: dict = {"rounds": a.rounds, "client": a.client, "seed": a.seed, "presets": {}}
    # committed code only (git archive): work in progress in this tree does not leak into the figures
    trees = {"new": (str(tmp / "new"), checkout(a.ref, tmp / "new"))}
    if a.baseline:
        trees["baseline"] = (str(tmp / "baseline"), checkout(a.baseline, tmp / "baseline"))
    result["commits"] = {k: v[1] for k, v in trees.items()}
    try:
        for preset in presets:
            fleet = _fleet(preset, cache, a.seed)
            res = {}
            for label, (tree, sha) in trees.items():
                print(f"{preset}, {label} ({sha[:10]}): {a.rounds} rounds of client {a.client} ...", flush=True)
                res[label] = measure(preset, fleet, a.client, a.rounds, tmp / f"{preset}-{label}", tree, a.timeout)
                for line in _fmt(res[label]):
                    print(f"  {line}", flush=True)
            if "baseline" in res:
                n, b = res["new"], res["baseline"]
                ratios = {"training_peak_rss": n["training"]["peak_rss_mib"] / b["training"]["peak_rss_mib"],
                          "training_cpu_last_round": (n["training"]["cpu_s_per_round"][-1]
                                                      / b["training"]["cpu_s_per_round"][-1]),
                          **{f"{k}_peak_rss": n["inference"][k]["peak_rss_mib"] / b["inference"][k]["peak_rss_mib"]
                             for k in n["inference"]},
                          "same_predictions": all(n["inference"][k]["output_sha256"]
                                                  == b["inference"][k]["output_sha256"] for k in n["inference"])}
                res["ratios_new_over_baseline"] = ratios
                print("  new / baseline: " + ", ".join(f"{k} {v:.3f}" if not isinstance(v, bool) else f"{k} {v}"
                                                       for k, v in ratios.items()), flush=True)
            result["presets"][preset] = res
    finally:
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1) + "\n")
        if a.fleet_cache is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            for t in ("new", "baseline"):
                shutil.rmtree(tmp / t, ignore_errors=True)
    print(f"work directories under {tmp}" if a.fleet_cache else "done")


if __name__ == "__main__":
    main()
