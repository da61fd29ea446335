"""The classification core: photo bytes -> validated images -> one tensor batch -> calibrated
probabilities -> one result per photo. No TorchServe import: another server can use it as is.

    clf = Classifier("models/release")          # or an extracted .mar folder
    clf.classify([png_bytes, jpeg_bytes])        # -> [{"label": ..., "confidence": ...}, ...]

It serves a folder's contents held in memory the same way (``returns_model.artifact.ModelParts``):
training measures the folder it is building through this code before the folder is complete.
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

from returns_model import results as R
from returns_model.artifact import ModelParts, load_model, network_of, read_int8_graph
from returns_model.gate import LayerTap
from returns_model.manifest import content_digest, tree_hashes
from returns_model.meta import ArtifactError, ModelMeta
from returns_model.names import ONNX_FILE
from returns_model.preprocess import PhotoError, bytes_to_uint8, normalize
from returns_model.results import CUDA, CUDA_FP16, EAGER, FLOAT, ONNXRUNTIME
from returns_model.rule import ServedRule, choose_rule, rule_meta

# The CPU forward pass: the model folder's int8 graph (with the review rule fitted on its own outputs,
# in the runtime they came from), ONNX Runtime on the exported float graph, or torch eager. Which rule
# each serves is returns_model.rule.choose_rule's to say.
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
    """One model folder, served: the rule that answers here (``self.rule``: which one, and on what
    runtime, returns_model/rule.py) and the forward pass that computes its scores.

    ``model_dir`` is the folder, or its contents in memory (``ModelParts``: the same network, rule
    choice, probe checks and decisions; the weights and graphs come from the parts, and answers name
    no ``model_sha256``)."""

    def __init__(self, model_dir: str | Path | ModelParts, device: str | torch.device = "cpu",
                 max_image_pixels: int | None = None, threads: int = 0, warmup: bool = True,
                 cpu_backend: str = "eager") -> None:
        if cpu_backend not in CPU_BACKENDS:
            raise ValueError(f"cpu_backend must be one of {', '.join(CPU_BACKENDS)}, not {cpu_backend!r}")
        self.device = torch.device(device)
        threads = threads or available_cpus()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self._parts = model_dir if isinstance(model_dir, ModelParts) else None
        self._folder = None if self._parts else Path(model_dir)
        if self._parts:
            meta = self._parts.meta
            self.model = network_of(meta.arch, self._parts.weights, self.device, "the weights in memory")
        else:
            self.model, meta = load_model(self._folder, self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.spec = meta.preprocess
        if max_image_pixels:
            self.spec = replace(self.spec, max_pixels=max_image_pixels)
        # answers' model_sha256: the content digest of every file in model_dir (an extracted .mar: its members,
        # the manifest's archive_content_sha256), not a lineage's weights_sha256 of model.pt + model.json; none
        # for parts in memory, whose folder's files do not exist yet
        self.model_sha256: str | None = content_digest(tree_hashes(self._folder)) if self._folder else None
        self._labels = meta.class_names
        layer = meta.unfamiliar["layer"] if meta.unfamiliar else None
        # The unfamiliar-photo gate reads an inner layer during an eager pass (a hook; a graph has it as an output).
        self._tap = LayerTap(self.model, layer) if layer else None
        # The tap holds one pass's layer output, so eager passes from several threads take turns;
        # decoding and the graph paths need no turn. (returns-kserve runs eager passes one at a time
        # anyway; the lock keeps the core safe for any caller.)
        self._eager_turn = threading.Lock()
        self.amp = False
        self._onnx = None
        # Why the int8 rule does not serve where it was asked for (None where it serves or was not asked for).
        self.fallback: str | None = None
        self.backend, runtime = self._open_forward(meta, cpu_backend, layer, threads)
        name = choose_rule(meta, self.device.type, cpu_backend, int8_reproduced=self.backend == "onnx-int8")
        self.rule = ServedRule.of(meta, name, runtime)
        self.meta = rule_meta(meta, name)
        self.gate = self.rule.gate
        if name == FLOAT:
            self._check_float_probe()
        log.info("serving the %s rule on %s (threshold %.4f)%s", self.rule.name, self.rule.runtime,
                 self.rule.threshold, f"; {self.fallback}" if self.fallback else "")
        if warmup:  # the first real request should not pay for lazy initialisation
            size = (1, self.spec.channels, self.spec.size, self.spec.size)
            for n in (1, 8):
                self.probabilities([torch.zeros(size[1:], dtype=torch.uint8)] * n)

    def _graph(self, meta: ModelMeta, int8: bool) -> bytes | None:
        """The model's int8 graph (a folder's checked against model.json, ``read_int8_graph``) or its
        shipped float graph (``model.onnx``); None where it has none."""
        if self._parts:
            return self._parts.int8_graph if int8 else self._parts.float_graph
        if int8:
            return read_int8_graph(self._folder, meta)
        path = self._folder / ONNX_FILE
        return path.read_bytes() if path.is_file() else None

    def _open_forward(self, meta: ModelMeta, cpu_backend: str, layer: str | None, threads: int) -> tuple[str, str]:
        """Open the forward pass: (backend, runtime). On a CPU a graph does it (handler/onnx_runner.py):
        the int8 graph in the runtime its rule was fitted on, where this CPU reproduces its probe, or
        the float graph in ONNX Runtime; each falls back to the next (int8 -> float graph -> eager)
        and says why. A GPU runs the eager model under fp16 autocast."""
        if self.device.type == "cuda":
            self.amp = True
            return "eager", CUDA_FP16
        if cpu_backend == "onnx-int8":
            from handler.onnx_runner import int8_runtime_name, open_int8_runner

            self._onnx, why = open_int8_runner(self._graph(meta, int8=True), self._where, meta, threads)
            if self._onnx is not None:
                return "onnx-int8", int8_runtime_name(meta)
            self.fallback = f"the int8 rule does not serve here: {why}; the float rule serves instead"
            log.warning("cpu_backend onnx-int8: %s", self.fallback)
            cpu_backend = "onnx"
        if cpu_backend == "onnx" and importlib.util.find_spec("onnxruntime") is None:
            log.warning("cpu_backend onnx: onnxruntime is not installed; serving on the eager path (float rule)")
            cpu_backend = "eager"
        if cpu_backend == "onnx":
            from handler.onnx_runner import open_runner

            self._onnx = open_runner(self._graph(meta, int8=False), self._where, self.model, layer,
                                     self.spec.channels, self.spec.size, threads)
            if self._onnx is not None:
                return "onnx", ONNXRUNTIME
        return "eager", EAGER

    @property
    def _where(self) -> str:
        """What is served, for messages: the folder, or the model in memory."""
        return str(self._folder) if self._folder else "the model in memory"

    def _check_float_probe(self) -> None:
        """The float rule's certificate was computed on the CPU's fp32 answers: this device and runtime
        must give the probe photos the same calibrated probabilities, within FLOAT_PROBE_TOLERANCE.
        A GPU whose fp16 answers differ serves in fp32; a graph runtime that differs gives way to the
        eager model; an eager pass that differs is an error (nothing here would answer as certified)."""
        if self.rule.probe is None:
            log.info("model.json has no float probe; this device's answers are not checked at start-up")
            return
        pixels = self.rule.probe_pixels()
        while True:
            worst, tolerance = self.rule.probe_difference(self._logits(list(pixels)))
            if worst <= tolerance:
                return
            what = (f"on {self.rule.runtime} the probe photos' calibrated probabilities differ from the certified "
                    f"ones by up to {worst:.3g} (allowed {tolerance:.3g})")
            if self.amp:
                self.amp, runtime = False, CUDA
            elif self._onnx is not None:
                self._onnx, self.backend, runtime = None, "eager", EAGER
            else:
                raise ArtifactError(f"{what}: this device cannot serve the float rule as certified")
            log.warning("%s; serving on %s instead", what, runtime)
            self.rule = replace(self.rule, runtime=runtime)

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

    def _raw(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """uint8 images -> (logits, the gate layer's embedding or None, the padded uint8 batch), on the device."""
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
                tapped = self._tap.pooled(len(batch)) if self._tap else None
        return logits, tapped, batch

    @torch.inference_mode()
    def _logits(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images -> float logits on the CPU, through this server's forward pass."""
        return self._raw(pixels)[0][:len(pixels)].float().cpu()

    def _forward(self, pixels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = len(pixels)
        logits, tapped, batch = self._raw(pixels)
        probs = self.rule.probabilities(logits[:n]).cpu()
        if self.gate is None:
            return probs, None
        unfamiliar = self.gate.score(tapped[:n], pixels=batch[:n]).float().cpu()
        return probs, unfamiliar

    def describe(self, probs: torch.Tensor, unfamiliar: torch.Tensor | None = None) -> list[dict[str, Any]]:
        """Calibrated probabilities (and unfamiliarity) -> one result object per row, decided by the
        served rule (``returns_model.rule.ServedRule.decide``) and naming it."""
        k = min(self.meta.top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        _, reasons = self.rule.decide(probs, unfamiliar)
        scores = unfamiliar.tolist() if unfamiliar is not None else [None] * len(probs)
        results = []
        for p_row, i_row, why, score in zip(top_p.tolist(), top_i.tolist(), reasons, scores):
            conf, cls = p_row[0], i_row[0]
            results.append({
                R.LABEL: self._labels[cls],
                R.CLASS_ID: cls,
                R.CONFIDENCE: round(conf, 6),
                R.NEEDS_REVIEW: bool(why),
                R.REVIEW_REASON: why,
                R.UNFAMILIAR_SCORE: round(score, 4) if score is not None else None,
                R.TOP_K: [{"label": self._labels[c], "class_id": c, "probability": round(p, 6)}
                          for p, c in zip(p_row, i_row)],
                R.MODEL_NAME: self.meta.model_name,
                R.MODEL_VERSION: self.meta.model_version,
                R.MODEL_SHA256: self.model_sha256,
                R.RULE: self.rule.name,
                R.RUNTIME: self.rule.runtime,
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
            stats.low_confidence = sum(R.LOW_CONFIDENCE in r[R.REVIEW_REASON] for r in results)
            stats.unfamiliar = sum(R.UNFAMILIAR in r[R.REVIEW_REASON] for r in results)
            stats.average_confidence = float(conf.mean()) if len(conf) else 0.0
        return [o.to_dict() if isinstance(o, PhotoError) else results[o] for o in decoded.outcomes]

    def classify(self, photos: list[bytes | PhotoError], stats: BatchStats | None = None) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        decoded = self.decode(photos)
        if stats is not None:
            stats.decode_ms = (time.perf_counter() - t0) * 1000
        return self.classify_decoded(decoded, stats)
