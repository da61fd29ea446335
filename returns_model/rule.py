"""The served decision, decided once: which rule answers on this machine, and what it makes of a photo.

A rule is one forward path's own fitted review settings: a temperature, a certified threshold, the
unfamiliar-photo gate, the drift reference of its answers and a probe (a few photos with the scores
that path gave them when the rule was fitted). A model folder has the float network's rule
(``model.json``'s top level) and, once training/quantize.py has run, the int8 graph's (its ``int8``
section). training/rule.py fits them; everything that applies one calls here: the server
(handler/core.py), calibration, evaluation, comparison, quantization and the archive builder.
(tests/oracle.py restates the decision on purpose, to check this module from outside.)

    rule = ServedRule.of(meta, choose_rule(meta, "cpu", "onnx-int8"), runtime)
    accepted, reasons = rule.decide(rule.probabilities(logits), unfamiliar_scores)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from returns_model.artifact import read_probe
from returns_model.gate import UnfamiliarGate
from returns_model.meta import ArtifactError, ModelMeta
from returns_model.results import FLOAT, INT8, LOW_CONFIDENCE, RULES, UNFAMILIAR

# How far a float-rule runtime may move the probe photos' calibrated probabilities from the CPU's
# fp32 answers the certificate was computed on: fp16 autocast on a GPU measured at most 0.0124 over
# 5,000 test photos (H200), the float graph in ONNX Runtime about 1e-3. The int8 rule's probe is
# checked on logits, to the tolerance it records (returns_model.artifact.PROBE_TOLERANCE).
FLOAT_PROBE_TOLERANCE = 0.02


def accepted(confidence: torch.Tensor, threshold: float, flagged: torch.Tensor | None = None) -> torch.Tensor:
    """The one comparison of a confidence with a threshold: a photo is auto-accepted when its
    calibrated confidence reaches the threshold and the gate does not flag it (bool tensor)."""
    ok = confidence >= threshold
    return ok if flagged is None else ok & ~flagged.bool()


def choose_rule(meta: ModelMeta, device_type: str, cpu_backend: str, int8_reproduced: bool = True) -> str:
    """Which rule a server serves: the int8 graph's on a CPU asked for ``onnx-int8`` where the folder
    has one and this CPU reproduces its probe (``int8_reproduced``); the float network's everywhere
    else (a GPU, the ``onnx`` and ``eager`` backends, a folder without an int8 graph)."""
    if device_type == "cpu" and cpu_backend == "onnx-int8" and meta.int8 and int8_reproduced:
        return INT8
    return FLOAT


def rule_meta(meta: ModelMeta, name: str) -> ModelMeta:
    """A model folder's metadata as the ``name`` rule serves it: the int8 section's temperature,
    threshold, gate, reference and probe in place of the float network's (ModelMeta.on_int8), or as
    it is (ArtifactError for an unknown rule)."""
    if name not in RULES:
        raise ArtifactError(f"unknown rule {name!r}; a model folder serves one of {', '.join(RULES)}")
    return meta.on_int8() if name == INT8 else meta


@dataclass(frozen=True)
class ServedRule:
    """One rule as served: its settings, and the runtime whose scores it judges."""

    name: str  # one of returns_model.results.RULES
    runtime: str  # one of returns_model.results.RUNTIMES
    temperature: float
    threshold: float
    gate: UnfamiliarGate | None
    reference: dict[str, Any]
    certificate: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None

    @classmethod
    def of(cls, meta: ModelMeta, name: str, runtime: str) -> "ServedRule":
        """The ``name`` rule of a model folder's metadata (ArtifactError when it has no such rule)."""
        view = rule_meta(meta, name)
        return cls(name=name, runtime=runtime, temperature=view.temperature, threshold=view.threshold,
                   gate=UnfamiliarGate.from_dict(view.unfamiliar) if view.unfamiliar else None,
                   reference=view.reference, certificate=view.certificate, probe=view.probe)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits -> calibrated class probabilities (float32)."""
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def flagged(self, unfamiliar: torch.Tensor | None, n: int) -> torch.Tensor:
        """Which of ``n`` photos the gate flags (none without a gate or scores)."""
        if self.gate is None or unfamiliar is None:
            return torch.zeros(n, dtype=torch.bool)
        return self.gate.flag(unfamiliar)

    def decide(self, probs: torch.Tensor, unfamiliar: torch.Tensor | None = None) -> tuple[torch.Tensor, list[list[str]]]:
        """Calibrated probabilities ``[N, K]`` (and unfamiliarity ``[N]``) -> (auto-accepted ``[N]``,
        each photo's review reasons: ``low_confidence``, ``unfamiliar``, both or none)."""
        conf = probs.max(1).values if len(probs) else torch.empty(0)
        flags = self.flagged(unfamiliar, len(conf))
        confident = accepted(conf, self.threshold)
        reasons = [[r for r, on in ((LOW_CONFIDENCE, not c), (UNFAMILIAR, f)) if on]
                   for c, f in zip(confident.tolist(), flags.tolist())]
        return confident & ~flags, reasons

    def probe_difference(self, logits: torch.Tensor) -> tuple[float, float]:
        """How far ``logits`` (this runtime's, for the probe's photos) are from the recorded ones,
        and the tolerance: logits for the int8 rule (its runtime must reproduce them), calibrated
        probabilities for the float rule (fp16 and graph runtimes round differently)."""
        if self.probe is None:
            raise ArtifactError(f"the {self.name} rule has no probe in model.json")
        _, expected, tolerance = read_probe(self.probe)
        if self.name == INT8:
            return float((logits.double() - expected).abs().max()), tolerance
        worst = (self.probabilities(logits).double() - self.probabilities(expected).double()).abs().max()
        return float(worst), FLOAT_PROBE_TOLERANCE

    def probe_pixels(self) -> torch.Tensor:
        """The probe's uint8 photos ``[K, C, H, W]``."""
        if self.probe is None:
            raise ArtifactError(f"the {self.name} rule has no probe in model.json")
        return read_probe(self.probe)[0]
