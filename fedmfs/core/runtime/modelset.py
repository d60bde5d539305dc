"""Model-set directories: the ONNX artefacts a device runs, with a manifest that pins them.

Layout of a model-set directory::

    manifest.json              {"format": "fedmfs-onnx-modelset", "version": 1, "spec": {...},
                                "modalities": {"<name>": ENTRY, ...}, "fusion": ENTRY | null,
                                "coalitions": ENTRY | null, "personalised": ENTRY | null}
    <modality>.onnx            one per modality model the device has
    fusion.onnx                the personalised fusion model (optional)
    fusion_coalitions.onnx     its coalition graph, the Shapley fast path (optional)
    personalised.onnx          modality models + fusion in one graph, the prediction fast path
                               (optional; manifests without the key read as null)

    ENTRY = {"file": "eye.onnx", "sha256": "<hex>", "bytes": 12345, "version": 7, "codec": "fp32"}

``version`` is the caller's (e.g. the round of the global model a modality model came from).
Every file is written atomically (temp file, fsync, rename); the manifest is written last, so a
reader sees either the old set or the new one -- or, after a crash between the two, a sha256
mismatch that :func:`load_model_set` reports rather than a silently mixed set. numpy-free, torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedmfs.core.errors import ManifestError
from fedmfs.core.fsio import atomic_write, read_spec_document
from fedmfs.core.modality import DatasetSpec

__all__ = [
    "MANIFEST",
    "MODELSET_FORMAT",
    "MODELSET_VERSION",
    "FileEntry",
    "Manifest",
    "atomic_write",
    "check_model_set",
    "load_model_set",
    "read_manifest",
    "write_model_set",
]

MANIFEST = "manifest.json"
MODELSET_FORMAT = "fedmfs-onnx-modelset"
MODELSET_VERSION = 1
FUSION_FILE = "fusion.onnx"
COALITIONS_FILE = "fusion_coalitions.onnx"
PERSONALISED_FILE = "personalised.onnx"


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One artefact as the manifest pins it."""

    file: str
    sha256: str
    bytes: int
    version: int = 0
    codec: str = "fp32"

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "bytes": self.bytes, "version": self.version,
                "codec": self.codec}


@dataclass(frozen=True, slots=True)
class Manifest:
    spec: DatasetSpec
    modalities: dict[str, FileEntry]
    fusion: FileEntry | None
    coalitions: FileEntry | None
    personalised: FileEntry | None = None

    def entries(self) -> dict[str, FileEntry]:
        """All entries by role: modality names, then "fusion", "coalitions" and "personalised" if
        present."""
        out = {f"modality {k}": v for k, v in self.modalities.items()}
        for role in ("fusion", "coalitions", "personalised"):
            e = getattr(self, role)
            if e:
                out[role] = e
        return out


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory; the renames are still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_set(
    directory: str | os.PathLike,
    spec: DatasetSpec,
    modality_models: Mapping[str, bytes],
    fusion_model: bytes | None = None,
    coalition_model: bytes | None = None,
    versions: Mapping[str, int] | None = None,
    codecs: Mapping[str, str] | None = None,
    personalised_model: bytes | None = None,
) -> Path:
    """Write ONNX bytes and the manifest into ``directory`` (created if needed); returns it.

    ``versions`` and ``codecs`` are keyed by modality name, "fusion", "coalitions" and
    "personalised" (default 0 and "fp32"). ``personalised_model`` is the one-graph model of
    :func:`fedmfs.core.runtime.graphs.personalised_model_onnx`. ONNX files of an earlier set that the
    new manifest does not list are removed.
    """
    unknown = sorted(set(modality_models) - set(spec.names))
    if unknown:
        raise ManifestError(f"models for unknown modalities {unknown}; the spec has {list(spec.names)}")
    if coalition_model is not None and fusion_model is None:
        raise ManifestError("a coalition graph without its fusion model makes no sense")
    if personalised_model is not None and fusion_model is None:
        raise ManifestError("a personalised model without its fusion model makes no sense")
    versions, codecs = dict(versions or {}), dict(codecs or {})
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def put(role: str, name: str, data: bytes) -> FileEntry:
        atomic_write(d / name, data)
        return FileEntry(name, hashlib.sha256(data).hexdigest(), len(data), int(versions.get(role, 0)),
                         str(codecs.get(role, "fp32")))

    mods = {n: put(n, f"{n}.onnx", bytes(modality_models[n])) for n in spec.names if n in modality_models}
    fusion = put("fusion", FUSION_FILE, bytes(fusion_model)) if fusion_model is not None else None
    coal = put("coalitions", COALITIONS_FILE, bytes(coalition_model)) if coalition_model is not None else None
    pers = (put("personalised", PERSONALISED_FILE, bytes(personalised_model))
            if personalised_model is not None else None)
    doc = {
        "format": MODELSET_FORMAT,
        "version": MODELSET_VERSION,
        "spec": spec.to_dict(),
        "modalities": {k: v.to_dict() for k, v in mods.items()},
        "fusion": fusion.to_dict() if fusion else None,
        "coalitions": coal.to_dict() if coal else None,
        "personalised": pers.to_dict() if pers else None,
    }
    atomic_write(d / MANIFEST, (json.dumps(doc, indent=2) + "\n").encode())
    keep = {e.file for e in mods.values()} | {e.file for e in (fusion, coal, pers) if e}
    for stale in d.glob("*.onnx"):
        if stale.name not in keep:
            stale.unlink()
    _fsync_dir(d)
    return d


