"""``fedmfs-edge``: ``run`` the device daemon; ``predict`` with the personalised ONNX model (no torch)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedmfs.core.errors import DataError, FedMFSError

__all__ = ["main"]


def _run(args) -> int:
    from .config import load_edge_config
    from .daemon import EdgeDaemon

    cfg = load_edge_config(args.config)
    logging.getLogger().setLevel(args.log_level or cfg.log_level)
    daemon = EdgeDaemon(cfg, exit_when_done=args.exit_when_done)
    daemon.trainer.own_process = True
    return daemon.run(connect_timeout=args.connect_timeout)


def _predict(args) -> int:
    # numpy + onnxruntime only: this path must never import torch
    import numpy as np

    from fedmfs.core.runtime.modelset import load_model_set

    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        from .config import load_edge_config
        model_dir = load_edge_config(args.config).state_dir / "model"
    rt = load_model_set(model_dir)
    try:
        with np.load(args.input, allow_pickle=False) as z:
            x = {k[2:]: z[k] for k in z.files if k.startswith("x_")}
    except (OSError, ValueError) as e:
        raise DataError(f"{args.input}: not a readable .npz with x_<modality> arrays: {e}") from e
    if not x:
        raise DataError(f"{args.input}: no x_<modality> arrays")
    probs = rt.predict(x)
    pred = probs.argmax(-1)
    if args.json:
        print(json.dumps({"predictions": pred.tolist(), "probabilities": probs.round(6).tolist()}))
    else:
        for i, p in enumerate(pred):
            print(f"{i}\t{int(p)}\t{float(probs[i, p]):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedmfs-edge", description="The fedmfs edge daemon and its tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the device daemon")
    r.add_argument("--config", required=True, type=Path, help="edge.toml (see examples/edge.toml)")
    r.add_argument("--exit-when-done", action="store_true", help="exit after the last round (simulations)")
    r.add_argument("--connect-timeout", type=float, default=300.0)
    r.add_argument("--log-level", default=None)
    q = sub.add_parser("predict", help="class predictions of the personalised ONNX model for windows in an .npz")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", type=Path, help="edge.toml (uses STATE_DIR/model)")
    g.add_argument("--model", type=Path, help="a model-set directory")
    q.add_argument("--input", required=True, type=Path, help=".npz with x_<modality> arrays (N, T, ...)")
    q.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"run": _run, "predict": _predict}[args.cmd](args)
    except FedMFSError as e:
        print(f"fedmfs-edge: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
