"""The numbers of the device path at full precision, and their comparison between two machines
(.ci/arm_smoke.sh: the aarch64 root under emulation against the x86 device environment).

    python arm_compare.py dump MODEL_DIR WINDOWS_NPZ > OUT.json
        (inside a device environment: numpy + onnxruntime, no torch) the class probabilities of
        the personalised model as `fedmfs-edge predict` computes them (`EdgeRuntime.predict`), the
        same through the per-modality graphs and the fusion graph, and the Shapley scores of
        .ci/device_check.py, as JSON with every float at full precision.

    python arm_compare.py compare X86_DUMP ARM_DUMP X86_PREDICT_JSON ARM_PREDICT_JSON X86_PRED_TXT [--tol 1e-5]
        (anywhere with numpy) fails unless every number of ARM_DUMP is within TOL of X86_DUMP, the two
        `fedmfs-edge predict --json` outputs agree (their probabilities are rounded to 6 decimals:
        within TOL + 1e-6) with the same labels, and the labels agree with the x86 `predict` text
        output (X86_PRED_TXT: index, label, probability to 4 decimals). Prints the largest
        differences.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def dump(model_dir: str, windows: str) -> None:
    if "torch" in sys.modules:
        raise SystemExit("torch is loaded: this must run in the device environment")
    from fedmfs.core.runtime.modelset import load_model_set

    rt = load_model_set(model_dir)
    with np.load(windows, allow_pickle=False) as z:
        x = {k[2:]: z[k] for k in z.files if k.startswith("x_") and k[2:] in rt.modalities}
        y = z["y"]
    probs = rt.predict(x)                        # what `fedmfs-edge predict` prints
    per_modality = rt.fuse(*rt.modality_probs(x))  # the other path: modality graphs, then fusion
    xs = {k: v[:8] for k, v in x.items()}        # .ci/device_check.py's Shapley call
    res = rt.shapley(xs, xs, kind="loglik", y=y[:8])
    out = {
        "modalities": list(rt.spec.names),
        "probabilities": np.asarray(probs, np.float64).tolist(),
        "per_modality_probabilities": np.asarray(per_modality, np.float64).tolist(),
        "shapley": np.asarray(res.scores, np.float64).tolist(),
    }
    assert "torch" not in sys.modules
    json.dump(out, sys.stdout)
    print()


def _maxdiff(a, b, what: str) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise SystemExit(f"{what}: shapes differ, x86 {a.shape} vs aarch64 {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise SystemExit(f"{what}: not all finite")
    return float(np.abs(a - b).max()) if a.size else 0.0


def compare(a: argparse.Namespace) -> int:
    with open(a.x86_dump) as f:
        x86 = json.load(f)
    with open(a.arm_dump) as f:
        arm = json.load(f)
    with open(a.x86_predict) as f:
        x86_cli = json.load(f)
    with open(a.arm_predict) as f:
        arm_cli = json.load(f)
    tol, failed = a.tol, []

    def check(name: str, d: float, limit: float) -> None:
        ok = d <= limit
        print(f"  {name:<44} max |aarch64 - x86| = {d:.3e}  ({'ok' if ok else 'OVER'} <= {limit:.1e})")
        if not ok:
            failed.append(name)

    n, c = np.asarray(x86["probabilities"]).shape
    print(f"aarch64 vs x86 on {n} windows x {c} classes, {len(x86['shapley'])} modalities:")
    check("probabilities (EdgeRuntime.predict)", _maxdiff(x86["probabilities"], arm["probabilities"], "probabilities"), tol)
    check("probabilities (modality graphs + fusion)",
          _maxdiff(x86["per_modality_probabilities"], arm["per_modality_probabilities"], "per-modality"), tol)
    check("Shapley scores (device_check's call)", _maxdiff(x86["shapley"], arm["shapley"], "Shapley"), tol)
    check("fedmfs-edge predict --json probabilities",
          _maxdiff(x86_cli["probabilities"], arm_cli["probabilities"], "predict --json"), tol + 1e-6)

    labels_x86 = np.asarray(x86_cli["predictions"])
    labels_arm = np.asarray(arm_cli["predictions"])
    txt = np.loadtxt(a.x86_txt, delimiter="\t", ndmin=2)
    if txt.shape[0] != labels_x86.size:
        failed.append("x86 predict text output")
        print(f"  the x86 predict text output has {txt.shape[0]} lines, --json {labels_x86.size} predictions")
    else:
        same_txt = int((txt[:, 1].astype(int) == labels_arm).sum())
        top_arm = np.asarray(arm["probabilities"])[np.arange(labels_arm.size), labels_arm]
        dtop = float(np.abs(txt[:, 2] - top_arm).max())
        print(f"  labels: aarch64 = x86 --json on {int((labels_x86 == labels_arm).sum())}/{labels_x86.size}, "
              f"= x86 text output on {same_txt}/{labels_x86.size}; top probability vs the text's 4 decimals: {dtop:.1e}")
        if same_txt != labels_x86.size or dtop > 5e-5 + tol:
            failed.append("labels / x86 text output")
    if not np.array_equal(labels_x86, labels_arm):
        failed.append("predict --json labels")
    if failed:
        print("aarch64 and x86 differ: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("model_dir")
    d.add_argument("windows")
    c = sub.add_parser("compare")
    for name in ("x86_dump", "arm_dump", "x86_predict", "arm_predict", "x86_txt"):
        c.add_argument(name)
    c.add_argument("--tol", type=float, default=1e-5)
    a = p.parse_args()
    if a.cmd == "dump":
        dump(a.model_dir, a.windows)
        return 0
    return compare(a)


if __name__ == "__main__":
    sys.exit(main())
