"""The model as an ONNX graph with two outputs: the logits and the gate's tapped embedding.

The served CPU path runs this graph in ONNX Runtime (``handler/onnx_runner.py``). A forward hook
cannot fire inside ONNX Runtime, so the export traces the model *with* the gate's ``LayerTap``
attached and returns what the tap captured as a second output: the same flip-averaged, pooled
``[N, D]`` embedding the eager path reads. Flip averaging is inside the network's forward, so it
is in the graph too. Temperature, softmax and the gate's scoring stay in torch, shared by both
paths (``handler/core.py``).

Only torch is imported here; ``torch.onnx.export`` itself needs the ``onnx`` package, so only the
archive builder (or a server that has no shipped graph) calls it.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn

from returns_model.gate import LayerTap

OPSET = 17
INPUT, LOGITS, TAPPED = "pixels", "logits", "tapped"


class LogitsAndTap(nn.Module):
    """``x -> (logits [N, K], tapped [N, D])``; without a gate layer the second output is the logits again."""

    def __init__(self, model: nn.Module, layer: str | None) -> None:
        super().__init__()
        self.model = model
        self._tap = LayerTap(model, layer) if layer else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, (self._tap.pooled(x.shape[0]) if self._tap else logits)


def export_onnx(model: nn.Module, layer: str | None, channels: int, size: int) -> bytes:
    """The eval-mode model (on CPU, float32) as ONNX bytes, batch dimension dynamic.

    The same weights and torch version give the same bytes (the archive must be reproducible).
    """
    was_training = model.training
    # The exporter puts the module it is given back into that module's own mode afterwards, recursively:
    # the wrapper is in eval mode so that the model is not left in training mode (a server that exports
    # at start-up still runs its eager model afterwards).
    wrapper = LogitsAndTap(model, layer).eval()
    example = torch.zeros(2, channels, size, size)
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the tracer warns about the flip-average shape checks, fixed for a model
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), buf, input_names=[INPUT], output_names=[LOGITS, TAPPED],
                              dynamic_axes={INPUT: {0: "n"}, LOGITS: {0: "n"}, TAPPED: {0: "n"}},
                              opset_version=OPSET, dynamo=False)
    finally:
        if wrapper._tap:
            wrapper._tap.close()
        model.train(was_training)
    return buf.getvalue()


def write_onnx(model: nn.Module, layer: str | None, channels: int, size: int, path: Path) -> Path:
    path.write_bytes(export_onnx(model, layer, channels, size))
    return path
