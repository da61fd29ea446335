"""Confidence calibration (temperature scaling) and the review-routing threshold."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from training.certify import Certificate, certificate_at, certify_threshold


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return F.cross_entropy(logits / temperature, labels).item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` on held-out data."""
    logits, labels = logits.double(), labels.long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature fit failed (got {t})")
    return t


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| x share."""
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros((), dtype=torch.float64)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = correct[in_bin].double().mean() - confidence[in_bin].double().mean()
            ece += gap.abs() * in_bin.double().mean()
    return float(ece)


def risk_coverage(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Risk (error rate of accepted items) against coverage, sorted by confidence; and its area (AURC)."""
    order = torch.argsort(confidence.double(), descending=True)
    errors = torch.cumsum(1 - correct[order].double(), 0)
    counts = torch.arange(1, len(order) + 1, dtype=torch.float64)
    risk = errors / counts
    coverage = counts / len(order)
    return coverage, risk, float(risk.mean())


@dataclass(frozen=True)
class Calibration:
    """What calibration on the validation split decides: the temperature, and the review threshold
    with its guarantee (certified for the served rule: photos the gate flags are never accepted)."""

    temperature: float
    certificate: Certificate

    @property
    def threshold(self) -> float:
        return self.certificate.threshold


# name -> (logits [N, K], labels [N], flagged by the gate [N]) of one new setup's calibration photos
Setups = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def _confidence_and_correct(logits: torch.Tensor, labels: torch.Tensor, temperature: float,
                            flagged: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each photo's calibrated confidence (0 where the gate flags it) and whether its prediction is right."""
    conf, pred = torch.softmax(logits / temperature, 1).max(1)
    if flagged is not None:  # a flagged photo is never accepted, whatever its confidence
        conf = torch.where(flagged, torch.zeros_like(conf), conf)
    return conf, pred == labels


def calibrate(val_logits: torch.Tensor, val_labels: torch.Tensor, target_precision: float, delta: float,
              flagged: torch.Tensor | None = None, setups: Setups | None = None) -> Calibration:
    """Fit the temperature, then certify the review threshold on the calibrated validation confidences.

    ``setups`` (a retrain that learnt a new photo setup): each setup's calibration photos get their
    own certificate, with the same temperature, and the highest threshold is served, so the promise
    holds for each of them, not for a mixture in which ordinary photos hide a new setup's errors.
    The validation certificate is restated at that threshold, with every setup's beside it.
    """
    temperature = fit_temperature(val_logits, val_labels)
    conf, correct = _confidence_and_correct(val_logits, val_labels, temperature, flagged)
    cert = certify_threshold(conf, correct, target_precision, delta)
    if not setups:
        return Calibration(temperature, cert)
    scored = {name: _confidence_and_correct(logits, labels, temperature, flags)
              for name, (logits, labels, flags) in setups.items()}
    walks = {name: certify_threshold(c, ok, target_precision, delta) for name, (c, ok) in scored.items()}
    top = max([cert.threshold] + [w.threshold for w in walks.values()])
    every = {"validation": cert, **{f"setup {name}": w for name, w in walks.items()}}
    why = "; ".join(f"{what} cannot be certified ({w.reason})" for what, w in every.items() if w.accept_nothing)
    per_setup = {name: certificate_at(*scored[name], w, top, why).to_dict() for name, w in walks.items()}
    return Calibration(temperature, replace(certificate_at(conf, correct, cert, top, why), setups=per_setup))
