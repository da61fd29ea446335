"""Drift of a night's predictions against the release model's validation reference, each rule's
answers against that rule's own reference (`judge_rules`).

Three signals: the class mix, the confidence histogram and the share of photos the server's gate
flags as unfamiliar. Only the last two make a night "off" (`drift: true`): a changed class mix is
a real wave of returns of one kind, not a fault, so it is reported but raises no alarm. For each, the population
stability index (PSI) is reported, but the flag comes from a chi-square test of
homogeneity (night vs reference counts), which accounts for the run's size: with 100
photos and no drift at all, class-mix PSI already averages about (K-1)/n = 0.09, so a
fixed PSI level (0.1, 0.25) would flag small nights by chance and miss drift in big ones.
`psi_critical` is the PSI the same test would tolerate, for readers used to PSI.
A model folder serves two rules (float and int8, each with its own temperature, threshold, gate and
reference) and the machine decides which answers: a night is judged rule by rule, since one rule's
answers are not expected to look like the other's validation answers.
Stdlib only (the submitter image has no numpy/scipy).
"""
from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from returns_model.manifest import Reference

MIN_PHOTOS = 20  # below this the run is too small to say anything
MIN_EXPECTED = 5.0  # sparse bins are merged until each expects this many photos


def bin_index(x: float, edges: Sequence[float]) -> int:
    """Bin of x for histogram `edges` (right edge of the last bin included, outliers clipped)."""
    i = bisect.bisect_right(edges, x) - 1
    return min(max(i, 0), len(edges) - 2)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, x/2)."""
    if x <= 0:
        return 1.0
    return _gamma_q(df / 2.0, x / 2.0)


def chi2_isf(p: float, df: int) -> float:
    """The x with chi2_sf(x, df) = p (bisection; monotone)."""
    lo, hi = 0.0, max(1.0, df)
    while chi2_sf(hi, df) > p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > p else (lo, mid)
    return (lo + hi) / 2


def _gamma_q(a: float, x: float) -> float:
    # Series for P when x < a + 1, continued fraction (Lentz) for Q otherwise.
    log_pre = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_pre))
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return min(1.0, math.exp(log_pre) * h)


def psi(observed: Sequence[float], reference: Sequence[float]) -> float:
    """Population stability index between two count vectors (half a count added to each
    bin so an empty bin does not make it infinite)."""
    k = len(observed)
    n_o, n_r = sum(observed) + 0.5 * k, sum(reference) + 0.5 * k
    total = 0.0
    for o, r in zip(observed, reference, strict=True):
        po, pr = (o + 0.5) / n_o, (r + 0.5) / n_r
        total += (po - pr) * math.log(po / pr)
    return total


def _merge_sparse(observed: list[float], reference: list[float]) -> tuple[list[float], list[float]]:
    """Merge adjacent bins until each expects MIN_EXPECTED photos of the night (chi-square's
    approximation needs it); a sparse tail joins the last merged bin."""
    n, n_ref = sum(observed), sum(reference)
    out_o, out_r, acc_o, acc_r = [], [], 0.0, 0.0
    for o, r in zip(observed, reference, strict=True):
        acc_o, acc_r = acc_o + o, acc_r + r
        if n_ref and n * acc_r / n_ref >= MIN_EXPECTED:
            out_o.append(acc_o)
            out_r.append(acc_r)
            acc_o = acc_r = 0.0
    if acc_o or acc_r:
        if out_o:
            out_o[-1] += acc_o
            out_r[-1] += acc_r
        else:
            out_o, out_r = [acc_o], [acc_r]
    return out_o, out_r


def compare(observed: Sequence[float], reference: Sequence[float], alpha: float) -> dict:
    """PSI plus a chi-square test of homogeneity (2 x K contingency table) of two count vectors."""
    observed, reference = [float(x) for x in observed], [float(x) for x in reference]
    n, n_ref = sum(observed), sum(reference)
    out = {"n": int(n), "n_reference": round(n_ref), "psi": round(psi(observed, reference), 6)}
    if n < MIN_PHOTOS:
        return {**out, "drift": None, "reason": f"fewer than {MIN_PHOTOS} photos"}
    if n_ref <= 0:
        return {**out, "drift": None, "reason": "the reference has no photos"}
    obs, ref = _merge_sparse(observed, reference)
    cols = [(o, r) for o, r in zip(obs, ref, strict=True) if o + r > 0]
    df = len(cols) - 1
    if df < 1:
        return {**out, "drift": None, "reason": "a single bin after merging sparse bins"}
    grand = n + n_ref
    chi2 = 0.0
    for o, r in cols:
        col = o + r
        for count, row_total in ((o, n), (r, n_ref)):
            expected = row_total * col / grand
            chi2 += (count - expected) ** 2 / expected
    p_value = chi2_sf(chi2, df)
    scale = 1.0 / n + 1.0 / n_ref  # PSI ~ chi2 * scale under no drift
    return {
        **out,
        "chi2": round(chi2, 4), "df": df, "p_value": p_value,
        "psi_expected_no_drift": round(df * scale, 6),
        "psi_critical": round(chi2_isf(alpha, df) * scale, 6),
        "alpha": alpha,
        "drift": p_value < alpha,
    }


ALERTING = ("confidence", "unfamiliar")


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), as 1 - the lower tail summed in log space (k terms)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q, base = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    lower = math.fsum(math.exp(base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
                      for i in range(k))
    return max(0.0, 1.0 - lower)


def unfamiliar_share(unfamiliar: int, classified: int, rate: float, alpha: float) -> dict:
    """Is the night's share of photos flagged unfamiliar above the reference's rate? A one-sided
    exact binomial test, so it works for small nights too (a chi-square table would need 5
    expected flagged photos, i.e. 250 photos at a 2% rate); fewer flagged photos than usual is no fault."""
    out = {"n": classified, "unfamiliar": unfamiliar, "reference_rate": rate,
           "rate": round(unfamiliar / classified, 6) if classified else None}
    if classified < MIN_PHOTOS:
        return {**out, "drift": None, "reason": f"fewer than {MIN_PHOTOS} photos"}
    p_value = binomial_sf(unfamiliar, classified, rate)
    return {**out, "method": "one-sided exact binomial test", "p_value": p_value, "alpha": alpha,
            "drift": p_value < alpha}


def rule_drift(ref: Reference | None, class_counts: dict[int, int], confidence_counts: list[int] | None,
               alpha: float, unfamiliar: int | None = None, classified: int = 0, rule: str | None = None) -> dict:
    """The drift of one rule's answers (``None``: answers naming no rule) against the reference that
    ``ref.for_rule`` picks for it: per signal PSI, test and decision, and whether they are off.
    ``confidence_counts`` are binned on that reference's histogram edges."""
    if ref is None:
        return {"available": False, "drift": None,
                "reason": "no --reference given (artifact_manifest.json or model.json)"}
    chosen = ref.for_rule(rule)
    reference = chosen.body
    dist = reference["class_distribution"]
    n_ref = float(reference.get("n") or 0) or 1000.0
    expected = [p * n_ref for p in dist]
    observed = [class_counts.get(i, 0) for i in range(len(dist))]
    unknown = sum(c for i, c in class_counts.items() if not 0 <= i < len(dist))
    signals = {"class_mix": compare(observed, expected, alpha)}
    if unknown:
        signals["class_mix"]["unknown_class_ids"] = unknown
    hist = reference.get("confidence_histogram")
    if hist and confidence_counts is not None:
        signals["confidence"] = compare(confidence_counts, hist["counts"], alpha)
    rate = reference.get("unfamiliar_rate")
    if rate is not None and unfamiliar is not None:
        signals["unfamiliar"] = unfamiliar_share(unfamiliar, classified, float(rate), alpha)
    flags = [signals[k]["drift"] for k in ALERTING if k in signals and signals[k].get("drift") is not None]
    return {
        "available": True,
        "reference": ref.source,
        "reference_body": chosen.at,
        "reference_fallback": chosen.fallback,
        "method": "chi-square test of homogeneity vs the reference counts; PSI reported alongside",
        "signals": signals,
        "alerting_signals": [k for k in ALERTING if k in signals],
        "class_mix_shift": signals["class_mix"].get("drift"),
        "drift": any(flags) if flags else None,
    }


