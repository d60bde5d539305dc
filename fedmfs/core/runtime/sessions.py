"""The on-device runtime: ONNX Runtime sessions for the modality models and the fusion model.

Loading and checking the models (:func:`read_model`, :func:`open_session`, :func:`check_io`) and
inference (:class:`EdgeRuntime`: modality probabilities, fusion, prediction with the personalised
model and its one-graph fast path). Modality-level Shapley values are :meth:`EdgeRuntime.shapley`,
computed by :mod:`fedmfs.core.runtime.scoring`; heap and page management is
:mod:`fedmfs.core.runtime.memory`. numpy and onnxruntime only: nothing here (nor in the fedmfs
modules it imports) pulls in torch, so an inference-only device install needs no training stack.
``tests/core/runtime/test_runtime_torchfree.py`` proves it.

Absent modalities: a client lacking modality m passes no ``x[m]``; its probabilities are zeros and
its mask entry False (the fusion model multiplies them away and sees the mask).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fedmfs.core.errors import ConfigError, DataError, ManifestError, PayloadError
from fedmfs.core.modality import DatasetSpec
from fedmfs.core.runtime import scoring
from fedmfs.core.runtime.coalitions import DEFAULT_CHUNK_ELEMENTS, ShapleyMethod, ShapleyResult
from fedmfs.core.runtime.memory import TRIM_BETWEEN_CALLS, TRIM_MIN_FREE, drop_pages, release_free_heap

__all__ = [
    "DEFAULT_INPUT_CHUNK_ELEMENTS",
    "EdgeRuntime",
    "ModelSource",
    "check_io",
    "open_session",
    "read_model",
    "session_options",
]

ModelSource = bytes | str | os.PathLike
_FUSION_IN = ("probs", "mask")
_FUSION_OUT = "class_probs"
_COALITION_IN = ("x_probs", "bg_probs", "mask", "coalitions")
_COALITION_OUT = "coalition_probs"

# Bound on the float32 elements ORT allocates in one modality-model call (its time-major copy of the
# input and the LSTM workspace, see EdgeRuntime._rows_per_call): 2^18 = 1 MiB, i.e. 1 tactile window
# of 100 x 32 x 32 per call on ActionSense shapes, 8 eye windows (at 2^19, 3 tactile windows, the
# modality step's peak RSS was 4-5 MB higher at about the same CPU time: docs/deploy.md).
DEFAULT_INPUT_CHUNK_ELEMENTS = 1 << 18


def session_options(threads: int) -> ort.SessionOptions:
    """Session options for a small shared device: ``threads`` intra-op threads, no inter-op pool,
    no spinning (a spinning pool burns the CPU the trainer and the MQTT client need), and memory
    returned after each call rather than cached in an arena."""
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no arena and no memory-pattern pre-planning: both keep the largest activations ever seen
    # (the transposed tactile windows) allocated for the session's life; a device wants them back
    so.enable_cpu_mem_arena = False
    so.enable_mem_pattern = False
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def read_model(source: ModelSource, what: str) -> bytes:
    """The ONNX bytes of ``source`` (bytes as they are, or a file's contents); ``what`` names it in errors."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    p = Path(source)
    try:
        return p.read_bytes()
    except OSError as e:
        raise ManifestError(f"{what}: cannot read {p}: {e}") from e


def open_session(source: ModelSource, what: str, so: ort.SessionOptions) -> ort.InferenceSession:
    """A CPU inference session on ``source``; PayloadError when it is no loadable ONNX model."""
    data = read_model(source, what)
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...) for bad bytes
        raise PayloadError(f"{what}: not a loadable ONNX model: {e}") from e


