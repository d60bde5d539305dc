"""Build ONNX graphs straight from model weights, without tracing and without torch.

Why not ``torch.onnx.export``: tracing costs hundreds of milliseconds per model and needs torch; a
device that receives global models as safetensors must be able to rebuild its ONNX artefacts from the
numpy arrays alone, every round. The graphs below are written op by op with ``onnx.helper`` from the
PyTorch ``state_dict`` names of :mod:`fedmfs.learner.models` and are checked against PyTorch by
:mod:`fedmfs.export.verify` (max abs diff <= 1e-5 in fp32).

Graphs (opset 17, IR 8, dynamic batch axis ``batch``):

* modality model ``<name>``: input ``<name>_x`` (batch, T, *feature_shape) float32 -> output
  ``<name>_logp`` (batch, C) log-probabilities. Reshape to (batch, T, F), transpose to time-major, one
  ONNX ``LSTM`` (gates reordered: PyTorch i,f,g,o -> ONNX i,o,f,c; bias = [W_b, R_b]), ``Gemm`` on the
  last hidden state, ``LogSoftmax``. T is dynamic too.
* fusion model: inputs ``probs`` (batch, M, C) and ``mask`` (batch, M) -> output ``class_probs``
  (batch, C) class **probabilities** (``Softmax`` of the logits; the Shapley value functions work on
  probabilities; the output cannot be named ``probs`` because ONNX names are single-assignment).
* coalition graph (the Shapley fast path, see :func:`fusion_coalition_onnx`).
* personalised graph (the prediction fast path, see :func:`personalised_model_onnx`): the present
  modality models and the fusion model in one graph, inputs ``<name>_x``, output ``class_probs``.

This module imports numpy and onnx only. :func:`model_set_runtime` additionally opens ONNX Runtime
sessions through :class:`fedmfs.core.runtime.sessions.EdgeRuntime`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedmfs.core.errors import PayloadError
from fedmfs.core.modality import DatasetSpec, ModalitySpec

__all__ = [
    "COALITION_INPUTS",
    "COALITION_OUTPUT",
    "FUSION_INPUTS",
    "FUSION_OUTPUT",
    "IR_VERSION",
    "OPSET",
    "SPLIT_INPUTS",
    "SPLIT_OUTPUTS",
    "TERMS_OUTPUTS",
    "check_state",
    "fusion_coalition_onnx",
    "fusion_hidden_of",
    "fusion_model_onnx",
    "fusion_state_shapes",
    "modality_model_onnx",
    "modality_state_shapes",
    "model_set_onnx",
    "model_set_runtime",
    "personalised_model_onnx",
]

OPSET = 17
IR_VERSION = 8
FUSION_INPUTS = ("probs", "mask")
FUSION_OUTPUT = "class_probs"
COALITION_INPUTS = ("x_probs", "bg_probs", "mask", "coalitions")
COALITION_OUTPUT = "coalition_probs"
# the coalition graph's terms role (see fusion_coalition_onnx)
TERMS_OUTPUTS = ("x_terms", "bg_terms", "const_term")
# the coalition graph's split role and the second layer's weights it needs (see fusion_coalition_onnx)
SPLIT_INPUTS = ("split_a", "split_c", "split_w", "split_la", "split_lc", "split_onehot", "split_prob_mode")
SPLIT_OUTPUTS = ("split_value", "split_sums", "split_logits", "out_weight", "out_bias")
_PRODUCER = "fedmfs.core.runtime.graphs"


def modality_state_shapes(spec: ModalitySpec, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The state_dict names and shapes of :class:`fedmfs.learner.models.ModalityModel` for ``spec``."""
    h, f = spec.hidden, spec.features
    return {
        "lstm.weight_ih_l0": (4 * h, f),
        "lstm.weight_hh_l0": (4 * h, h),
        "lstm.bias_ih_l0": (4 * h,),
        "lstm.bias_hh_l0": (4 * h,),
        "head.weight": (num_classes, h),
        "head.bias": (num_classes,),
    }


