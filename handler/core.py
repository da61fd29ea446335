"""The classification core: photo bytes -> validated images -> one tensor batch -> calibrated
probabilities -> one result per photo. No TorchServe import: another server can use it as is.

    clf = Classifier("models/release")          # or an extracted .mar folder
    clf.classify([png_bytes, jpeg_bytes])        # -> [{"label": ..., "confidence": ...}, ...]
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from returns_model.artifact import load_model
from returns_model.gate import LayerTap, UnfamiliarGate
from returns_model.manifest import content_digest, tree_hashes
from returns_model.preprocess import PhotoError, bytes_to_uint8, normalize

# The CPU forward pass: the model folder's int8 graph (with the review rule fitted on its own outputs,
# in the runtime they came from), ONNX Runtime on the exported float graph, or torch eager.
CPU_BACKENDS = ("onnx", "onnx-int8", "eager")

log = logging.getLogger(__name__)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may really use: the cgroup quota (containers, rounded down, at least 1) or
    the affinity mask, whichever is smaller."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cpu_max).read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


# Photos per forward pass on CPU. Larger batches spill the activations out of the CPU caches:
# the release model ran 579 photos/s at 16 per pass, 571 at 32, 460 at 128 and 384 at 256 (2 threads).
CPU_CHUNK = 32


def bucket(n: int) -> int:
    """The batch size a forward pass of n images is padded to: 1, 2, 4, 8, 16, then multiples of 16.

    oneDNN compiles and caches kernels per input shape; with batch sizes anywhere from 1 to 256 the
    worker's memory kept growing (538 MB -> 1.5 GB in 2 minutes of mixed load). About 20 shapes keep
    it bounded, at the cost of at most 15 padded images.
    """
    if n <= 16:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 16) * 16


@dataclass
class BatchStats:
    """Per-batch figures exported as metrics."""

    images: int = 0
    rejected: int = 0
    low_confidence: int = 0
    unfamiliar: int = 0
    average_confidence: float = 0.0
    decode_ms: float = 0.0
    forward_ms: float = 0.0


@dataclass
class Decoded:
    """The photos of one call: pixels of the good ones, and each photo's error or slot."""

    outcomes: list[PhotoError | int] = field(default_factory=list)  # error, or index into pixels
    pixels: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Work:
    """One server call: what each request carried, and the photos of all of them decoded together."""

    requests: list[Any]  # a parsed request, or the error of a malformed one
    decoded: Decoded
    stats: BatchStats = field(default_factory=BatchStats)
    results: list[dict[str, Any]] = field(default_factory=list)