def check_io(sess: ort.InferenceSession, what: str, inputs: dict[str, tuple], outputs: dict[str, tuple | None]) -> None:
    """Check input/output names and static dims (strings/None are dynamic and match anything; a
    wanted shape None: any rank)."""
    problems = []
    # inputs with a default value (overridable initializers) are inputs too
    feeds = list(sess.get_inputs()) + list(sess.get_overridable_initializers())
    for kind, have, want in (("input", feeds, inputs), ("output", sess.get_outputs(), outputs)):
        got = {a.name: tuple(a.shape) for a in have}
        if set(got) != set(want):
            problems.append(f"{kind}s are {sorted(got)}, need {sorted(want)}")
            continue
        for name, shape in want.items():
            g = got[name]
            if shape is None:
                continue
            if len(g) != len(shape) or any(isinstance(w, int) and isinstance(d, int) and d != w
                                           for d, w in zip(g, shape, strict=True)):
                problems.append(f"{kind} {name!r} has shape {list(g)}, need {list(shape)}")
    if problems:
        raise PayloadError(f"{what} does not fit the dataset spec: " + "; ".join(problems))


class _OnDemand(Mapping[str, ort.InferenceSession]):
    """Checked ONNX models kept as their bytes: each lookup opens a new session on one, which lives
    as long as the caller holds it (``name in`` and iteration do not open anything)."""

    def __init__(self, so: ort.SessionOptions):
        self._so = so
        self._models: dict[str, tuple[bytes, str]] = {}

    def add(self, name: str, data: bytes, what: str) -> None:
        self._models[name] = (data, what)

    def __getitem__(self, name: str) -> ort.InferenceSession:
        data, what = self._models[name]
        return open_session(data, what, self._so)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)


