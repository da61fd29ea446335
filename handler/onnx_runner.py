"""The optimised CPU forward passes: the exported float graph (``returns_model/export.py``) in ONNX
Runtime, and the int8 graph in the runtime its review rule was fitted on (ONNX Runtime, whose int8
answers are the same on every x86-64 CPU for a graph with 7-bit weights, training/quantize.py; or
OpenVINO, handler/openvino_runner.py, for folders whose rule names it).

The graphs answer the logits and the gate's tapped embedding, so ``handler.core`` scores every
path with the same torch code. A runtime is imported only when its path is chosen: an image without
it serves the next path down (int8 -> float graph -> eager) and says why.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from typing import Callable

import torch
from torch import nn

from returns_model.artifact import Int8GraphError  # noqa: F401 (re-exported)
from returns_model.export import INPUT, export_onnx
from returns_model.meta import ModelMeta
from returns_model.names import INT8_FILE, ONNX_FILE
from returns_model.preprocess import normalize
from returns_model.results import INT8, ONNXRUNTIME, OPENVINO
from returns_model.rule import ServedRule

log = logging.getLogger(__name__)
# ``float32 [N, C, H, W] -> (logits, tapped)``: an OnnxRunner, or handler.openvino_runner.OpenVinoRunner
Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SPIN_KEY = "session.intra_op.allow_spinning"


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, or None without it."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    return onnxruntime.__version__


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


def open_runner(graph: bytes | None, where: str, model: nn.Module, layer: str | None, channels: int, size: int,
                threads: int) -> OnnxRunner | None:
    """A runner on the shipped float graph (``graph``: ``model.onnx``'s bytes), or on a graph exported now
    from ``model`` where there is none (a plain model folder, ``where``); None, with the reason logged,
    where that cannot work."""
    t0 = time.perf_counter()
    if graph is not None:
        source = ONNX_FILE
    else:
        try:
            graph, source = export_onnx(model, layer, channels, size), "an export at start-up"
        except Exception as exc:  # the exporter needs the onnx package; a server without it stays eager
            log.warning("cpu_backend onnx: no %s in %s and the export failed (%s); serving on the eager path",
                        ONNX_FILE, where, exc)
            return None
    runner = OnnxRunner(graph, threads)
    log.info("cpu_backend onnx: session on %s ready in %.2f s", source, time.perf_counter() - t0)
    return runner


def int8_runtime_name(meta: ModelMeta) -> str:
    """The runtime a folder's int8 rule was fitted on (``model.json`` ``int8.runtime``; folders made
    before it was recorded were fitted on ONNX Runtime)."""
    return str(((meta.int8 or {}).get("runtime") or {}).get("name") or ONNXRUNTIME)


def _openvino_runner(graph: bytes, threads: int) -> Runner:
    from handler.openvino_runner import OpenVinoRunner

    return OpenVinoRunner(graph, threads)


def _openvino_version() -> str | None:
    from handler.openvino_runner import runtime_version

    return runtime_version()


# runtime name -> (what it is called, its package, installed version or None, runner on a graph)
INT8_RUNTIMES = {
    ONNXRUNTIME: ("ONNX Runtime", "onnxruntime", onnxruntime_version, OnnxRunner),
    OPENVINO: ("OpenVINO", "openvino", _openvino_version, _openvino_runner),
}


def open_int8_runner(graph: bytes | None, where: str, meta: ModelMeta, threads: int) -> tuple[Runner | None, str]:
    """A runner on the model's int8 graph (training/quantize.py; ``graph``, from ``read_int8_graph``,
    which refuses one whose SHA-256 is not model.json's), in the runtime its rule was fitted on, and
    ``""``; or None and why not, where the model (``where``) has no int8 graph and rule, that runtime
    is missing or this CPU does not reproduce the rule's probe (the caller then serves the float graph
    and rule)."""
    t0 = time.perf_counter()
    if graph is None or not meta.int8:
        return None, f"{where} has no int8 graph and rule ({INT8_FILE}, model.json 'int8')"
    name = int8_runtime_name(meta)
    if name not in INT8_RUNTIMES:
        return None, f"model.json's int8 rule names an unknown runtime {name!r}"
    label, package, version_of, make_runner = INT8_RUNTIMES[name]
    installed, fitted = version_of(), (meta.int8.get("runtime") or {}).get("version")
    if installed is None:
        return None, f"its rule was fitted on {label}'s outputs and {package} is not installed"
    if fitted and installed != fitted:
        log.warning("cpu_backend onnx-int8: %s %s is installed, the int8 rule was fitted on %s; the probe checks "
                    "that its answers are the certified ones", label, installed, fitted)
    runner = make_runner(graph, threads)
    why = probe_mismatch(runner, meta)
    if why:
        return None, why
    log.info("cpu_backend onnx-int8: %s on %s ready in %.2f s", name, INT8_FILE, time.perf_counter() - t0)
    return runner, ""


def probe_mismatch(runner: Runner, meta: ModelMeta) -> str:
    """Why the runner does not give the int8 probe's photos the logits recorded when the rule was
    fitted (``returns_model.artifact.make_probe``), or ``""`` where it does. Another runtime version,
    or a CPU whose kernels round otherwise, can answer differently; the certificate holds for the
    recorded answers, so such a runner is not used. A section without a probe (older folders) passes."""
    rule = ServedRule.of(meta, INT8, int8_runtime_name(meta))
    if rule.probe is None:
        log.info("cpu_backend onnx-int8: model.json's int8 section has no probe; the runtime's answers are not checked")
        return ""
    logits, _ = runner(normalize(rule.probe_pixels(), meta.preprocess))
    worst, tolerance = rule.probe_difference(logits)
    if worst > tolerance:
        return (f"on this CPU the int8 graph's logits for the probe photos differ from the ones its rule was "
                f"certified on by up to {worst:.3g} (allowed {tolerance:.3g})")
    return ""
