"""Smaller ONNX artefacts: fp16 weights and int8 dynamic quantisation, with their cost in accuracy.

* ``fp16``: every float32 initializer with at least :data:`FP16_MIN_ELEMENTS` elements is stored as
  float16 and cast back to float32 by a ``Cast`` node at the top of the graph. Inputs, outputs and
  arithmetic stay float32 (ARM boards without fp16 kernels run it unchanged); the file halves.
  Applied to every graph of the set (the coalition graph's weights are the fusion weights
  rearranged, so both round identically and Shapley values stay consistent with predictions).
* ``int8``: :func:`onnxruntime.quantization.quantize_dynamic` (weights int8 per tensor, activations
  quantised on the fly; LSTM becomes ``DynamicQuantizeLSTM``, Gemm/MatMul become integer matmuls).
  Applied to the modality models only: the fusion graphs are a few kilobytes and private to the
  device, and keeping them fp32 keeps the Shapley engine's fast path exact.

:func:`quantization_report` measures sizes and the accuracy change on a client's test split.
Imports numpy, onnx and onnxruntime (no torch).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedmfs.core.errors import ConfigError, PayloadError

__all__ = ["Quantization", "FP16_MIN_ELEMENTS", "to_fp16", "to_int8", "quantize_model",
           "quantize_model_set", "QuantReport", "quantization_report"]

FP16_MIN_ELEMENTS = 16


class Quantization(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


def _load(onnx_bytes: bytes) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(onnx_bytes)
    except Exception as e:  # protobuf DecodeError and friends
        raise PayloadError(f"not an ONNX model: {e}") from e


def to_fp16(onnx_bytes: bytes) -> bytes:
    """Store large float32 weights as float16 with a Cast back to float32 (see module docstring)."""
    model = _load(onnx_bytes)
    g = model.graph
    keep, casts = [], []
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT and np.prod(init.dims, dtype=np.int64) >= FP16_MIN_ELEMENTS:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                          name=f"cast_{init.name}"))
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    return model.SerializeToString()


def to_int8(onnx_bytes: bytes) -> bytes:
    """Dynamic int8 quantisation with ONNX Runtime's quantiser (works on files, hence the temp dir)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _load(onnx_bytes)
    # the quantiser logs a "run pre-processing" hint on the root logger for every model; our graphs
    # have no shapes to infer or ops to fuse, so silence that one message while it runs
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)
    try:
        with tempfile.TemporaryDirectory(prefix="fedmfs-q-") as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            src.write_bytes(onnx_bytes)
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False)
            return dst.read_bytes()
    finally:
        root.removeFilter(hint)


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def quantize_model(onnx_bytes: bytes, how: Quantization | str) -> bytes:
    try:
        how = Quantization(how)
    except ValueError as e:
        raise ConfigError(f"unknown quantisation {how!r}; use fp32, fp16 or int8") from e
    if how is Quantization.FP32:
        return onnx_bytes
    return to_fp16(onnx_bytes) if how is Quantization.FP16 else to_int8(onnx_bytes)


def quantize_model_set(
    modality_models: Mapping[str, bytes], fusion_model: bytes | None, coalition_model: bytes | None,
    how: Quantization | str,
) -> tuple[dict[str, bytes], bytes | None, bytes | None]:
    """Quantise a set following the module's policy (int8: modality models only)."""
    how = Quantization(how)
    mods = {k: quantize_model(v, how) for k, v in modality_models.items()}
    if how is Quantization.FP16:
        return (mods, fusion_model and quantize_model(fusion_model, how),
                coalition_model and quantize_model(coalition_model, how))
    return mods, fusion_model, coalition_model


@dataclass(frozen=True, slots=True)
class QuantReport:
    """Sizes (bytes) before/after, and accuracy on a test split before/after (None without data)."""

    quantization: Quantization
    sizes_fp32: dict[str, int]
    sizes: dict[str, int]
    accuracy_fp32: float | None = None
    accuracy: float | None = None
    max_prob_diff: float | None = None

    @property
    def total_fp32(self) -> int:
        return sum(self.sizes_fp32.values())

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def accuracy_change(self) -> float | None:
        if self.accuracy is None or self.accuracy_fp32 is None:
            return None
        return self.accuracy - self.accuracy_fp32


def quantization_report(
    spec, fp32: tuple[dict[str, bytes], bytes | None, bytes | None],
    quant: tuple[dict[str, bytes], bytes | None, bytes | None], how: Quantization | str,
    x: Mapping[str, np.ndarray] | None = None, y: np.ndarray | None = None,
) -> QuantReport:
    """Sizes of both sets; with test windows ``x``/labels ``y``, the personalised model's accuracy
    (modality models + fusion, in ONNX Runtime) before and after, and the max probability change."""
    from fedmfs.core.runtime.sessions import EdgeRuntime

    def sizes(s):
        out = {f"{k}.onnx": len(v) for k, v in s[0].items()}
        if s[1] is not None:
            out["fusion.onnx"] = len(s[1])
        if s[2] is not None:
            out["fusion_coalitions.onnx"] = len(s[2])
        return out

    acc0 = acc1 = diff = None
    if x is not None and y is not None and fp32[1] is not None and len(y):
        p0 = EdgeRuntime(spec, fp32[0], fp32[1]).predict(x)
        p1 = EdgeRuntime(spec, quant[0], quant[1]).predict(x)
        acc0 = float((p0.argmax(1) == y).mean())
        acc1 = float((p1.argmax(1) == y).mean())
        diff = float(np.abs(p0 - p1).max())
    return QuantReport(Quantization(how), sizes(fp32), sizes(quant), acc0, acc1, diff)