class EdgeRuntime:
    """ONNX Runtime sessions for one device's model set.

    ``modality_models`` maps modality names (a subset of the spec's) to ONNX bytes or paths;
    ``fusion_model`` is the fusion graph (None: ``modality_probs`` only); ``coalition_model`` the
    optional coalition graph of :func:`fedmfs.core.runtime.graphs.fusion_coalition_onnx` that makes
    Shapley values cheap (without it :mod:`fedmfs.core.runtime.scoring` evaluates coalitions through
    the fusion graph on materialised rows, with equal results). ``threads`` is ONNX Runtime's intra-op
    thread count.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        modality_models: Mapping[str, ModelSource],
        fusion_model: ModelSource | None = None,
        threads: int = 1,
        coalition_model: ModelSource | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        personalised_model: ModelSource | None = None,
        input_chunk_elements: int = DEFAULT_INPUT_CHUNK_ELEMENTS,
        shapley_engine: str = "tiled",
    ):
        self.spec = spec
        self.threads = threads
        # "tiled" (the default) or "split" (needs a coalition graph with the split role). split skips
        # the dense second layer for hidden units whose ReLU is on (off) over every row of a coalition:
        # 1.8x faster than tiled on near-uniform modality outputs, 4x slower on the sharp outputs of
        # trained models (measured at 50 + 50 samples, M = 10; docs/benchmarks.md): not the default
        if shapley_engine not in ("tiled", "split"):
            raise ConfigError(f"shapley_engine must be 'tiled' or 'split', got {shapley_engine!r}")
        self.shapley_engine = shapley_engine
        self.chunk_elements = int(chunk_elements)
        if input_chunk_elements < 1:
            raise ConfigError(f"input_chunk_elements must be >= 1, got {input_chunk_elements}")
        self.input_chunk_elements = int(input_chunk_elements)
        unknown = sorted(set(modality_models) - set(spec.names))
        if unknown:
            raise ManifestError(f"models for unknown modalities {unknown}; the spec has {list(spec.names)}")
        so = session_options(threads)
        c, m = spec.num_classes, len(spec.modalities)
        # each modality model is checked now, then kept as its bytes and opened only while it runs
        # (_modality_logp): six open sessions held 14 MB on ActionSense shapes, opening one takes 1-2 ms
        self._sessions = _OnDemand(so)
        self._tails = {ms.name: (spec.steps, *ms.feature_shape) for ms in spec.modalities}
        self._inputs = {ms.name: ms.onnx_input for ms in spec.modalities}
        for ms in spec.modalities:
            if ms.name not in modality_models:
                continue
            what = f"modality model {ms.name!r}"
            data = read_model(modality_models[ms.name], what)
            sess = open_session(data, what, so)
            check_io(sess, what, {ms.onnx_input: (None, None, *ms.feature_shape)}, {ms.onnx_output: (None, c)})
            del sess
            self._sessions.add(ms.name, data, what)
        release_free_heap()
        self._fusion = None
        if fusion_model is not None:
            self._fusion = open_session(fusion_model, "fusion model", so)
            check_io(self._fusion, "fusion model", {"probs": (None, m, c), "mask": (None, m)},
                      {_FUSION_OUT: (None, c)})
        self._coalitions = None
        self._coalition_hidden = 0
        self._coalition_tiles = False
        self._coalition_split = False
        if coalition_model is not None:
            # the coalition graph's calls allocate and free the same few multi-MB buffers thousands of
            # times per Shapley call; without an arena every call faulted them in afresh (measured
            # 3x slower on the split role's 1.2 MB tiles), so this session keeps an arena, and
            # scoring shrinks it back after each Shapley call (shrink_coalition_arena)
            cso = session_options(threads)
            cso.enable_cpu_mem_arena = True
            self._coalitions = open_session(coalition_model, "coalition graph", cso)
            meta = self._coalitions.get_modelmeta().custom_metadata_map
            # a graph with the terms and tile roles (graphs.fusion_coalition_onnx, tiles=True) lists
            # its inputs as overridable initializers (each has an empty default)
            # (graphs built before the split role: "fusion_coalition_tiles"; with it: "fusion_coalition_split")
            self._coalition_split = meta.get("fedmfs_graph") == "fusion_coalition_split"
            self._coalition_tiles = self._coalition_split or meta.get("fedmfs_graph") == "fusion_coalition_tiles"
            coalition_io = {"x_probs": (None, m, c), "bg_probs": (None, m, c), "mask": (m,), "coalitions": (None, m)}
            coalition_out: dict[str, tuple | None] = {"coalition_probs": (None, None, None, c)}
            if self._coalition_tiles:
                coalition_io.update(tile_pre=(None, None, None, None), tile_shared=(None, None, None),
                                    tile_onehot=(None, c, None))
                coalition_out.update(x_terms=(m, None, None), bg_terms=(m, None, None), const_term=(None,),
                                     tile_logits=(None, None, None, c), tile_sums=(None, None, None, 1),
                                     tile_prob=(None, None, 1, c), tile_loglik=(None, None, 1))
            if self._coalition_split:
                coalition_io.update(split_a=(None, None, None, 1), split_c=(None, None, 1, None),
                                    split_w=(None, c, None), split_la=(None, c, None, 1), split_lc=(None, c, 1, None),
                                    split_onehot=(1, c, None, 1), split_prob_mode=(1,))
                coalition_out.update(split_value=None, split_sums=(None, 1, None, None),
                                     split_logits=(None, c, None, None), out_weight=(None, c), out_bias=(c,))
            check_io(self._coalitions, "coalition graph", coalition_io, coalition_out)
            # the hidden width sizes the chunks (the builder records it; 256 is a safe default)
            try:
                self._coalition_hidden = max(1, int(meta.get("fusion_hidden", "256")))
            except ValueError as e:
                raise PayloadError(f"coalition graph: bad fusion_hidden metadata {meta.get('fusion_hidden')!r}") from e
        # the one-graph model is checked now but kept as bytes and opened on the first predict that
        # can use it: its session holds a second copy of every modality model's weights (+7 MB on
        # ActionSense shapes), which a process that only scores modalities never needs; it stays open
        # for the next predicts (batch-1 latency) until a call runs the modality models
        self._personalised: ort.InferenceSession | None = None
        self._personalised_bytes: bytes | None = None
        self._personalised_names: tuple[str, ...] = ()
        if personalised_model is not None:
            self._personalised_bytes = read_model(personalised_model, "personalised model")
            sess = open_session(self._personalised_bytes, "personalised model", so)
            by_input = {ms.onnx_input: ms for ms in spec.modalities}
            got = [a.name for a in sess.get_inputs()]
            foreign = [g for g in got if g not in by_input]
            if foreign or not got:
                raise PayloadError(f"personalised model has inputs {got}; each must be a modality input "
                                   f"of the spec ({', '.join(by_input)})")
            names = tuple(ms.name for ms in spec.modalities if ms.onnx_input in got)
            check_io(sess, "personalised model",
                      {spec[k].onnx_input: (None, None, *spec[k].feature_shape) for k in names},
                      {_FUSION_OUT: (None, c)})
            del sess
            release_free_heap()
            self._personalised_names = names
            self._personalised_set = frozenset(names)
            self._personalised_row = sum(spec.steps * spec[k].features for k in names)
            # large batches may take the chunked per-modality path only when every model is there
            self._personalised_chunked = all(k in self._sessions for k in names)
            self._session_options = so

    def shrink_coalition_arena(self) -> None:
        """Give the coalition session's arena memory back (one empty call that shrinks it)."""
        if self._coalitions is None:
            return
        m, c = len(self.spec.modalities), self.spec.num_classes
        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        one = {"x_probs": np.zeros((1, m, c), np.float32), "bg_probs": np.zeros((1, m, c), np.float32),
               "mask": np.zeros(m, np.float32), "coalitions": np.zeros((1, m), np.float32)}
        self._coalitions.run([_COALITION_OUT], one, run_options=ro)

    # ------------------------------------------------------------------ properties
    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities this runtime has a model for, in the spec's canonical order."""
        return tuple(n for n in self.spec.names if n in self._sessions)

    @property
    def has_fusion(self) -> bool:
        return self._fusion is not None

    @property
    def has_coalition_graph(self) -> bool:
        return self._coalitions is not None

    @property
    def personalised_modalities(self) -> tuple[str, ...]:
        """Modalities of the one-graph personalised model (empty without one): :meth:`predict`
        uses it when given exactly these modalities."""
        return self._personalised_names

    # ------------------------------------------------------------------ inference
    def _check(self, name: str, arr: object, need_session: bool = True) -> tuple[np.ndarray | None, str | None]:
        """One modality's windows, numeric (N, T, *feature_shape) and finite, or the reason they
        are refused. Not converted: callers take float32 row chunks (views when already float32)."""
        if name not in self.spec.names:
            return None, f"unknown modality {name!r} (the spec has {', '.join(self.spec.names)})"
        if need_session and name not in self._sessions:
            return None, f"no model for modality {name!r} (models: {', '.join(self.modalities) or 'none'})"
        a = arr if isinstance(arr, np.memmap) else np.asarray(arr)  # a memmap stays one: drop_pages
        want = (self.spec.steps, *self.spec[name].feature_shape)
        if a.ndim != len(want) + 1 or tuple(a.shape[1:]) != want:
            return None, f"{name} must have shape (N, {', '.join(map(str, want))}), got {a.shape}"
        if a.dtype.kind not in "fiu":
            return None, f"{name} must be numeric, got {a.dtype}"
        # checked (and later converted to float32) a row chunk at a time: no whole-array temporaries
        if a.dtype.kind == "f":
            rows = self._rows_per_call(name)
            for i in range(0, a.shape[0], rows):
                finite = np.isfinite(a[i:i + rows]).all()
                drop_pages(a)
                if not finite:
                    return None, f"{name} has NaN or infinite values"
        return a, None

    def _plain_finite(self, name: str, a: object) -> bool:
        """Fast path of :meth:`_check` for batch-1 prediction: True when ``a`` is already a
        C-contiguous float32 array of the right shape, small enough for one call, and finite
        (anything else goes through :meth:`_check`, which says what is wrong). Saves ~20 us of the
        ~0.9 ms batch-1 latency on ActionSense shapes."""
        return (type(a) is np.ndarray and a.dtype == np.float32 and a.shape[1:] == self._tails[name]
                and a.ndim == len(self._tails[name]) + 1 and a.size <= self.input_chunk_elements
                and a.flags.c_contiguous and bool(np.isfinite(a).all()))

    def _rows_per_call(self, name: str) -> int:
        """Rows of modality ``name`` per session call, so that the float32 elements ORT holds per
        call stay within ``input_chunk_elements``: per row, T x F for the time-major copy of the
        input plus T x 5H for the LSTM's gate pre-activations (4H) and its hidden states (H)."""
        ms = self.spec[name]
        per_row = self.spec.steps * (ms.features + 5 * ms.hidden)
        return max(1, self.input_chunk_elements // per_row)

    def _modality_logp(self, name: str, a: np.ndarray, out: np.ndarray) -> None:
        """Write modality ``name``'s probabilities for the rows of ``a`` into ``out`` (N, C), one
        session call per row chunk. Chunks of float32 C-contiguous input are views, not copies."""
        sess, ms = self._sessions[name], self.spec[name]   # opened for this call, closed after it
        rows = self._rows_per_call(name)
        # ORT's per-call buffers (~1.5 MB for 3 tactile windows) come from the heap once glibc's
        # dynamic mmap threshold has risen, and fragment it: without trims the heap grew by about
        # that much per call (+20 MB over 50 tactile windows). A trim after every call doubled
        # the modality time (the trimmed pages fault back in), so: one trim per ~12 MiB of calls.
        trim_every = max(1, TRIM_BETWEEN_CALLS // (4 * self.input_chunk_elements))
        for j, i in enumerate(range(0, a.shape[0], rows)):
            chunk = np.ascontiguousarray(a[i:i + rows], dtype=np.float32)
            (logp,) = sess.run([ms.onnx_output], {ms.onnx_input: chunk})
            del chunk
            drop_pages(a)
            if j % trim_every == trim_every - 1 and i + rows < a.shape[0]:
                release_free_heap()
            np.exp(logp, out=out[i:i + rows])

    def _run_modalities(self, x: Mapping[str, np.ndarray], what: str) -> tuple[np.ndarray, np.ndarray]:
        """One session call per present modality; (N, M, C) probabilities + mask (M,).

        Modalities are fetched from ``x`` one at a time and dropped after their call, so a lazy
        mapping (e.g. windows spooled on disk, one file per modality) keeps only one modality's
        windows in memory, and each modality model runs on row chunks (:meth:`_rows_per_call`),
        so ORT's copies are bounded too: on ActionSense shapes that is what keeps peak RSS under
        100 MB. Every problem is collected and reported together."""
        if not isinstance(x, Mapping):
            raise DataError(f"{what} must map modality names to arrays, got {type(x).__name__}")
        if self._personalised is not None:   # the modality models run now: close the one-graph model
            self._personalised = None
            release_free_heap()
        m, c = len(self.spec.modalities), self.spec.num_classes
        problems: list[str] = []
        probs: np.ndarray | None = None
        mask = np.zeros(m, dtype=bool)
        n = None
        names = list(x.keys())
        for name in names:
            if name not in self.spec.names or name not in self._sessions:
                problems.append(self._check(name, None)[1] or f"no model for modality {name!r}")
        for j, ms in enumerate(self.spec.modalities):
            if ms.name not in names or ms.name not in self._sessions:
                continue
            a, why = self._check(ms.name, x[ms.name])
            if why or a is None:
                problems.append(why or f"{ms.name} was refused")
                continue
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                problems.append(f"{ms.name} has {a.shape[0]} samples, other modalities {n}")
                continue
            if problems:
                continue  # still check the rest, but do not spend time running models
            if probs is None:
                probs = np.zeros((int(n), m, c), dtype=np.float32)
            col = np.empty((int(n), c), dtype=np.float32)
            self._modality_logp(ms.name, a, col)
            big = a.nbytes >= TRIM_MIN_FREE
            del a
            if big:  # this modality's windows and ORT's copies of them are gone: give them back
                release_free_heap()
            probs[:, j] = col
            mask[j] = True
        if not problems and not mask.any():
            problems.append("no modality given")
        if problems or probs is None:
            raise DataError(f"{what}: " + "; ".join(problems))
        return probs, mask

    def modality_probs(self, x: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Each modality model's class probabilities (N, M, C) float32 over all the spec's modalities
        (canonical order; absent ones are zeros) and the presence mask (M,) bool."""
        return self._run_modalities(x, "modality_probs input")

    def fuse(self, probs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The fusion model's class probabilities (N, C) for modality probabilities (N, M, C) and a
        mask (M,) shared by all rows or (N, M) per row."""
        if self._fusion is None:
            raise ManifestError("this model set has no fusion model")
        m, c = len(self.spec.modalities), self.spec.num_classes
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        if probs.ndim != 3 or probs.shape[1:] != (m, c):
            raise DataError(f"probs must have shape (N, {m}, {c}), got {probs.shape}")
        mask = np.asarray(mask, dtype=np.float32)
        if mask.shape == (m,):
            mask = np.broadcast_to(mask, (probs.shape[0], m))
        if mask.shape != (probs.shape[0], m):
            raise DataError(f"mask must have shape ({m},) or ({probs.shape[0]}, {m}), got {mask.shape}")
        (out,) = self._fusion.run([_FUSION_OUT], {"probs": probs, "mask": np.ascontiguousarray(mask)})
        return out

    def predict(self, x: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class probabilities (N, C) of the personalised model (modality models + fusion).

        With a personalised graph and exactly its modalities given, small batches (inputs within
        ``input_chunk_elements``) take ONE session call; otherwise (large batches, other
        modality sets) the modality models run one at a time in row chunks, then the fusion
        model. Both give the same function (tests: within 1e-5)."""
        if self._personalised_names and isinstance(x, Mapping) and x.keys() == self._personalised_set:
            out = self._predict_one_graph(x)
            if out is not None:
                return out
        return self.fuse(*self.modality_probs(x))

    def _predict_one_graph(self, x: Mapping[str, np.ndarray]) -> np.ndarray | None:
        """The personalised graph on ``x``, or None when the batch is too large for one call (the
        caller then takes the chunked path; arrays already fetched are simply fetched again)."""
        names = self._personalised_names
        feeds: dict[str, np.ndarray] = {}
        problems: list[str] = []
        n = None
        for k in names:
            a = x[k]
            if n is None and self._personalised_chunked and isinstance(a, np.ndarray) and a.ndim \
                    and a.shape[0] * self._personalised_row > self.input_chunk_elements:
                return None  # too large for one call: do not validate (read) it twice
            if (n is None or (type(a) is np.ndarray and a.shape[:1] == (n,))) and self._plain_finite(k, a):
                n = a.shape[0]
                feeds[self._inputs[k]] = a
                continue
            checked, why = self._check(k, a, need_session=False)
            if why or checked is None:
                problems.append(why or f"{k} was refused")
                continue
            if n is None:
                n = checked.shape[0]
                if n * self._personalised_row > self.input_chunk_elements and self._personalised_chunked:
                    return None
            elif checked.shape[0] != n:
                problems.append(f"{k} has {checked.shape[0]} samples, other modalities {n}")
                continue
            feeds[self.spec[k].onnx_input] = np.ascontiguousarray(checked, dtype=np.float32)
        if problems:
            raise DataError("predict input: " + "; ".join(problems))
        if self._personalised is None:
            assert self._personalised_bytes is not None, "a personalised model is opened from its bytes"
            self._personalised = open_session(self._personalised_bytes, "personalised model", self._session_options)
        return self._personalised.run([_FUSION_OUT], feeds)[0]

    # ------------------------------------------------------------------ Shapley
    def shapley(
        self,
        x: Mapping[str, np.ndarray],
        background_x: Mapping[str, np.ndarray],
        kind: str = "prob",
        y: np.ndarray | None = None,
        method: ShapleyMethod | str = "auto",
        permutations: int = 64,
        seed: int = 0,
    ) -> ShapleyResult:
        """Modality-level Shapley values of the explained samples ``x`` against ``background_x``
        (see :func:`fedmfs.core.runtime.scoring.runtime_shapley`). ``x`` and ``background_x`` must
        hold the same modalities: the client's present ones are the players."""
        return scoring.runtime_shapley(self, x, background_x, kind, y, method, permutations, seed)

    def shapley_from_probs(
        self,
        x_probs: np.ndarray,
        bg_probs: np.ndarray,
        mask: np.ndarray,
        kind: str = "prob",
        y: np.ndarray | None = None,
        method: ShapleyMethod | str = "auto",
        permutations: int = 64,
        seed: int = 0,
    ) -> ShapleyResult:
        """Shapley values from modality probabilities already computed: x (N,M,C), background
        (B,M,C), the client's mask (M,) bool (see :func:`fedmfs.core.runtime.scoring.shapley_from_probs`).
        Same semantics as :meth:`shapley`."""
        return scoring.shapley_from_probs(self, x_probs, bg_probs, mask, kind, y, method, permutations, seed)