def fusion_state_shapes(num_modalities: int, num_classes: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The state_dict names and shapes of :class:`fedmfs.learner.models.FusionModel`."""
    d = num_modalities * num_classes + num_modalities
    return {
        "net.0.weight": (hidden, d),
        "net.0.bias": (hidden,),
        "net.2.weight": (num_classes, hidden),
        "net.2.bias": (num_classes,),
    }


def fusion_hidden_of(state: Mapping[str, np.ndarray]) -> int:
    """The fusion model's hidden width, read from its first layer's weight."""
    try:
        return int(np.shape(state["net.0.weight"])[0])
    except (KeyError, IndexError) as e:
        raise PayloadError("fusion state lacks a 2-D 'net.0.weight'") from e


def check_state(state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], what: str) -> dict[str, np.ndarray]:
    """Strictly check names, shapes and finiteness; return float32 C-contiguous copies.

    Lists every missing, unexpected, mis-shaped or non-finite tensor at once.
    """
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    out: dict[str, np.ndarray] = {}
    for k, want in shapes.items():
        if k not in state:
            continue
        a = np.asarray(state[k])
        if a.dtype.kind != "f":
            problems.append(f"{k} has dtype {a.dtype}, need floating point")
            continue
        if tuple(a.shape) != tuple(want):
            problems.append(f"{k} has shape {tuple(a.shape)}, need {tuple(want)}")
            continue
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            problems.append(f"{k} has NaN or infinite values")
        out[k] = a
    if problems:
        raise PayloadError(f"{what}: state does not fit: " + "; ".join(problems))
    return out


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a), name)


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _model(graph: onnx.GraphProto, doc: str, **meta: str | int) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name=_PRODUCER, doc_string=doc)
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    return model.SerializeToString()


def _onnx_gates(w: np.ndarray, hidden: int) -> np.ndarray:
    """Reorder PyTorch's stacked LSTM gates (i, f, g, o) to ONNX's (i, o, f, c) along axis 0."""
    i, f, g, o = (w[k * hidden:(k + 1) * hidden] for k in range(4))
    return np.concatenate([i, o, f, g], axis=0)


def _modality_graph_parts(
    spec: ModalitySpec, num_classes: int, state: Mapping[str, np.ndarray], prefix: str = "",
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers of one modality model, ``spec.onnx_input`` -> ``spec.onnx_output``;
    every internal name carries ``prefix`` so several models can share one graph."""
    st = check_state(state, modality_state_shapes(spec, num_classes), f"modality {spec.name!r}")
    h, f = spec.hidden, spec.features
    w = _onnx_gates(st["lstm.weight_ih_l0"], h)[None]           # (1, 4H, F)
    r = _onnx_gates(st["lstm.weight_hh_l0"], h)[None]           # (1, 4H, H)
    b = np.concatenate([_onnx_gates(st["lstm.bias_ih_l0"], h),
                        _onnx_gates(st["lstm.bias_hh_l0"], h)])[None]  # (1, 8H)
    x_name = spec.onnx_input
    n = {k: prefix + k for k in ("flat_shape", "x_flat", "x_tm", "W", "R", "B", "y_h", "axis0", "h_last",
                                 "head_w", "head_b", "logits")}
    nodes = [
        # (B, T, *fs) -> (B, T, F): 0 copies the input's dimension
        helper.make_node("Reshape", [x_name, n["flat_shape"]], [n["x_flat"]]),
        helper.make_node("Transpose", [n["x_flat"]], [n["x_tm"]], perm=[1, 0, 2]),
        helper.make_node("LSTM", [n["x_tm"], n["W"], n["R"], n["B"]], ["", n["y_h"]], hidden_size=h),
        helper.make_node("Squeeze", [n["y_h"], n["axis0"]], [n["h_last"]]),      # (1, B, H) -> (B, H)
        helper.make_node("Gemm", [n["h_last"], n["head_w"], n["head_b"]], [n["logits"]], transB=1),
        helper.make_node("LogSoftmax", [n["logits"]], [spec.onnx_output], axis=-1),
    ]
    inits = [
        _ints(n["flat_shape"], [0, 0, f]), _ints(n["axis0"], [0]),
        _init(n["W"], w), _init(n["R"], r), _init(n["B"], b),
        _init(n["head_w"], st["head.weight"]), _init(n["head_b"], st["head.bias"]),
    ]
    return nodes, inits


def _modality_input(spec: ModalitySpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.onnx_input, TensorProto.FLOAT, ["batch", "steps", *spec.feature_shape])


def modality_model_onnx(spec: ModalitySpec, num_classes: int, state: Mapping[str, np.ndarray]) -> bytes:
    """ONNX bytes of one modality model (see the module docstring for the graph)."""
    nodes, inits = _modality_graph_parts(spec, num_classes, state)
    h, f, c = spec.hidden, spec.features, num_classes
    graph = helper.make_graph(
        nodes, f"fedmfs_{spec.name}", [_modality_input(spec)],
        [helper.make_tensor_value_info(spec.onnx_output, TensorProto.FLOAT, ["batch", c])], inits)
    return _model(graph, f"fedmfs modality model {spec.name}: LSTM({f}->{h}) -> Linear -> LogSoftmax",
                  fedmfs_graph="modality", modality=spec.name)


def fusion_model_onnx(num_modalities: int, num_classes: int, hidden: int, state: Mapping[str, np.ndarray]) -> bytes:
    """ONNX bytes of the fusion model: (probs (B,M,C), mask (B,M)) -> class probabilities (B,C)."""
    m, c = num_modalities, num_classes
    st = check_state(state, fusion_state_shapes(m, c, hidden), "fusion model")
    nodes = [
        helper.make_node("Unsqueeze", ["mask", "axis_last"], ["mask3"]),
        helper.make_node("Mul", ["probs", "mask3"], ["masked"]),
        helper.make_node("Reshape", ["masked", "flat_shape"], ["flat"]),
        helper.make_node("Concat", ["flat", "mask"], ["z"], axis=1),
        helper.make_node("Gemm", ["z", "w1", "b1"], ["h_pre"], transB=1),
        helper.make_node("Relu", ["h_pre"], ["h"]),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], [FUSION_OUTPUT], axis=-1),
    ]
    inits = [
        _ints("axis_last", [-1]), _ints("flat_shape", [0, m * c]),
        _init("w1", st["net.0.weight"]), _init("b1", st["net.0.bias"]),
        _init("w2", st["net.2.weight"]), _init("b2", st["net.2.bias"]),
    ]
    graph = helper.make_graph(
        nodes, "fedmfs_fusion",
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", m, c]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", m])],
        [helper.make_tensor_value_info(FUSION_OUTPUT, TensorProto.FLOAT, ["batch", c])], inits)
    return _model(graph, f"fedmfs fusion model: {m} modalities x {c} classes, hidden {hidden}",
                  fedmfs_graph="fusion", fusion_hidden=hidden)