class Classifier:
    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu", max_image_pixels: int | None = None,
                 threads: int = 0, warmup: bool = True, cpu_backend: str = "eager") -> None:
        if cpu_backend not in CPU_BACKENDS:
            raise ValueError(f"cpu_backend must be one of {', '.join(CPU_BACKENDS)}, not {cpu_backend!r}")
        self.device = torch.device(device)
        threads = threads or available_cpus()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model, self.meta = load_model(Path(model_dir), self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.spec = self.meta.preprocess
        if max_image_pixels:
            self.spec = replace(self.spec, max_pixels=max_image_pixels)
        self.model_sha256 = content_digest(tree_hashes(Path(model_dir)))
        self.amp = self.device.type == "cuda"
        self._labels = self.meta.class_names
        # On a CPU a graph does the forward pass (handler/onnx_runner.py): the int8 graph in the runtime
        # its own review rule was fitted on (meta.on_int8), or the float graph in ONNX Runtime. A GPU
        # keeps the eager model with fp16 autocast.
        self._onnx = None
        self.backend = "eager"
        requested = cpu_backend
        if cpu_backend == "onnx-int8" and self.device.type == "cpu":
            from handler.onnx_runner import open_int8_runner

            self._onnx = open_int8_runner(Path(model_dir), self.meta, threads)
            if self._onnx is not None:
                self.meta, self.backend = self.meta.on_int8(), "onnx-int8"
            else:
                cpu_backend = "onnx"  # the float graph, with the float rule
        # The unfamiliar-photo gate reads an inner layer during the forward pass (a hook, or the graph's output).
        self.gate = UnfamiliarGate.from_dict(self.meta.unfamiliar) if self.meta.unfamiliar else None
        self._tap = LayerTap(self.model, self.gate.layer) if self.gate else None
        # The tap holds one pass's layer output, so eager passes from several threads take turns;
        # decoding and the graph paths (the layer is a graph output) need no turn. (returns-kserve
        # runs eager passes one at a time anyway; the lock keeps the core safe for any caller.)
        self._eager_turn = threading.Lock()
        if cpu_backend == "onnx" and self.device.type == "cpu" and importlib.util.find_spec("onnxruntime") is None:
            log.warning("cpu_backend %s: onnxruntime is not installed; serving on the eager path (float rule)",
                        requested)
            cpu_backend = "eager"
        if cpu_backend == "onnx" and self.device.type == "cpu":
            from handler.onnx_runner import open_runner

            self._onnx = open_runner(Path(model_dir), self.model, self.gate.layer if self.gate else None,
                                     self.spec.channels, self.spec.size, threads)
            self.backend = "onnx" if self._onnx is not None else "eager"
        if warmup:  # the first real request should not pay for lazy initialisation
            size = (1, self.spec.channels, self.spec.size, self.spec.size)
            for n in (1, 8):
                self.probabilities([torch.zeros(size[1:], dtype=torch.uint8)] * n)

    # --- the three steps -------------------------------------------------
    def decode(self, photos: list[bytes | PhotoError]) -> Decoded:
        """Validate and decode every photo; a bad one becomes its own error."""
        out = Decoded()
        for photo in photos:
            if isinstance(photo, PhotoError):
                out.outcomes.append(photo)
                continue
            try:
                out.pixels.append(bytes_to_uint8(photo, self.spec))
                out.outcomes.append(len(out.pixels) - 1)
            except PhotoError as exc:
                out.outcomes.append(exc)
        return out

    def probabilities(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images -> calibrated class probabilities ``[N, K]`` (float32, CPU)."""
        return self.scores(pixels)[0]

    @torch.inference_mode()
    def scores(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 images -> calibrated probabilities ``[N, K]`` and unfamiliarity ``[N]`` (None without a gate).

        A GPU takes the whole batch in one forward pass; a CPU takes it in passes of ``CPU_CHUNK``.
        """
        if not pixels:
            return torch.empty(0, len(self._labels)), (torch.empty(0) if self.gate else None)
        step = CPU_CHUNK if self.device.type == "cpu" else len(pixels)
        parts = [self._forward(pixels[i:i + step]) for i in range(0, len(pixels), step)]
        probs = torch.cat([p for p, _ in parts])
        return probs, (torch.cat([u for _, u in parts]) if self.gate else None)

    def _forward(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = len(pixels)
        batch = torch.stack(pixels)
        if bucket(n) > n:
            batch = torch.cat([batch, batch.new_zeros((bucket(n) - n, *batch.shape[1:]))])
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = normalize(batch, self.spec)
        if self._onnx is not None:
            logits, tapped = self._onnx(x)
        else:
            with self._eager_turn, torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
                tapped = self._tap.pooled(len(batch)) if self.gate else None
        probs = torch.softmax(logits[:n].float() / self.meta.temperature, dim=1).cpu()
        if self.gate is None:
            return probs, None
        unfamiliar = self.gate.score(tapped[:n], pixels=batch[:n]).float().cpu()
        return probs, unfamiliar

    def describe(self, probs: torch.Tensor, unfamiliar: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """Calibrated probabilities (and unfamiliarity) -> one result object per row.

        A photo goes to review when its confidence is under the certified threshold
        (``low_confidence``), when the gate finds it unlike the training data (``unfamiliar``), or both.
        """
        k = min(self.meta.top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        flags = self.gate.flag(unfamiliar).tolist() if self.gate is not None else [False] * len(probs)
        scores = unfamiliar.tolist() if unfamiliar is not None else [None] * len(probs)
        results = []
        for p_row, i_row, flagged, score in zip(top_p.tolist(), top_i.tolist(), flags, scores):
            conf, cls = p_row[0], i_row[0]
            reasons = [r for r, on in (("low_confidence", conf < self.meta.threshold), ("unfamiliar", flagged)) if on]
            results.append({
                "label": self._labels[cls],
                "class_id": cls,
                "confidence": round(conf, 6),
                "needs_review": bool(reasons),
                "review_reason": reasons,
                "unfamiliar_score": round(score, 4) if score is not None else None,
                "top_k": [{"label": self._labels[c], "class_id": c, "probability": round(p, 6)}
                          for p, c in zip(p_row, i_row)],
                "model_name": self.meta.model_name,
                "model_version": self.meta.model_version,
                "model_sha256": self.model_sha256,
            })
        return results

    # --- end to end --------------------------------------------------------
    def classify_decoded(self, decoded: Decoded, stats: BatchStats | None = None) -> list[dict[str, Any]]:
        """Forward the good photos once; put results and errors back in the photos' order."""
        t0 = time.perf_counter()
        probs, unfamiliar = self.scores(decoded.pixels)
        results = self.describe(probs, unfamiliar)
        if stats is not None:
            conf = probs.max(1)[0] if len(probs) else torch.empty(0)
            stats.forward_ms = (time.perf_counter() - t0) * 1000
            stats.images = len(decoded.outcomes)
            stats.rejected = len(decoded.outcomes) - len(decoded.pixels)
            # counted from the answers themselves, so a metric never disagrees with what was answered
            stats.low_confidence = sum("low_confidence" in r["review_reason"] for r in results)
            stats.unfamiliar = sum("unfamiliar" in r["review_reason"] for r in results)
            stats.average_confidence = float(conf.mean()) if len(conf) else 0.0
        return [o.to_dict() if isinstance(o, PhotoError) else results[o] for o in decoded.outcomes]

    def classify(self, photos: list[bytes | PhotoError], stats: BatchStats | None = None) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        decoded = self.decode(photos)
        if stats is not None:
            stats.decode_ms = (time.perf_counter() - t0) * 1000
        return self.classify_decoded(decoded, stats)
