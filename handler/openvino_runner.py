"""The int8 graph in OpenVINO: the CPU forward pass of ``cpu_backend: onnx-int8`` for a model whose
int8 rule was fitted on OpenVINO's outputs (``model.json`` ``int8.runtime``; training/quantize.py).

Why OpenVINO for the int8 graph: it runs the quantised 3x3 convolutions on the CPU's int8 matrix
units where there are some (AMX on the Xeon this was measured on; its execution graph names the
kernels ``brgconv_avx512_amx_I8``), which ONNX Runtime's kernels do not use: 2,263 against 1,735
photos/s on one thread for the whole scoring step, and served 2,410-2,518 against 1,782-2,030
photos/s through TorchServe (2 cores, 3 runs of 6,000 each way, twice). Its answers are not ONNX
Runtime's to the last bit (probabilities up to 0.05 apart on the same graph), so a rule is fitted on
one runtime's outputs and served by that runtime only, where it reproduces the recorded answers
(``int8.probe``, handler/onnx_runner.probe_mismatch).

``openvino`` is imported only here, when this path is chosen. A compiled model runs one inference
at a time, so each calling thread compiles its own (returns-kserve's lanes call from several).
"""
from __future__ import annotations

import importlib.util
import threading

import torch

from returns_model.export import INPUT, LOGITS, TAPPED


def runtime_version() -> str | None:
    """The installed OpenVINO's version, or None without it."""
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino

    return openvino.get_version()


class OpenVinoRunner:
    """``float32 [N, C, H, W] -> (logits, tapped)`` on an OpenVINO CPU model of the int8 graph."""

    def __init__(self, graph: bytes, threads: int) -> None:
        import openvino as ov

        self._core = ov.Core()
        self._model = self._core.read_model(graph)
        self._config = {
            "INFERENCE_NUM_THREADS": max(1, threads),
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # Several workers share the pod's CPUs; pinned threads would pile onto the same cores.
            "ENABLE_CPU_PINNING": False,
        }
        self._local = threading.local()
        self._request()  # compile now: a broken graph fails at start-up, not on the first photo

    @property
    def threads(self) -> int:
        """The threads one pass uses, as the compiled model reports them."""
        return int(self._request().get_compiled_model().get_property("INFERENCE_NUM_THREADS"))

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._core.compile_model(self._model, "CPU", self._config).create_infer_request()
            self._local.request = req
        return req

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        req = self._request()
        req.infer({INPUT: x.contiguous().numpy()})
        # the request reuses its output buffers on the next call: copy them out
        return (torch.from_numpy(req.get_tensor(LOGITS).data.copy()),
                torch.from_numpy(req.get_tensor(TAPPED).data.copy()))