# ---- a night's answers, rule by rule ------------------------------------------------------------

NO_RULE = "unknown"  # where answers that name no rule (an older server's) are counted and judged


def rule_key(rule: object) -> str:
    """The name a rule's answers are counted and judged under."""
    return NO_RULE if rule is None else str(rule)


def edges_of(body: dict) -> list[float] | None:
    """The confidence-histogram edges of a reference body; None when it has no histogram."""
    return (body.get("confidence_histogram") or {}).get("edges")


@dataclass
class Tally:
    """What the drift tests need of one rule's answers: how many, their class ids, their confidences
    binned on the edges of the reference they are judged against, and how many the gate flagged."""

    rule: str | None
    edges: list[float] | None = None
    classified: int = 0
    unfamiliar: int = 0
    class_ids: Counter = field(default_factory=Counter)
    reference_histogram: list[int] | None = None

    def __post_init__(self) -> None:
        if self.edges and self.reference_histogram is None:
            self.reference_histogram = [0] * (len(self.edges) - 1)

    def add(self, class_id: int, confidence: float, unfamiliar: bool) -> None:
        self.classified += 1
        self.unfamiliar += unfamiliar
        self.class_ids[class_id] += 1
        if self.reference_histogram is not None:
            self.reference_histogram[bin_index(confidence, self.edges)] += 1


def _any_decided(flags: Iterable[bool | None]) -> bool | None:
    decided = [f for f in flags if f is not None]
    return any(decided) if decided else None


def judge_rules(ref: Reference | None, tallies: dict[str, Tally], alpha: float) -> dict:
    """The run_metadata `drift` object: each rule's answers judged against that rule's reference
    (`by_rule`, keyed as `tallies`), and at the top the judgement of the rule that answered the most
    photos (named in `rule`; ties by name), except that the night is off (`drift`) and its class mix
    shifted (`class_mix_shift`) when any rule's answers are. A night answered by one rule thus says
    at the top exactly what `by_rule` says of that rule; `mixed_rules` is true when more than one did."""
    by_rule = {key: rule_drift(ref, t.class_ids, t.reference_histogram, alpha, unfamiliar=t.unfamiliar,
                               classified=t.classified, rule=t.rule) for key, t in sorted(tallies.items())}
    if by_rule:
        main = min(by_rule, key=lambda k: (-tallies[k].classified, k))
        top = {**by_rule[main], "rule": main}
    else:  # no answers: every signal has too few photos, against the single reference
        empty = Tally(None, edges_of(ref.body) if ref else None)
        top = {**rule_drift(ref, {}, empty.reference_histogram, alpha, unfamiliar=0), "rule": None}
    if len(by_rule) > 1:
        top["drift"] = _any_decided(j["drift"] for j in by_rule.values())
        if "class_mix_shift" in top:
            top["class_mix_shift"] = _any_decided(j["class_mix_shift"] for j in by_rule.values())
    return {**top, "by_rule": by_rule, "mixed_rules": len(by_rule) > 1}
