"""The promotion checks: what a challenger must pass to replace its champion (``decide``).

It promotes only when all of these hold, and otherwise names each that failed:

1. test accuracy no worse than the champion's by more than ``--tolerance`` (0.3 points);
2. the certified promise holds on test: precision of the auto-accepted >= the target (or, when the
   champion itself misses it, no lower than the champion's);
3. the challenger's threshold is certified (not "accept nothing");
4. better on the held-out decided photos: the 95% interval of the difference in correctly
   auto-accepted share lies above 0, and accuracy does not fall;
5. no more held-out ``not_a_product`` photos auto-accepted than the champion accepts;
6. the promise is not shown broken on the held-out decided photos: the challenger's errors among
   the ones it auto-accepts must not prove, at the 5% level (exact binomial test), a precision
   below the target. A handful of held-out photos can never certify the promise for a new setup,
   but a challenger that auto-accepts a new setup's photos at, say, 80% precision is refused.

Promotions stack: each challenger is judged against the champion it would replace, so several small
losses add up. ``--lineage-tolerance`` makes the challenger's drift from its lineage's first release
(training/lineage.py ``lineage_drift``) a seventh check (off by default).

The verdict is ``promotion`` in comparison.json. Files written before it had that name call it
``gate``, a word that now means only the unfamiliar-photo gate; ``promotion_of`` reads both.
"""
from __future__ import annotations

import math
from typing import Any

from training.certify import log_binom_cdf

TOLERANCE = 0.003  # test accuracy may fall by at most 0.3 points
PROMISE_LEVEL = 0.05  # check 6 refuses when errors this many would happen with probability <= 5% at the target
KEY, FORMER_KEY = "promotion", "gate"  # the verdict's key in comparison.json, and its former name


def precision_below_p_value(errors: int, accepted: int, target: float) -> float:
    """P(at least ``errors`` wrong among ``accepted``) if the precision were exactly ``target``."""
    if errors == 0:
        return 1.0
    return max(0.0, 1.0 - math.exp(log_binom_cdf(errors - 1, accepted, 1 - target)))


def decide(cmp: dict, target: float, tolerance: float, certified: bool,
           lineage_tolerance: float | None = None) -> dict[str, Any]:
    """The promotion checks of the module docstring: every check with its figures; promote iff all pass."""
    test, checks = cmp["sets"]["test"], []
    d_acc = test["difference"]["accuracy"]["value"]
    checks.append(("test_accuracy_within_tolerance", d_acc >= -tolerance,
                   f"test accuracy {100 * d_acc:+.2f} points (tolerance -{100 * tolerance:.1f})"))
    p1, p2 = test["champion"]["precision"] or 0.0, test["challenger"]["precision"] or 0.0
    checks.append(("certified_promise_holds_on_test", p2 >= min(target, p1),
                   f"test precision of auto-accepted {100 * p2:.2f}% (target {100 * target:g}%, champion {100 * p1:.2f}%)"))
    checks.append(("threshold_certified", certified, "the challenger's threshold is certified"
                   if certified else "the challenger's threshold certifies nothing: everything would go to review"))
    ho = cmp["sets"].get("heldout")
    if not ho or ho["n"] == 0:
        checks.append(("better_on_heldout", False, "no held-out decided photos: nothing shows the challenger is better"))
    else:
        ca, acc = ho["difference"]["correct_accepted"], ho["difference"]["accuracy"]["value"]
        checks.append(("better_on_heldout", ca["ci95"][0] > 0 and acc >= 0,
                       f"held-out correctly auto-accepted {100 * ca['value']:+.1f} points, 95% CI "
                       f"[{100 * ca['ci95'][0]:+.1f}, {100 * ca['ci95'][1]:+.1f}]; accuracy {100 * acc:+.1f} points"))
        errors, accepted = ho["challenger"].get("errors_accepted", 0), ho["challenger"].get("accepted", 0)
        if accepted:
            p_value = precision_below_p_value(errors, accepted, target)
            checks.append(("promise_not_broken_on_heldout", p_value > PROMISE_LEVEL,
                           f"held-out decided photos auto-accepted: {errors} wrong of {accepted} "
                           f"(precision {100 * (1 - errors / accepted):.1f}%; p = {p_value:.3g} that a "
                           f"{100 * target:g}% precision gives this many errors)"))
    nap = cmp["sets"].get("heldout_not_a_product")
    if nap and nap["n"]:
        n1, n2 = nap["champion"]["accepted"], nap["challenger"]["accepted"]
        checks.append(("not_a_product_stays_in_review", n2 <= n1,
                       f"held-out not-a-product photos auto-accepted: {n2} (champion {n1})"))
    if lineage_tolerance is not None:
        drift = cmp.get("lineage_drift")
        checks.append(("within_lineage_tolerance", drift is not None and drift["change"] >= -lineage_tolerance,
                       f"test accuracy {100 * drift['change']:+.2f} points against {drift['root_version']}, the "
                       f"lineage's first release (tolerance -{100 * lineage_tolerance:.1f})" if drift else
                       "no lineage root with a test accuracy to compare with"))
    promote = all(ok for _, ok, _ in checks)
    failed = [why for _, ok, why in checks if not ok]
    return {"promote": promote, "tolerance": tolerance, "lineage_tolerance": lineage_tolerance,
            "target_precision": target,
            "checks": [{"name": n, "passed": ok, "detail": why} for n, ok, why in checks],
            "reason": "every check passed" if promote else "kept the champion: " + "; ".join(failed)}


def promotion_of(comparison: dict) -> dict[str, Any]:
    """The promotion verdict of a comparison (comparison.json): ``promotion``, or ``gate`` in one
    written before the key was renamed."""
    return comparison[KEY] if KEY in comparison else comparison[FORMER_KEY]