def _split_role(c: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], list[onnx.ValueInfoProto],
                                  list[onnx.ValueInfoProto]]:
    """Nodes, initializers, inputs and outputs of the coalition graph's split role (see
    :func:`fusion_coalition_onnx`). Layout (G, C or J, K, B): every broadcast is along an axis whose
    inner span is a whole (K, B) plane or a row of B, which ONNX Runtime's broadcasting loops handle
    at memory speed (on (G, K, B, C) with C innermost they were 4x slower: docs/benchmarks.md)."""
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Add", ["split_a", "split_c"], ["sp_pre"]),                  # (G,J,K,B)
        helper.make_node("Relu", ["sp_pre"], ["sp_hid"]),
        helper.make_node("Shape", ["sp_pre"], ["sp_gj"], end=2),
        helper.make_node("Shape", ["sp_pre"], ["sp_k"], start=2, end=3),
        helper.make_node("Shape", ["sp_pre"], ["sp_b"], start=3),
        helper.make_node("Mul", ["sp_k", "sp_b"], ["sp_kb"]),
        helper.make_node("Concat", ["sp_gj", "sp_kb"], ["sp_shape3"], axis=0),
        helper.make_node("Reshape", ["sp_hid", "sp_shape3"], ["sp_hid3"]),             # (G,J,K*B)
        helper.make_node("MatMul", ["split_w", "sp_hid3"], ["sp_mix3"]),               # (G,C,K*B)
        helper.make_node("Shape", ["split_w"], ["sp_gc"], end=2),
        helper.make_node("Concat", ["sp_gc", "sp_k", "sp_b"], ["sp_shape4"], axis=0),
        helper.make_node("Reshape", ["sp_mix3", "sp_shape4"], ["sp_mix"]),             # (G,C,K,B)
        helper.make_node("Add", ["split_la", "split_lc"], ["sp_lin"]),
        helper.make_node("Add", ["sp_mix", "sp_lin"], ["split_logits"]),
        helper.make_node("Exp", ["split_logits"], ["sp_exp"]),
        helper.make_node("ReduceSum", ["sp_exp", "sp_axis1"], ["split_sums"], keepdims=1),  # (G,1,K,B)
    ]
    # only the value kind asked for runs: "prob" sums the probabilities over B -> (G,C,K);
    # "loglik" sums the clipped true-class log-probabilities over B -> (G,K)
    prob = helper.make_graph(
        [helper.make_node("Div", ["sp_exp", "split_sums"], ["sp_p"]),
         helper.make_node("ReduceSum", ["sp_p", "sp_axis3"], ["sp_prob"], keepdims=0)],
        "split_prob", [], [helper.make_tensor_value_info("sp_prob", f32, None)])
    loglik = helper.make_graph(
        [helper.make_node("Mul", ["split_logits", "split_onehot"], ["sp_tl"]),
         helper.make_node("ReduceSum", ["sp_tl", "sp_axis1"], ["sp_true"], keepdims=1),
         helper.make_node("Log", ["split_sums"], ["sp_lse"]),
         helper.make_node("Sub", ["sp_true", "sp_lse"], ["sp_logp"]),
         helper.make_node("Max", ["sp_logp", "log_clip"], ["sp_logp_c"]),
         helper.make_node("ReduceSum", ["sp_logp_c", "sp_axes13"], ["sp_loglik"], keepdims=0)],
        "split_loglik", [], [helper.make_tensor_value_info("sp_loglik", f32, None)])
    nodes += [
        helper.make_node("If", ["split_prob_mode"], ["split_value"], then_branch=prob, else_branch=loglik),
        helper.make_node("Identity", ["w2_t"], ["out_weight"]),
        helper.make_node("Identity", ["b2"], ["out_bias"]),
    ]
    inits = [
        _ints("sp_axis1", [1]), _ints("sp_axis3", [3]), _ints("sp_axes13", [1, 3]),
        # defaults: no coalitions, so the other roles' calls pass through this one at no cost
        _init("split_a", np.zeros((0, 1, 1, 1), np.float32)), _init("split_c", np.zeros((0, 1, 1, 1), np.float32)),
        _init("split_w", np.zeros((0, c, 1), np.float32)), _init("split_la", np.zeros((0, c, 1, 1), np.float32)),
        _init("split_lc", np.zeros((0, c, 1, 1), np.float32)), _init("split_onehot", np.zeros((1, c, 1, 1), np.float32)),
        _init("split_prob_mode", np.ones(1, bool)),
    ]
    inputs = [helper.make_tensor_value_info("split_a", f32, ["g", "j", "k", 1]),
              helper.make_tensor_value_info("split_c", f32, ["g", "j", 1, "bb"]),
              helper.make_tensor_value_info("split_w", f32, ["g", c, "j"]),
              helper.make_tensor_value_info("split_la", f32, ["g", c, "k", 1]),
              helper.make_tensor_value_info("split_lc", f32, ["g", c, 1, "bb"]),
              helper.make_tensor_value_info("split_onehot", f32, [1, c, "k", 1]),
              helper.make_tensor_value_info("split_prob_mode", TensorProto.BOOL, [1])]
    outputs = [helper.make_tensor_value_info("split_value", f32, None),
               helper.make_tensor_value_info("split_sums", f32, ["g", 1, "k", "bb"]),
               helper.make_tensor_value_info("split_logits", f32, ["g", c, "k", "bb"])]
    return nodes, inits, inputs, outputs


