"""The self-describing model artifact: ``model.pt`` (plain state_dict) + ``model.json``.

Everything a server needs to rebuild and use the model travels in ``model.json``:
architecture, class names, preprocessing spec, temperature, threshold, top-k.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from returns_model.export import INT8_FILE
from returns_model.fileio import atomic_open, write_json
from returns_model.names import META_FILE, MODEL_NAME, WEIGHTS_FILE
from returns_model.network import ArchConfig, SEResNet, build_model
from returns_model.preprocess import PreprocessSpec

FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """The model folder is missing a file or its metadata does not fit its weights."""


@dataclass
class ModelMeta:
    arch: ArchConfig
    class_names: list[str]
    preprocess: PreprocessSpec
    temperature: float
    threshold: float
    target_precision: float
    top_k: int = 3
    model_name: str = MODEL_NAME
    model_version: str = "1.0"
    coverage: float | None = None
    reference: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    # The threshold's guarantee (training/certify.py: target, delta, calibration size, bound) and the
    # unfamiliar-photo gate (returns_model/gate.py). Older model folders have neither.
    certificate: dict[str, Any] | None = None
    unfamiliar: dict[str, Any] | None = None
    # Where a retrained model came from (training/retrain.py): the parent model's SHA-256, the hash of
    # the reviewers' decisions it learned from and of the held-out split it was judged on. None for a
    # model trained from scratch; written only when set, so older folders are unchanged.
    lineage: dict[str, Any] | None = None
    # The int8 CPU path (training/quantize.py): its graph file and SHA-256, and the review rule fitted
    # on *its* outputs (temperature, certified threshold, gate), with how far its answers are from the
    # float model's. None where the folder has no int8 graph; written only when set.
    int8: dict[str, Any] | None = None
    # A few validation photos and the logits the float network gave them on the CPU (make_probe): a
    # server on another device or runtime checks at start-up that it answers them as the certificate
    # assumes (returns_model/rule.py). None in folders made before it; written only when set.
    probe: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if len(self.class_names) != self.arch.num_classes:
            raise ArtifactError(f"{len(self.class_names)} class names for a {self.arch.num_classes}-class model")
        if not self.temperature > 0:
            raise ArtifactError(f"temperature must be positive, got {self.temperature}")
        if not 1 <= self.top_k:
            raise ArtifactError(f"top_k must be at least 1, got {self.top_k}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "arch": self.arch.to_dict(),
            "class_names": self.class_names,
            "preprocess": self.preprocess.to_dict(),
            "calibration": {"temperature": self.temperature, "threshold": self.threshold,
                            "target_precision": self.target_precision, "coverage": self.coverage,
                            "certificate": self.certificate},
            "unfamiliar": self.unfamiliar,
            "top_k": self.top_k,
            "reference": self.reference,
            "data": self.data,
            **({"lineage": self.lineage} if self.lineage else {}),
            **({"int8": self.int8} if self.int8 else {}),
            **({"probe": self.probe} if self.probe else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        if d.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"model.json format_version {d.get('format_version')!r}; this code reads {FORMAT_VERSION}")
        cal = d["calibration"]
        return cls(arch=ArchConfig.from_dict(d["arch"]), class_names=list(d["class_names"]),
                   preprocess=PreprocessSpec.from_dict(d["preprocess"]), temperature=float(cal["temperature"]),
                   threshold=float(cal["threshold"]), target_precision=float(cal["target_precision"]),
                   coverage=cal.get("coverage"), top_k=int(d.get("top_k", 3)),
                   model_name=d.get("model_name", MODEL_NAME), model_version=str(d.get("model_version", "1.0")),
                   reference=d.get("reference", {}), data=d.get("data", {}),
                   certificate=cal.get("certificate"), unfamiliar=d.get("unfamiliar"), lineage=d.get("lineage"),
                   int8=d.get("int8"), probe=d.get("probe"))

    def on_int8(self) -> "ModelMeta":
        """The model as its int8 graph serves it: that path's own temperature, certified threshold and
        gate replace the float path's (a quantised network's confidences are not the float one's)."""
        if not self.int8:
            raise ArtifactError("model.json has no int8 section; run `python -m training.quantize` on the folder")
        try:
            cal = self.int8["calibration"]
            return replace(self, temperature=float(cal["temperature"]), threshold=float(cal["threshold"]),
                           target_precision=float(cal["target_precision"]), coverage=cal.get("coverage"),
                           certificate=cal.get("certificate"), unfamiliar=self.int8.get("unfamiliar"),
                           reference=self.int8.get("reference") or self.reference, probe=self.int8.get("probe"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"model.json: malformed int8 section ({exc!r})") from None


# The int8 section's probe: a few photos and the logits the runtime gave them when the rule was fitted.
# A server runs them at start-up and serves the rule only where its runtime gives the same logits on
# this CPU (handler/onnx_runner.py): the certificate holds for those outputs, not for another CPU
# family's kernels. The runtime was bit-exact across threads and pass sizes where it was measured.
PROBE_TOLERANCE = 1e-4
PROBE_PHOTOS = 32  # validation photos in a probe


def make_probe(pixels: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    """``uint8 [K, C, H, W]`` photos and their ``[K, classes]`` logits -> the JSON of ``int8.probe``."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 4 or len(pixels) != len(logits):
        raise ArtifactError(f"a probe needs uint8 [K, C, H, W] pixels and K rows of logits, got "
                            f"{pixels.dtype} {tuple(pixels.shape)} and {tuple(logits.shape)}")
    return {"shape": list(pixels.shape), "pixels_b64": base64.b64encode(pixels.contiguous().numpy().tobytes()).decode(),
            "logits": logits.double().tolist(), "max_abs_logit_difference": PROBE_TOLERANCE}


def read_probe(probe: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``int8.probe`` -> (uint8 pixels, logits, tolerance); ArtifactError when it does not fit together."""
    try:
        shape = [int(d) for d in probe["shape"]]
        raw = bytearray(base64.b64decode(probe["pixels_b64"], validate=True))
        pixels = torch.frombuffer(raw, dtype=torch.uint8).view(shape)
        logits = torch.tensor(probe["logits"], dtype=torch.float64)
        tolerance = float(probe["max_abs_logit_difference"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"model.json: malformed int8 probe ({exc!r})") from None
    if len(logits) != shape[0]:
        raise ArtifactError(f"model.json: the int8 probe has {shape[0]} photos and {len(logits)} rows of logits")
    return pixels, logits, tolerance


class Int8GraphError(ArtifactError):
    """The folder's int8 graph is not the one its review rule in model.json was fitted on."""


def read_int8_graph(model_dir: Path, meta: ModelMeta) -> bytes | None:
    """The folder's int8 graph (training/quantize.py), checked against the SHA-256 in ``model.json``;
    None where the folder has no int8 graph or no rule for it. Its temperature, threshold and gate
    were fitted on that graph's outputs and hold for no other, so a mismatch is an error."""
    path = Path(model_dir) / INT8_FILE
    if not meta.int8 or not path.is_file():
        return None
    graph = path.read_bytes()
    digest, expected = hashlib.sha256(graph).hexdigest(), str(meta.int8.get("sha256"))
    if digest != expected:
        raise Int8GraphError(f"{path}: SHA-256 is not the one model.json's int8 rule was fitted on ({digest[:16]}... "
                             f"against {expected[:16]}...); rebuild it with `python -m training.quantize "
                             f"--model-dir {model_dir}`")
    return graph


def read_meta(model_dir: Path) -> ModelMeta:
    path = Path(model_dir) / META_FILE
    try:
        return ModelMeta.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found; is {model_dir} a trained model folder?") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: malformed model metadata ({exc!r})") from None


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto``: the first GPU where CUDA sees one, else the CPU; ``cuda`` without a GPU is an error
    (ValueError), never a silent CPU run that someone believes is on their GPU."""
    if device not in DEVICES:
        raise ValueError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA sees no GPU")
    return torch.device("cuda:0" if device != "cpu" and torch.cuda.is_available() else "cpu")


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[SEResNet, ModelMeta]:
    """Rebuild the network from ``model.json`` and load ``model.pt`` safely (``weights_only=True``)."""
    meta = read_meta(model_dir)
    model = build_model(meta.arch)
    path = Path(model_dir) / WEIGHTS_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: weights not found") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: weights do not fit the architecture in model.json: {exc}") from None
    return model.to(device).eval(), meta


def save_weights(model: torch.nn.Module, model_dir: Path) -> None:
    """``model.pt``: a plain CPU state_dict (loadable with ``weights_only=True``), written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_open(Path(model_dir) / WEIGHTS_FILE, "wb") as f:
        torch.save(state, f)


def write_meta(meta: ModelMeta, model_dir: Path) -> None:
    write_json(Path(model_dir) / META_FILE, meta.to_dict())
