"""A certified review threshold: auto-accept only where precision >= target is proven, not hoped.

Math
----
For a threshold ``t`` let ``A(t) = {i : conf_i >= t}`` and ``R(t)`` the true error rate among photos
that would be accepted. On ``n`` accepted calibration photos with ``k`` errors, the exact
Clopper-Pearson upper bound ``U(k, n, delta)`` is the ``p`` solving ``P(Binomial(n, p) <= k) = delta``
(equivalently the ``1 - delta`` quantile of ``Beta(k + 1, n - k)``). The null ``H_t: R(t) > alpha``
(``alpha = 1 - target``) is rejected exactly when ``P(Binomial(n, alpha) <= k) <= delta``, i.e.
``U <= alpha``.

Thresholds are tested in a fixed order, from the most to the least confident, each at level
``delta``, and the walk stops at the first one that is not rejected (fixed-sequence testing, as in
Learn-then-Test, Angelopoulos et al. 2021; the selective guaranteed-risk idea of Geifman &
El-Yaniv 2017). Fixed-sequence testing controls the family-wise error at ``delta`` without a
Bonferroni correction, so with probability >= 1 - delta over the calibration draw the returned
threshold has true precision >= target (for photos exchangeable with the calibration sample).

The candidates are a fixed, data-independent grid (``t = 1 - exp(-s)``, ``s`` evenly spaced); it is
dense where calibrated confidences crowd near 1. Leading candidates that accept fewer than
``n_min = ceil(log delta / log(1 - alpha))`` photos (299 for 99% / 0.05) are skipped: no outcome could
reject them, so letting them end the walk would certify nothing. The skip depends on the
confidences only, never on correctness, so conditionally on the confidences the walk is a fixed
sequence and the binomial test stays valid (errors are then independent Bernoullis, whose lower
tail is dominated by the binomial's with the same mean, Hoeffding 1956).

The binomial CDF is a log-space sum over ``i <= k`` (``math.lgamma``), so no scipy is needed; the
bound is found by bisection to 1e-12.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from returns_model.rule import accepted

METHOD = "clopper-pearson + fixed-sequence testing (Learn-then-Test) on a fixed grid"
# Threshold reported when nothing can be certified: above any probability, so every photo is reviewed.
ACCEPT_NOTHING_THRESHOLD = 1.01


def log_binom_cdf(k: int, n: int, p: float) -> float:
    """``log P(Binomial(n, p) <= k)``, exact up to float rounding, summed in log-space.

    The sum has ``k + 1`` terms; errors among accepted photos are few, so this is fast even for
    ``n`` in the tens of thousands.
    """
    if not (0 <= k and 0 <= n):
        raise ValueError(f"need 0 <= k and 0 <= n, got k={k}, n={n}")
    if k >= n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return -math.inf
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k + 1)]
    top = max(terms)
    return top + math.log(math.fsum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(k: int, n: int, delta: float, tol: float = 1e-12) -> float:
    """The exact one-sided ``1 - delta`` upper confidence bound on a binomial rate (k events in n).

    Bisection on ``p`` for ``P(Bin(n, p) <= k) = delta``; the CDF falls monotonically in ``p``.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0 or k == n:
        return 1.0
    log_delta = math.log(delta)
    lo, hi = k / n, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if log_binom_cdf(k, n, mid) > log_delta:
            lo = mid
        else:
            hi = mid
    return hi


def rejects_risk_above(k: int, n: int, alpha: float, delta: float) -> bool:
    """True when ``k`` errors in ``n`` prove the error rate is <= ``alpha`` at level ``delta``.

    One CDF evaluation instead of a bisection: ``U(k, n) <= alpha  <=>  P(Bin(n, alpha) <= k) <= delta``.
    """
    return n > 0 and log_binom_cdf(k, n, alpha) <= math.log(delta)


def min_accepted(alpha: float, delta: float) -> int:
    """Fewest accepted photos that can certify ``error <= alpha``: zero errors need ``(1-alpha)^n <= delta``."""
    return math.ceil(math.log(delta) / math.log1p(-alpha))


def default_grid(size: int = 1000, max_s: float = 17.0) -> torch.Tensor:
    """Fixed candidate thresholds, high to low: ``1 - exp(-s)`` for ``s`` from ``max_s`` to 0.

    Fixed before seeing data (the fixed-sequence guarantee needs that); uniform in ``-log(1 - t)`` so
    the grid is fine near 1 (``max_s = 17`` reaches 1 - 4e-8, below float32's 1 - 6e-8 step).
    """
    if size < 2:
        raise ValueError(f"grid size must be at least 2, got {size}")
    s = torch.linspace(max_s, 0.0, size, dtype=torch.float64)
    return -torch.expm1(-s)


