"""The optimised CPU forward passes: the exported float graph (``returns_model/export.py``) in ONNX
Runtime, and the int8 graph in the runtime its review rule was fitted on (OpenVINO since it was
measured faster, handler/openvino_runner.py; ONNX Runtime for older model folders).

The graphs answer the logits and the gate's tapped embedding, so ``handler.core`` scores every
path with the same torch code. A runtime is imported only when its path is chosen: an image without
it serves the next path down (int8 -> float graph -> eager) and says why.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from returns_model.artifact import (Int8GraphError, ModelMeta, read_int8_graph,  # noqa: F401 (Int8GraphError: re-exported)
                                    read_probe)
from returns_model.export import INPUT, INT8_FILE, ONNX_FILE, export_onnx
from returns_model.preprocess import normalize

log = logging.getLogger(__name__)
# ``float32 [N, C, H, W] -> (logits, tapped)``: an OnnxRunner, or handler.openvino_runner.OpenVinoRunner
Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SPIN_KEY = "session.intra_op.allow_spinning"


class OnnxRunner:
    """``float32 [N, C, H, W] -> (logits, tapped)`` on an ONNX Runtime CPU session."""

    def __init__(self, graph: bytes, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1  # one graph of sequential convolutions: no parallel branches to run
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's threads busy-wait between operators by default. In a server the same cores run
        # the HTTP frontend, the worker's IPC and often the submitter: spinning threads take their
        # time. Measured on 2 cores (TorchServe, 256 photos per request, 6 runs of 3,000 photos):
        # served 706 photos/s without spinning, 621 with it.
        opts.add_session_config_entry(SPIN_KEY, "0")
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    @property
    def threads(self) -> int:
        """The threads one pass uses, as the session reports them."""
        return self.session.get_session_options().intra_op_num_threads

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, tapped = self.session.run(None, {INPUT: x.contiguous().numpy()})
        return torch.from_numpy(logits), torch.from_numpy(tapped)


def open_runner(model_dir: Path, model: nn.Module, layer: str | None, channels: int, size: int,
                threads: int) -> OnnxRunner | None:
    """A runner on the shipped ``model.onnx``, or on a graph exported now from ``model`` when the
    folder has none (a plain model folder); None, with the reason logged, where that cannot work."""
    t0 = time.perf_counter()
    path = Path(model_dir) / ONNX_FILE
    if path.is_file():
        graph, source = path.read_bytes(), ONNX_FILE
    else:
        try:
            graph, source = export_onnx(model, layer, channels, size), "an export at start-up"
        except Exception as exc:  # the exporter needs the onnx package; a server without it stays eager
            log.warning("cpu_backend onnx: no %s in %s and the export failed (%s); serving on the eager path",
                        ONNX_FILE, model_dir, exc)
            return None
    runner = OnnxRunner(graph, threads)
    log.info("cpu_backend onnx: session on %s ready in %.2f s", source, time.perf_counter() - t0)
    return runner


def open_int8_runner(model_dir: Path, meta: ModelMeta, threads: int) -> Runner | None:
    """A runner on the folder's int8 graph (training/quantize.py), in the runtime its rule was fitted
    on (``model.json`` ``int8.runtime``: OpenVINO, or ONNX Runtime for folders made before it);
    None, with the reason logged, where the folder has no int8 graph or that runtime is missing (the
    caller then serves the float graph and rule). A graph whose SHA-256 is not model.json's is
    refused (``Int8GraphError``, read_int8_graph)."""
    t0 = time.perf_counter()
    graph = read_int8_graph(model_dir, meta)
    if graph is None:
        log.warning("cpu_backend onnx-int8: %s has no int8 graph and rule (%s, model.json 'int8'); serving the "
                    "float graph", model_dir, INT8_FILE)
        return None
    fitted = meta.int8.get("runtime") or {"name": "onnxruntime"}
    if fitted.get("name") == "openvino":
        from handler.openvino_runner import OpenVinoRunner, runtime_version

        installed = runtime_version()
        if installed is None:
            log.warning("cpu_backend onnx-int8: the int8 rule was fitted on OpenVINO's outputs and openvino is not "
                        "installed; serving the float graph")
            return None
        if installed != fitted.get("version"):
            log.warning("cpu_backend onnx-int8: OpenVINO %s is installed, the int8 rule was fitted on %s; the probe "
                        "checks that its answers are the certified ones", installed, fitted.get("version"))
        runner: Runner = OpenVinoRunner(graph, threads)
    elif fitted.get("name") == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            log.warning("cpu_backend onnx-int8: the int8 rule was fitted on ONNX Runtime's outputs and onnxruntime "
                        "is not installed; serving the float graph")
            return None
        runner = OnnxRunner(graph, threads)
    else:
        log.warning("cpu_backend onnx-int8: model.json's int8 rule names an unknown runtime %r; serving the float "
                    "graph", fitted.get("name"))
        return None
    if not reproduces_probe(runner, meta):
        return None
    log.info("cpu_backend onnx-int8: %s on %s ready in %.2f s", fitted["name"], INT8_FILE, time.perf_counter() - t0)
    return runner


def reproduces_probe(runner: Runner, meta: ModelMeta) -> bool:
    """Whether the runner gives the int8 probe's photos the logits recorded when the rule was fitted
    (``returns_model.artifact.make_probe``). Another CPU family's kernels, or another runtime
    version, can answer differently; the certificate holds for the recorded answers, so a runner that
    does not reproduce them is not used (logged). A section without a probe (older folders) passes."""
    probe = meta.int8.get("probe")
    if probe is None:
        log.info("cpu_backend onnx-int8: model.json's int8 section has no probe; the runtime's answers are not checked")
        return True
    pixels, expected, tolerance = read_probe(probe)
    logits, _ = runner(normalize(pixels, meta.preprocess))
    worst = float((logits.double() - expected).abs().max())
    if worst > tolerance:
        log.warning("cpu_backend onnx-int8: on this CPU the int8 graph's logits for the probe photos differ from the "
                    "ones its rule was certified on by up to %.3g (allowed %.3g); serving the float graph and rule",
                    worst, tolerance)
        return False
    return True
