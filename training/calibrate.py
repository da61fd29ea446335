"""Confidence calibration (temperature scaling) and the review-routing threshold."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


@dataclass(frozen=True)
class Threshold:
    threshold: float  # auto-accept when calibrated confidence >= threshold
    precision: float  # precision of the accepted items on the data it was chosen on
    coverage: float  # share of items accepted
    target_precision: float


def choose_threshold(confidence: torch.Tensor, correct: torch.Tensor, target_precision: float) -> Threshold:
    """The lowest confidence at which the auto-accepted items reach ``target_precision``.

    Items are accepted when ``confidence >= threshold``; of all thresholds whose
    accepted set meets the target, the lowest (largest coverage) is taken. When
    none does, the threshold is above every score: everything goes to review.
    """
    if not 0 < target_precision <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    if len(confidence) == 0 or len(confidence) != len(correct):
        raise ValueError("confidence and correct must be non-empty and of equal length")
    order = torch.argsort(confidence.double(), descending=True)
    conf = confidence.double()[order]
    hits = torch.cumsum(correct[order].double(), 0)
    counts = torch.arange(1, len(conf) + 1, dtype=torch.float64)
    # Only the last item of a run of tied scores is a real cut point.
    last_of_tie = torch.ones_like(conf, dtype=torch.bool)
    last_of_tie[:-1] = conf[1:] < conf[:-1]
    ok = ((hits / counts) >= target_precision) & last_of_tie
    if not ok.any():
        return Threshold(float(conf[0]) + 1e-6, float("nan"), 0.0, target_precision)
    k = int(torch.nonzero(ok).max())
    return Threshold(float(conf[k]), float(hits[k] / counts[k]), float(counts[k] / len(conf)), target_precision)


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
    """What calibration on the validation split decides: the temperature and the review threshold."""

    temperature: float
    threshold: Threshold
    target_precision: float
    n: int  # validation items it was fitted on


def calibrate(val_logits: torch.Tensor, val_labels: torch.Tensor, target_precision: float) -> Calibration:
    """Fit the temperature, then choose the review threshold on the calibrated validation confidences."""
    temperature = fit_temperature(val_logits, val_labels)
    conf, pred = torch.softmax(val_logits / temperature, 1).max(1)
    thr = choose_threshold(conf, pred == val_labels, target_precision)
    return Calibration(temperature, thr, target_precision, len(val_labels))
