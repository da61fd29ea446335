"""The model folder's torch side: ``model.pt`` (a plain state_dict) loaded into the network that
``model.json`` describes, the probe tensors, the int8 graph checked against its digest, and
``ModelParts``: a folder's contents held in memory, which the serving core serves as it serves a folder.

``model.json`` itself (ModelMeta, read_meta, write_meta) is ``returns_model.meta``, which needs no torch.
"""
from __future__ import annotations

import base64
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from returns_model.fileio import atomic_open
from returns_model.meta import ArchConfig, ArtifactError, ModelMeta, read_meta
from returns_model.names import INT8_FILE, WEIGHTS_FILE
from returns_model.network import SEResNet, build_model

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


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """``model.pt``, loaded safely (``weights_only=True``) onto the CPU."""
    path = Path(model_dir) / WEIGHTS_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: weights not found") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # torch's own texts run to many lines
        raise ArtifactError(f"{path}: not weights that torch.load(weights_only=True) can read: damaged, truncated "
                            f"or holding more than tensors ({type(exc).__name__})") from None


def network_of(arch: ArchConfig, weights: dict[str, torch.Tensor], device: torch.device | str = "cpu",
               where: str = WEIGHTS_FILE) -> SEResNet:
    """The network ``arch`` describes with ``weights`` loaded (copied), in eval mode on ``device``."""
    model = build_model(arch)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError) as exc:  # TypeError: something other than a dict of tensors
        raise ArtifactError(f"{where}: weights do not fit the architecture in model.json: {exc}") from None
    return model.to(device).eval()


def load_model(model_dir: Path, device: torch.device | str = "cpu") -> tuple[SEResNet, ModelMeta]:
    """Rebuild the network from ``model.json`` and load ``model.pt`` safely (``weights_only=True``)."""
    meta = read_meta(model_dir)
    return network_of(meta.arch, load_weights(model_dir), device, str(Path(model_dir) / WEIGHTS_FILE)), meta


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict ``model.pt`` holds: detached, contiguous CPU tensors."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(model: torch.nn.Module, model_dir: Path) -> dict[str, torch.Tensor]:
    """``model.pt``: a plain CPU state_dict (loadable with ``weights_only=True``), written atomically.
    Returns the weights it wrote, so a caller can serve exactly those without reading them back."""
    state = weights_of(model)
    with atomic_open(Path(model_dir) / WEIGHTS_FILE, "wb") as f:
        torch.save(state, f)
    return state


@dataclass(frozen=True)
class ModelParts:
    """A model folder's contents in memory, for ``handler.core.Classifier`` to serve as it serves the
    folder: training (training/pipeline.py) measures the folder it is building through the serving
    core before its ``model.json`` is written, and without reading back what it holds.

    ``meta`` and the graphs must belong together, as in a folder: ``int8_graph`` is the graph
    ``meta.int8`` was fitted on (None: the model has none), ``float_graph`` the float graph a folder
    ships as ``model.onnx`` (None: the ONNX path exports one at start-up, as for a plain folder).
    A server on parts names no ``model_sha256`` in its answers: the folder's digest does not exist
    before its files do.
    """

    meta: ModelMeta
    weights: dict[str, torch.Tensor]  # as model.pt holds them (weights_of); never changed by a server
    int8_graph: bytes | None = None
    float_graph: bytes | None = None