def _entry(raw: object, where: str, problems: list[str]) -> FileEntry | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: entry must be an object, got {type(raw).__name__}")
        return None
    try:
        e = FileEntry(str(raw["file"]), str(raw["sha256"]), int(raw["bytes"]), int(raw.get("version", 0)),
                      str(raw.get("codec", "fp32")))
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"{where}: entry needs file, sha256 and bytes ({exc!r})")
        return None
    if "/" in e.file or "\\" in e.file or e.file.startswith(".") or not e.file.endswith(".onnx"):
        problems.append(f"{where}: file name {e.file!r} must be a plain '*.onnx' name inside the directory")
        return None
    return e


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Parse and validate ``manifest.json`` (not the files; see :func:`check_model_set`)."""
    d = Path(directory)
    mp = d / MANIFEST
    doc, spec = read_spec_document(mp, MODELSET_FORMAT, MODELSET_VERSION, ManifestError, "a model set")
    problems: list[str] = []
    raw_mods = doc.get("modalities")
    if not isinstance(raw_mods, dict):
        raise ManifestError(f"{mp}: 'modalities' must be an object mapping modality names to entries")
    mods = {}
    for name, raw in raw_mods.items():
        if name not in spec.names:
            problems.append(f"modality {name!r} is not in the spec ({', '.join(spec.names)})")
            continue
        e = _entry(raw, f"modality {name!r}", problems)
        if e:
            mods[name] = e
    fusion = _entry(doc["fusion"], "fusion", problems) if doc.get("fusion") is not None else None
    coal = _entry(doc["coalitions"], "coalitions", problems) if doc.get("coalitions") is not None else None
    pers = _entry(doc["personalised"], "personalised", problems) if doc.get("personalised") is not None else None
    if pers is not None and fusion is None:
        problems.append("personalised: listed without a fusion model")
    if problems:
        raise ManifestError(f"{mp}: " + "; ".join(problems))
    return Manifest(spec, mods, fusion, coal, pers)


def check_model_set(directory: str | os.PathLike) -> tuple[Manifest, dict[str, bytes]]:
    """Read the manifest and every file it lists; verify sizes and sha256.

    Raises :class:`ManifestError` listing every missing file and every mismatch at once.
    Returns the manifest and the verified bytes keyed by role ("modality <name>", "fusion",
    "coalitions", "personalised"), so nothing is read twice (no check-then-use race with a writer)."""
    d = Path(directory)
    man = read_manifest(d)
    problems, blobs = [], {}
    for role, e in man.entries().items():
        p = d / e.file
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            problems.append(f"{role}: {e.file} is missing")
            continue
        except OSError as exc:
            problems.append(f"{role}: {e.file} is unreadable ({exc})")
            continue
        if len(data) != e.bytes:
            problems.append(f"{role}: {e.file} has {len(data)} bytes, the manifest says {e.bytes}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != e.sha256:
            problems.append(f"{role}: {e.file} sha256 {digest[:12]}... does not match the manifest's {e.sha256[:12]}...")
        blobs[role] = data
    if problems:
        raise ManifestError(f"model set {d} does not match its manifest: " + "; ".join(problems))
    return man, blobs


def load_model_set(directory: str | os.PathLike, threads: int = 1):
    """Verify a model-set directory and open an :class:`~fedmfs.core.runtime.sessions.EdgeRuntime` on it."""
    from fedmfs.core.runtime.sessions import EdgeRuntime

    man, blobs = check_model_set(directory)
    return EdgeRuntime(
        man.spec,
        {name: blobs[f"modality {name}"] for name in man.modalities},
        blobs.get("fusion"),
        threads=threads,
        coalition_model=blobs.get("coalitions"),
        personalised_model=blobs.get("personalised"),
    )