@dataclass(frozen=True)
class Certificate:
    """What was proven about the review threshold, and on what evidence."""

    threshold: float  # auto-accept when calibrated confidence >= threshold
    target_precision: float
    delta: float  # probability that the guarantee fails (over the calibration draw)
    n_calibration: int
    n_accepted: int
    errors: int
    observed_precision: float | None
    precision_lower_bound: float | None  # 1 - Clopper-Pearson upper bound on the accepted error rate
    coverage: float
    method: str = METHOD
    accept_nothing: bool = False
    reason: str = ""
    # a retrained model's new setups: each one's certificate at the served threshold (to_dict() form)
    setups: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Certificate":
        missing = {"threshold", "target_precision", "delta", "n_calibration"} - set(d)
        if missing:
            raise ValueError(f"certificate is missing {sorted(missing)}; got keys {sorted(d)}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _validate(confidence: torch.Tensor, correct: torch.Tensor, target: float, delta: float) -> None:
    if not 0 < target < 1:
        raise ValueError(f"target precision must be in (0, 1), got {target}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if confidence.dim() != 1 or confidence.shape != correct.shape:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} "
                         "must be 1-D and of equal length")
    if len(confidence) == 0:
        raise ValueError("the calibration sample is empty")
    if not torch.isfinite(confidence).all():
        raise ValueError("confidence contains NaN or infinite values")


def certify_threshold(confidence: torch.Tensor, correct: torch.Tensor, target_precision: float = 0.99,
                      delta: float = 0.05, grid: torch.Tensor | None = None) -> Certificate:
    """The lowest grid threshold reached by a fixed-sequence walk whose every step is certified.

    ``confidence``: calibrated top-class probabilities of the calibration photos (never the test
    split); ``correct``: whether each top class was right. With probability >= 1 - delta the
    accepted photos' precision is >= ``target_precision``.
    """
    _validate(confidence, correct, target_precision, delta)
    alpha = 1 - target_precision
    grid = default_grid() if grid is None else grid.double()
    if grid.dim() != 1 or len(grid) == 0 or (grid[1:] > grid[:-1]).any():
        raise ValueError("grid must be a non-empty 1-D tensor sorted from high to low")
    conf = confidence.double()
    wrong = ~correct.bool()
    n_total = len(conf)
    order = torch.argsort(conf, descending=True)
    asc = conf[order].flip(0)  # ascending, for searchsorted
    cum_wrong = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(wrong[order].long(), 0)])
    n_min = min_accepted(alpha, delta)
    best: tuple[float, int, int] | None = None
    failed: tuple[int, int] | None = None  # (accepted, errors) of the candidate that ended the walk
    for t in grid.tolist():
        n = n_total - int(torch.searchsorted(asc, t, side="left"))  # photos with conf >= t
        if n < n_min:
            # Too few accepted photos for even zero errors to prove the target: the test could never
            # reject, so the candidate is skipped rather than allowed to end the walk. As the sets are
            # nested, only leading candidates are skipped.
            continue
        k = int(cum_wrong[n])
        if not rejects_risk_above(k, n, alpha, delta):
            failed = (n, k)
            break
        best = (t, n, k)
    if best is None:
        return _accept_nothing(n_total, failed, target_precision, delta, alpha)
    t, n, k = best
    ucb = clopper_pearson_upper(k, n, delta)
    return Certificate(threshold=float(t), target_precision=target_precision, delta=delta, n_calibration=n_total,
                       n_accepted=n, errors=k, observed_precision=1 - k / n, precision_lower_bound=1 - ucb,
                       coverage=n / n_total, reason=f"certified: precision >= {1 - ucb:.5f} with probability "
                                                    f">= {1 - delta:g}")


def _accept_nothing(n_total: int, failed: tuple[int, int] | None, target: float, delta: float,
                    alpha: float) -> Certificate:
    """Everything goes to review, with the arithmetic of why the sample is too small."""
    need = min_accepted(alpha, delta)
    if n_total < need:
        why = f"only {n_total} calibration photos; even with zero errors at least {need} are needed"
    elif failed is None:
        why = f"no candidate threshold of the grid accepts {need} or more of the {n_total} calibration photos"
    else:
        why = (f"the first candidate accepting >= {need} calibration photos already fails "
               f"({failed[1]} errors among the {failed[0]} it accepts)")
    reason = (f"cannot certify precision {target:g} at delta {delta:g}: {why}. Everything goes to review")
    return Certificate(threshold=ACCEPT_NOTHING_THRESHOLD, target_precision=target, delta=delta,
                       n_accepted=0, errors=0, observed_precision=None,
                       precision_lower_bound=None, coverage=0.0, accept_nothing=True, n_calibration=n_total, reason=reason)


def certificate_at(confidence: torch.Tensor, correct: torch.Tensor, walked: Certificate, threshold: float,
                   why: str = "") -> Certificate:
    """``walked``'s guarantee at a higher threshold of the same grid (or nothing accepted).

    The walk rejected the null at every grid threshold above where it ended, with family-wise error
    at most delta, so each of them is certified at once; the figures are recounted at ``threshold``.
    ``why`` says what raised the threshold past every candidate, when it did.
    """
    if threshold < walked.threshold:
        raise ValueError(f"threshold {threshold} is below the walk's end {walked.threshold}: not certified there")
    if threshold == walked.threshold:
        return walked
    if threshold >= ACCEPT_NOTHING_THRESHOLD:
        return replace(walked, threshold=ACCEPT_NOTHING_THRESHOLD, n_accepted=0, errors=0, observed_precision=None,
                       precision_lower_bound=None, coverage=0.0, accept_nothing=True,
                       reason=f"{why or 'another calibration set cannot be certified'}; everything goes to review")
    auto = accepted(confidence.double(), threshold)
    n, k = int(auto.sum()), int((auto & ~correct.bool()).sum())
    ucb = clopper_pearson_upper(k, n, walked.delta)
    return replace(walked, threshold=float(threshold), n_accepted=n, errors=k, observed_precision=1 - k / n,
                   precision_lower_bound=1 - ucb, coverage=n / len(confidence),
                   reason=f"certified: precision >= {1 - ucb:.5f} with probability >= {1 - walked.delta:g}")
