"""``fedmfs-export``: a saved model set (safetensors + spec.json) -> verified ONNX model set.

Exit codes: 0 ok; 2 bad options; 3 bad data; 4 bad model files; 6 an export disagrees with PyTorch
beyond 1e-5.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from fedmfs.core.errors import ConfigError, DataError, FedMFSError

__all__ = ["main", "build_parser"]

_EPILOG = """\
input layout (STATE_DIR), see docs/onnx.md:
  spec.json                {"format": "fedmfs-state-set", "version": 1, "spec": {...}, "fusion_hidden": 64}
  <modality>.safetensors   a ModalityModel state_dict (float32)
  fusion.safetensors       a FusionModel state_dict (optional)

output (OUT_DIR): <modality>.onnx, fusion.onnx, fusion_coalitions.onnx and manifest.json
(sha256 of every file), loadable on a device with fedmfs.core.runtime.modelset.load_model_set.

examples:
  fedmfs-export runs/dev3/models -o runs/dev3/onnx
  fedmfs-export runs/dev3/models -o runs/dev3/onnx-int8 --quantize int8 --data data/fleet --client s03
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmfs-export",
        description="Export a saved fedmfs model set to ONNX, verify every model against PyTorch "
                    "(max abs diff printed, must be <= 1e-5 in fp32), optionally quantise, and write "
                    "a manifest-pinned model set for the edge runtime.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state_dir", metavar="STATE_DIR", help="saved model set: spec.json + *.safetensors")
    p.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="model-set directory to write")
    p.add_argument("--quantize", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="weights of the written models: fp32 (default), fp16 (weights stored half, "
                        "compute fp32) or int8 (dynamic quantisation of the modality models)")
    p.add_argument("--data", metavar="FLEETDIR", help="fleet directory (fedmfs data format) for real-input "
                   "verification and the accuracy change of quantisation; needs --client")
    p.add_argument("--client", metavar="NAME", help="client whose test split is used with --data")
    p.add_argument("--max-samples", type=int, default=256, metavar="K",
                   help="use at most K test windows for verification (default 256)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max abs diff allowed (default 1e-5)")
    return p


def _real_inputs(args, spec):
    if args.data is None:
        if args.client is not None:
            raise ConfigError("--client needs --data FLEETDIR")
        return None, None
    if args.client is None:
        raise ConfigError("--data needs --client NAME (whose test split to use)")
    from fedmfs.core.data.format import load_fleet

    fleet = load_fleet(args.data)
    def shape(sp):  # hidden sizes may differ: the data only fixes names, shapes, classes and steps
        return [(m.name, m.feature_shape) for m in sp.modalities], sp.num_classes, sp.steps

    if shape(fleet.spec) != shape(spec):
        raise DataError(f"the fleet's spec ({list(fleet.spec.names)}, {fleet.spec.num_classes} classes, "
                        f"{fleet.spec.steps} steps) does not match the model set's")
    by_name = {c.name: c for c in fleet.clients}
    if args.client not in by_name:
        raise ConfigError(f"--client {args.client!r} is not in the fleet; clients: {', '.join(by_name)}")
    x, y = by_name[args.client].split(train=False)
    if len(y) == 0:
        raise DataError(f"client {args.client!r} has no test windows")
    k = max(1, args.max_samples)
    return {n: a[:k] for n, a in x.items()}, y[:k]


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedmfs.core.runtime.graphs import model_set_onnx
    from fedmfs.core.runtime.modelset import write_model_set
    from fedmfs.export.quantize import quantization_report, quantize_model_set
    from fedmfs.export.statedir import load_state_set
    from fedmfs.export.verify import VerificationError, verify_model_set

    states = load_state_set(args.state_dir)
    spec = states.spec
    x, y = _real_inputs(args, spec)
    fusion_state = states.fusion_state
    if x is not None:
        missing = sorted(set(x) - set(states.modality_states))
        if missing:
            print(f"note: the client has {missing} but the model set has no model for them; ignored")
        x = {k: v for k, v in x.items() if k in states.modality_states}
    models, fusion, coalitions = model_set_onnx(spec, states.modality_states, fusion_state, states.fusion_hidden)
    checks = verify_model_set(spec, states.modality_states, models, fusion_state, states.fusion_hidden,
                              fusion, coalitions, x)
    print(f"{'model':<22}{'random diff':>14}{'real diff':>14}")
    for c in checks:
        real = f"{c.real_diff:.3e}" if c.real_diff is not None else "-"
        print(f"{c.name:<22}{c.random_diff:>14.3e}{real:>14}")
    bad = [c.name for c in checks if not c.ok(args.tolerance)]
    if bad:
        raise VerificationError(f"max abs diff above {args.tolerance:g} for {', '.join(bad)}; nothing written")
    fp32 = (models, fusion, coalitions)
    written = fp32
    if args.quantize != "fp32":
        written = quantize_model_set(models, fusion, coalitions, args.quantize)
        rep = quantization_report(spec, fp32, written, args.quantize, x, y)
        print(f"{args.quantize}: {rep.total_fp32} -> {rep.total} bytes ({rep.total / rep.total_fp32:.1%})")
        for name, n in rep.sizes.items():
            print(f"  {name:<26}{rep.sizes_fp32[name]:>10} -> {n:>10}")
        if rep.accuracy_change is not None:
            print(f"test accuracy ({len(y)} windows): fp32 {rep.accuracy_fp32:.4f} -> {args.quantize} "
                  f"{rep.accuracy:.4f} (change {rep.accuracy_change:+.4f}); max prob change {rep.max_prob_diff:.3e}")
    elif x is not None and y is not None and fusion is not None:
        from fedmfs.core.runtime.sessions import EdgeRuntime

        acc = float((EdgeRuntime(spec, models, fusion).predict(x).argmax(1) == np.asarray(y)).mean())
        print(f"test accuracy ({len(y)} windows): {acc:.4f}")
    codec = {k: args.quantize for k in written[0]}
    if args.quantize == "fp16":
        codec.update(fusion="fp16", coalitions="fp16")
    out = write_model_set(args.out, spec, written[0], written[1], written[2], versions=states.versions,
                          codecs=codec)
    print(f"wrote {out}/manifest.json ({len(written[0])} modality models"
          f"{', fusion model and coalition graph' if written[1] is not None else ''})")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except FedMFSError as e:
        print(f"fedmfs-export: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
