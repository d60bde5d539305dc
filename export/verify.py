"""Check ONNX artefacts against PyTorch: the maximum absolute difference, random and real inputs.

Modality models are compared on log-probabilities (their output), the fusion model on class
probabilities (its ONNX output; PyTorch's log-probabilities exponentiated), the coalition graph
against the fusion graph on substituted rows. fp32 exports must agree within :data:`TOLERANCE`.
Training side: imports torch (through :mod:`fedmfs.learner.models`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from fedmfs.core.errors import FedMFSError
from fedmfs.core.modality import DatasetSpec, ModalitySpec
from fedmfs.core.runtime.sessions import session_options
from fedmfs.learner.models import FusionModel, ModalityModel, numpy_to_state

__all__ = ["TOLERANCE", "VerificationError", "ModelCheck", "verify_modality", "verify_fusion",
           "verify_coalitions", "verify_model_set", "random_modality_input"]

TOLERANCE = 1e-5


class VerificationError(FedMFSError):
    """An exported model disagrees with PyTorch beyond the tolerance."""

    exit_code = 6


@dataclass(frozen=True, slots=True)
class ModelCheck:
    """One model's check: max abs diff on random inputs and (if given) on real inputs."""

    name: str
    random_diff: float
    real_diff: float | None = None

    @property
    def max_diff(self) -> float:
        return max(self.random_diff, self.real_diff if self.real_diff is not None else 0.0)

    def ok(self, tolerance: float = TOLERANCE) -> bool:
        return self.max_diff <= tolerance


def _session(onnx_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(onnx_bytes, session_options(1), providers=["CPUExecutionProvider"])


def random_modality_input(spec: ModalitySpec, steps: int, batch: int, seed: int = 0) -> np.ndarray:
    """Standard-normal windows (batch, steps, *feature_shape), float32."""
    return np.random.default_rng(seed).standard_normal((batch, steps, *spec.feature_shape), dtype=np.float32)


def _modality_diff(model: ModalityModel, sess: ort.InferenceSession, spec: ModalitySpec, x: np.ndarray) -> float:
    x = np.ascontiguousarray(x, dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    (got,) = sess.run([spec.onnx_output], {spec.onnx_input: x})
    return float(np.abs(got - want).max())


def verify_modality(
    spec: ModalitySpec, num_classes: int, steps: int, state: Mapping[str, np.ndarray], onnx_bytes: bytes,
    real: np.ndarray | None = None, batches: tuple[int, ...] = (1, 7), seed: int = 0,
) -> ModelCheck:
    """Max abs diff of log-probabilities, ONNX Runtime vs :class:`ModalityModel`."""
    model = ModalityModel(spec, num_classes).eval()
    numpy_to_state(model, dict(state))
    sess = _session(onnx_bytes)
    rnd = max(_modality_diff(model, sess, spec, random_modality_input(spec, steps, b, seed + b)) for b in batches)
    got_real = _modality_diff(model, sess, spec, real) if real is not None and len(real) else None
    return ModelCheck(spec.name, rnd, got_real)


def _random_fusion_input(m: int, c: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, m, c)).astype(np.float32) * 2
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mask = rng.random((n, m)) < 0.7
    mask[:, 0] = True
    return probs.astype(np.float32), mask.astype(np.float32)


def _fusion_diff(model: FusionModel, sess: ort.InferenceSession, probs: np.ndarray, mask: np.ndarray) -> float:
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(probs), torch.from_numpy(mask)).exp().numpy()
    (got,) = sess.run(["class_probs"], {"probs": probs, "mask": mask})
    return float(np.abs(got - want).max())


def verify_fusion(
    num_modalities: int, num_classes: int, hidden: int, state: Mapping[str, np.ndarray], onnx_bytes: bytes,
    real: tuple[np.ndarray, np.ndarray] | None = None, batches: tuple[int, ...] = (1, 7), seed: int = 0,
) -> ModelCheck:
    """Max abs diff of class probabilities, ONNX Runtime vs exp(:class:`FusionModel`)."""
    model = FusionModel(num_modalities, num_classes, hidden).eval()
    numpy_to_state(model, dict(state))
    sess = _session(onnx_bytes)
    rnd = max(_fusion_diff(model, sess, *_random_fusion_input(num_modalities, num_classes, b, seed + b))
              for b in batches)
    got_real = _fusion_diff(model, sess, *real) if real is not None else None
    return ModelCheck("fusion", rnd, got_real)


def verify_coalitions(fusion_bytes: bytes, coalition_bytes: bytes, num_modalities: int, num_classes: int,
                      seed: int = 0) -> ModelCheck:
    """Max abs diff between the coalition graph and the fusion graph on the same substituted rows."""
    m, c = num_modalities, num_classes
    x, _ = _random_fusion_input(m, c, 3, seed)
    bg, _ = _random_fusion_input(m, c, 4, seed + 1)
    mask = np.ones(m, dtype=np.float32)
    mask[m // 2] = 0.0 if m > 1 else 1.0
    coal = (np.random.default_rng(seed).random((5, m)) < 0.5).astype(np.float32)
    (got,) = _session(coalition_bytes).run(["coalition_probs"], {"x_probs": x, "bg_probs": bg, "mask": mask,
                                                                 "coalitions": coal})
    rows = np.where(coal[:, None, None, :, None] > 0, x[None, :, None], bg[None, None, :])
    (want,) = _session(fusion_bytes).run(["class_probs"], {
        "probs": np.ascontiguousarray(rows.reshape(-1, m, c)),
        "mask": np.ascontiguousarray(np.broadcast_to(mask, (rows.shape[0] * 3 * 4, m)))})
    return ModelCheck("coalitions", float(np.abs(got.reshape(-1, c) - want).max()))


def verify_model_set(
    spec: DatasetSpec,
    modality_states: Mapping[str, Mapping[str, np.ndarray]],
    modality_models: Mapping[str, bytes],
    fusion_state: Mapping[str, np.ndarray] | None = None,
    fusion_hidden: int | None = None,
    fusion_model: bytes | None = None,
    coalition_model: bytes | None = None,
    real_x: Mapping[str, np.ndarray] | None = None,
) -> list[ModelCheck]:
    """Check every model of a set; ``real_x`` (per-modality windows) adds real-input diffs, and the
    fusion model is then also checked on the real modality probabilities."""
    checks = []
    real_x = real_x or {}
    for ms in spec.modalities:
        if ms.name not in modality_models:
            continue
        checks.append(verify_modality(ms, spec.num_classes, spec.steps, modality_states[ms.name],
                                      modality_models[ms.name], real_x.get(ms.name)))
    if fusion_model is not None and fusion_state is not None:
        m = len(spec.modalities)
        hidden = fusion_hidden or int(np.shape(fusion_state["net.0.weight"])[0])
        real = None
        present = [ms for ms in spec.modalities if ms.name in real_x and ms.name in modality_models]
        if present:
            n = len(real_x[present[0].name])
            probs = np.zeros((n, m, spec.num_classes), np.float32)
            mask = np.zeros((n, m), np.float32)
            for ms in present:
                (logp,) = _session(modality_models[ms.name]).run(
                    [ms.onnx_output], {ms.onnx_input: np.ascontiguousarray(real_x[ms.name], dtype=np.float32)})
                probs[:, spec.index(ms.name)] = np.exp(logp)
                mask[:, spec.index(ms.name)] = 1.0
            real = (probs, mask)
        checks.append(verify_fusion(m, spec.num_classes, hidden, fusion_state, fusion_model, real))
        if coalition_model is not None:
            checks.append(verify_coalitions(fusion_model, coalition_model, m, spec.num_classes))
    return checks