def fusion_coalition_onnx(
    num_modalities: int, num_classes: int, hidden: int, state: Mapping[str, np.ndarray], tiles: bool = True,
    split: bool = True,
) -> bytes:
    """ONNX bytes of the fusion model evaluated for many coalitions at once (the Shapley fast path).

    **Coalition role** (the first coalition graph; export's verification uses it). Inputs ``x_probs``
    (N,M,C) explained samples' modality probabilities, ``bg_probs`` (B,M,C) background's, ``mask``
    (M,) the client's presence mask (float), ``coalitions`` (S,M) float, 1 where modality m takes the
    explained sample's probabilities and 0 where it takes the background's. Output
    ``coalition_probs`` (S,N,B,C): the fusion model's class probabilities for every coalition,
    explained sample and background sample -- exactly what the plain fusion graph gives on the
    (S*N*B, M, C) tensor of substituted rows. The first layer is affine, so its pre-activation is a
    sum of per-modality terms, combined per coalition with one (S,M)@(M,N*H) product.

    With ``tiles`` (the default) the graph has two more roles, which the runtime's engine
    (:func:`fedmfs.core.runtime.coalitions.tiled_coalition_fn`) uses instead:

    * **terms**: inputs ``x_probs``, ``bg_probs``, ``mask`` -> ``x_terms`` (M,N,H), ``bg_terms``
      (M,B,H), ``const_term`` (H,), in float64: each modality's first-layer term per sample (masked as
      the fusion model masks its input) and the mask columns plus the bias;
    * **tiles**: inputs ``tile_pre`` (G,K,B',H) and ``tile_shared`` (K,B',H) float32, whose sum is
      the first layer's pre-activation of G coalitions on K explained x B' background rows ->
      ``tile_logits`` (G,K,B',C) (ReLU, second layer); ``tile_sums`` (G,K,B',1) the sums of
      exp(logits) over the classes (the softmax denominators, NOT shifted by the row maximum: the
      engine checks them and redoes a tile the stable way when one overflows or underflows);
      ``tile_prob`` (G,K,1,C) the class probabilities summed over the B' background rows; and, with
      ``tile_onehot`` (K,C,1) the explained samples' true classes, ``tile_loglik`` (G,K,1) the
      true class's log-probability, clipped at log(1e-12) as the reference clips, summed over B'.

    With ``tiles`` and ``split`` (both built by default; the runtime uses the split role only when
    asked for) one more role, and the second
    layer's weights ``out_weight`` (H,C) and ``out_bias`` (C,) as outputs of any call:

    * **split**: for G coalitions on K explained x B' background rows, only the hidden units whose
      ReLU is neither always on nor always off over the rows (the "mixed" ones, J of them, zero-padded)
      go through the ReLU and a (G,C,J)@(G,J,K*B') MatMul; the always-on units' part is affine and
      comes in as ``split_la`` (G,C,K,1) + ``split_lc`` (G,C,1,B') (the second layer's bias
      included), the always-off units' is zero. Inputs ``split_a`` (G,J,K,1) and ``split_c``
      (G,J,1,B') the mixed units' pre-activation parts, ``split_w`` (G,C,J) their second-layer
      columns, ``split_onehot`` (1,C,K,1) the true classes for "loglik", ``split_prob_mode`` (bool).
      Outputs ``split_logits`` (G,C,K,B'), ``split_sums`` (G,1,K,B') the unshifted softmax
      denominators, and ``split_value``: the probabilities summed over B' (G,C,K) when
      ``split_prob_mode``, else the clipped true-class log-probabilities summed over B' (G,K).

    Every input has a small default (an overridable initializer), so a caller feeds one role's
    inputs only; the other roles then run on one-row tensors.
    """
    m, c = num_modalities, num_classes
    st = check_state(state, fusion_state_shapes(m, c, hidden), "fusion model")
    w1 = st["net.0.weight"]
    w1p = w1[:, :m * c].reshape(hidden, m, c).transpose(1, 2, 0).copy()  # (M, C, H)
    w1m_t = w1[:, m * c:].T.copy()                                        # (M, H)
    nodes = [
        # per-modality first-layer terms, masked like the fusion model masks its input
        helper.make_node("Unsqueeze", ["mask", "axes_1_2"], ["mask_mc"]),              # (M,1,1)
        helper.make_node("Transpose", ["x_probs"], ["x_t"], perm=[1, 0, 2]),           # (M,N,C)
        helper.make_node("Mul", ["x_t", "mask_mc"], ["x_m"]),
        helper.make_node("MatMul", ["x_m", "w1p"], ["x_terms32"]),                      # (M,N,H)
        helper.make_node("Transpose", ["bg_probs"], ["bg_t"], perm=[1, 0, 2]),
        helper.make_node("Mul", ["bg_t", "mask_mc"], ["bg_m"]),
        helper.make_node("MatMul", ["bg_m", "w1p"], ["bg_terms32"]),                    # (M,B,H)
        # the coalition-independent part: mask features and bias
        helper.make_node("MatMul", ["mask", "w1m_t"], ["mask_term"]),                   # (H,)
        helper.make_node("Add", ["mask_term", "b1"], ["const"]),
        # combine per coalition: (S,M) @ (M, N*H) and (1-S) @ (M, B*H)
        helper.make_node("Reshape", ["x_terms32", "flat2"], ["x_flat"]),                # (M, N*H)
        helper.make_node("Reshape", ["bg_terms32", "flat2"], ["bg_flat"]),
        helper.make_node("Sub", ["one", "coalitions"], ["complement"]),
        helper.make_node("MatMul", ["coalitions", "x_flat"], ["xs_flat"]),              # (S, N*H)
        helper.make_node("MatMul", ["complement", "bg_flat"], ["bs_flat"]),             # (S, B*H)
        helper.make_node("Reshape", ["xs_flat", "xs_shape"], ["xs"]),                   # (S,N,1,H)
        helper.make_node("Reshape", ["bs_flat", "bs_shape"], ["bs"]),                   # (S,1,B,H)
        helper.make_node("Add", ["xs", "bs"], ["pre0"]),
        helper.make_node("Add", ["pre0", "const"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["hid"]),
        helper.make_node("MatMul", ["hid", "w2_t"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [COALITION_OUTPUT], axis=-1),
    ]
    inits = [
        _ints("axes_1_2", [1, 2]), _ints("flat2", [m, -1]),
        _ints("xs_shape", [0, -1, 1, hidden]), _ints("bs_shape", [0, 1, -1, hidden]),
        _init("one", np.ones((), np.float32)),
        _init("w1p", w1p), _init("w1m_t", w1m_t), _init("b1", st["net.0.bias"]),
        _init("w2_t", st["net.2.weight"].T.copy()), _init("b2", st["net.2.bias"]),
    ]
    inputs = [helper.make_tensor_value_info("x_probs", TensorProto.FLOAT, ["n", m, c]),
              helper.make_tensor_value_info("bg_probs", TensorProto.FLOAT, ["b", m, c]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [m]),
              helper.make_tensor_value_info("coalitions", TensorProto.FLOAT, ["s", m])]
    outputs = [helper.make_tensor_value_info(COALITION_OUTPUT, TensorProto.FLOAT, ["s", "n", "b", c])]
    graph_kind = "fusion_coalitions"
    if tiles:
        graph_kind = "fusion_coalition_tiles"
        f64 = TensorProto.DOUBLE
        nodes += [
            # terms, in float64 so that the engine's sums over modalities round once
            helper.make_node("Cast", ["x_m"], ["x_m64"], to=f64),
            helper.make_node("Cast", ["bg_m"], ["bg_m64"], to=f64),
            helper.make_node("Cast", ["w1p"], ["w1p64"], to=f64),
            helper.make_node("MatMul", ["x_m64", "w1p64"], [TERMS_OUTPUTS[0]]),
            helper.make_node("MatMul", ["bg_m64", "w1p64"], [TERMS_OUTPUTS[1]]),
            helper.make_node("Cast", ["mask"], ["mask64"], to=f64),
            helper.make_node("Cast", ["w1m_t"], ["w1m_t64"], to=f64),
            helper.make_node("Cast", ["b1"], ["b1_64"], to=f64),
            helper.make_node("MatMul", ["mask64", "w1m_t64"], ["mask_term64"]),
            helper.make_node("Add", ["mask_term64", "b1_64"], [TERMS_OUTPUTS[2]]),
            # tiles: ReLU, second layer, unshifted exp and the reductions over the classes and rows
            helper.make_node("Add", ["tile_pre", "tile_shared"], ["t_pre"]),
            helper.make_node("Relu", ["t_pre"], ["t_hid"]),
            helper.make_node("MatMul", ["t_hid", "w2_t"], ["t_logits0"]),
            helper.make_node("Add", ["t_logits0", "b2"], ["tile_logits"]),
            helper.make_node("Exp", ["tile_logits"], ["t_exp"]),
            helper.make_node("MatMul", ["t_exp", "ones_c1"], ["tile_sums"]),             # (G,K,B',1)
            helper.make_node("Reciprocal", ["tile_sums"], ["t_inv"]),
            helper.make_node("Transpose", ["t_inv"], ["t_inv_t"], perm=[0, 1, 3, 2]),    # (G,K,1,B')
            helper.make_node("MatMul", ["t_inv_t", "t_exp"], ["tile_prob"]),             # (G,K,1,C)
            helper.make_node("MatMul", ["tile_logits", "tile_onehot"], ["t_true"]),      # (G,K,B',1)
            helper.make_node("Log", ["tile_sums"], ["t_lse"]),
            helper.make_node("Sub", ["t_true", "t_lse"], ["t_logp"]),
            helper.make_node("Max", ["t_logp", "log_clip"], ["t_logp_c"]),
            helper.make_node("ReduceSum", ["t_logp_c", "axis_2"], ["tile_loglik"], keepdims=0),  # (G,K,1)
        ]
        inits += [
            _init("ones_c1", np.ones((c, 1), np.float32)), _ints("axis_2", [2]),
            _init("log_clip", np.log(np.float32(1e-12)).astype(np.float32)),
        ]
        inputs += [helper.make_tensor_value_info("tile_pre", TensorProto.FLOAT, ["g", "k", "bb", hidden]),
                   helper.make_tensor_value_info("tile_shared", TensorProto.FLOAT, ["k", "bb", hidden]),
                   helper.make_tensor_value_info("tile_onehot", TensorProto.FLOAT, ["k", c, "one"])]
        outputs += [helper.make_tensor_value_info(TERMS_OUTPUTS[0], f64, [m, "n", hidden]),
                    helper.make_tensor_value_info(TERMS_OUTPUTS[1], f64, [m, "b", hidden]),
                    helper.make_tensor_value_info(TERMS_OUTPUTS[2], f64, [hidden]),
                    helper.make_tensor_value_info("tile_logits", TensorProto.FLOAT, ["g", "k", "bb", c]),
                    helper.make_tensor_value_info("tile_sums", TensorProto.FLOAT, ["g", "k", "bb", 1]),
                    helper.make_tensor_value_info("tile_prob", TensorProto.FLOAT, ["g", "k", 1, c]),
                    helper.make_tensor_value_info("tile_loglik", TensorProto.FLOAT, ["g", "k", 1])]
        # defaults: every input overridable and empty (no rows, no true classes), so that a role feeds
        # only its own inputs and the others cost next to nothing (ONNX Runtime runs every node)
        inits += [_init("x_probs", np.zeros((0, m, c), np.float32)), _init("bg_probs", np.zeros((0, m, c), np.float32)),
                  _init("mask", np.zeros(m, np.float32)), _init("coalitions", np.zeros((1, m), np.float32)),
                  _init("tile_pre", np.zeros((0, 1, 1, hidden), np.float32)),
                  _init("tile_shared", np.zeros((1, 1, hidden), np.float32)),
                  _init("tile_onehot", np.zeros((1, c, 0), np.float32))]
        if split:
            graph_kind = "fusion_coalition_split"
            sp_nodes, sp_inits, sp_inputs, sp_outputs = _split_role(c)
            nodes += sp_nodes
            inits += sp_inits
            inputs += sp_inputs
            outputs += sp_outputs + [helper.make_tensor_value_info("out_weight", TensorProto.FLOAT, [hidden, c]),
                                     helper.make_tensor_value_info("out_bias", TensorProto.FLOAT, [c])]
    graph = helper.make_graph(nodes, "fedmfs_fusion_coalitions", inputs, outputs, inits)
    return _model(graph, f"fedmfs fusion model over coalitions: {m} modalities x {c} classes, hidden {hidden}",
                  fedmfs_graph=graph_kind, fusion_hidden=hidden)


def personalised_model_onnx(
    spec: DatasetSpec,
    modality_states: Mapping[str, Mapping[str, np.ndarray]],
    fusion_state: Mapping[str, np.ndarray],
    fusion_hidden: int | None = None,
) -> bytes:
    """ONNX bytes of the whole personalised model in ONE graph: every present modality model, then
    the fusion model with the client's presence mask folded in (the prediction fast path).

    Inputs ``<m>_x`` (batch, T, *feature_shape) for each modality in ``modality_states`` (the
    client's present ones, spec order); output ``class_probs`` (batch, C), the same function as the
    modality graphs followed by the fusion graph with mask = present modalities. Why: at batch 1 a
    session call costs a fixed few tens of microseconds of dispatch; one call instead of M + 1.

    The mask is constant for a client, so the fusion's first layer keeps only the present
    modalities' columns (absent ones multiply zeros) and the mask columns fold into the bias.
    """
    unknown = sorted(set(modality_states) - set(spec.names))
    if unknown:
        raise PayloadError(f"model states for unknown modalities {unknown}; the spec has {list(spec.names)}")
    present = [j for j, ms in enumerate(spec.modalities) if ms.name in modality_states]
    if not present:
        raise PayloadError("a personalised model needs at least one modality model")
    m, c = len(spec.modalities), spec.num_classes
    hidden = fusion_hidden if fusion_hidden is not None else fusion_hidden_of(fusion_state)
    st = check_state(fusion_state, fusion_state_shapes(m, c, hidden), "fusion model")
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    probs = []
    for j in present:
        ms = spec.modalities[j]
        n, i = _modality_graph_parts(ms, c, modality_states[ms.name], prefix=f"{ms.name}.")
        nodes += n
        inits += i
        nodes.append(helper.make_node("Exp", [ms.onnx_output], [f"{ms.name}.probs"]))
        probs.append(f"{ms.name}.probs")
    w1 = st["net.0.weight"].astype(np.float64)
    cols = np.concatenate([np.arange(j * c, (j + 1) * c) for j in present])
    w1_sel = st["net.0.weight"][:, cols]                                       # (H, P*C)
    b1 = (st["net.0.bias"].astype(np.float64) + w1[:, m * c + np.asarray(present)].sum(1)).astype(np.float32)
    nodes += [
        helper.make_node("Concat", probs, ["fusion.z"], axis=1),                 # (B, P*C)
        helper.make_node("Gemm", ["fusion.z", "fusion.w1", "fusion.b1"], ["fusion.h_pre"], transB=1),
        helper.make_node("Relu", ["fusion.h_pre"], ["fusion.h"]),
        helper.make_node("Gemm", ["fusion.h", "fusion.w2", "fusion.b2"], ["fusion.logits"], transB=1),
        helper.make_node("Softmax", ["fusion.logits"], [FUSION_OUTPUT], axis=-1),
    ]
    inits += [_init("fusion.w1", w1_sel), _init("fusion.b1", b1),
              _init("fusion.w2", st["net.2.weight"]), _init("fusion.b2", st["net.2.bias"])]
    names = [spec.modalities[j].name for j in present]
    graph = helper.make_graph(
        nodes, "fedmfs_personalised", [_modality_input(spec.modalities[j]) for j in present],
        [helper.make_tensor_value_info(FUSION_OUTPUT, TensorProto.FLOAT, ["batch", c])], inits)
    return _model(graph, f"fedmfs personalised model: {', '.join(names)} -> fusion ({m} x {c}, hidden {hidden})",
                  fedmfs_graph="personalised", modalities=",".join(names), fusion_hidden=hidden)


def model_set_onnx(
    spec: DatasetSpec,
    modality_states: Mapping[str, Mapping[str, np.ndarray]],
    fusion_state: Mapping[str, np.ndarray] | None,
    fusion_hidden: int | None = None,
) -> tuple[dict[str, bytes], bytes | None, bytes | None]:
    """ONNX bytes of a whole model set: (per-modality models, fusion model, coalition graph).

    ``modality_states`` may cover a subset of the spec's modalities (a client lacking some);
    unknown names are refused. Without a fusion state, both fusion graphs are None.
    """
    unknown = sorted(set(modality_states) - set(spec.names))
    if unknown:
        raise PayloadError(f"model states for unknown modalities {unknown}; the spec has {list(spec.names)}")
    models = {m.name: modality_model_onnx(m, spec.num_classes, modality_states[m.name])
              for m in spec.modalities if m.name in modality_states}
    if fusion_state is None:
        return models, None, None
    hidden = fusion_hidden if fusion_hidden is not None else fusion_hidden_of(fusion_state)
    n = len(spec.modalities)
    return (models, fusion_model_onnx(n, spec.num_classes, hidden, fusion_state),
            fusion_coalition_onnx(n, spec.num_classes, hidden, fusion_state))


def model_set_runtime(
    spec: DatasetSpec,
    modality_states: Mapping[str, Mapping[str, np.ndarray]],
    fusion_state: Mapping[str, np.ndarray] | None,
    fusion_hidden: int | None = None,
    threads: int = 1,
    personalised: bool = True,
    **runtime_options,
):
    """Build the model set's ONNX graphs in memory and open an :class:`~fedmfs.core.runtime.sessions.EdgeRuntime`.

    Includes the one-graph personalised model (prediction fast path) when there is a fusion state and
    ``personalised`` (Stage #1's scoring only needs the modality, fusion and coalition graphs: building
    and checking the one-graph model cost it 6-10 ms of its ~160 ms on headroom shapes);
    ``runtime_options`` go to the runtime (e.g. ``chunk_elements``, ``input_chunk_elements``).

    This is Stage #1's entry point: the round engine passes the freshly trained local states and
    the Stage #1 fusion state, then calls ``.shapley(...)`` on the result. Takes milliseconds.
    """
    from fedmfs.core.runtime.sessions import EdgeRuntime  # numpy + onnxruntime only

    models, fusion, coalitions = model_set_onnx(spec, modality_states, fusion_state, fusion_hidden)
    one_graph = (personalised_model_onnx(spec, modality_states, fusion_state, fusion_hidden)
                 if personalised and fusion_state is not None and modality_states else None)
    return EdgeRuntime(spec, models, fusion, threads=threads, coalition_model=coalitions,
                       personalised_model=one_graph, **runtime_options)
