"""The certified review threshold: exact Clopper-Pearson bounds, the fixed-sequence walk, and an
honest 'review everything' when the calibration sample cannot carry the promise."""
import math

import pytest
import torch

from training.certify import (ACCEPT_NOTHING_THRESHOLD, Certificate, certify_threshold, clopper_pearson_upper,
                              default_grid, log_binom_cdf, min_accepted, rejects_risk_above)


def test_binomial_cdf_matches_a_direct_sum():
    n, p = 40, 0.07
    for k in (0, 1, 3, 10):
        direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
        assert math.exp(log_binom_cdf(k, n, p)) == pytest.approx(direct, rel=1e-12)


def test_clopper_pearson_known_values():
    # Zero events: the bound solves (1 - p)^n = delta exactly.
    assert clopper_pearson_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), abs=1e-10)
    # 29 errors in 4,014 accepted photos (the release model's validation), as scipy's beta.ppf gives.
    u = clopper_pearson_upper(29, 4014, 0.05)
    assert math.exp(log_binom_cdf(29, 4014, u)) == pytest.approx(0.05, rel=1e-6)
    assert 29 / 4014 < u < 0.0099
    assert min_accepted(0.01, 0.05) == 299  # 0.99^299 <= 0.05 < 0.99^298


def test_the_bound_holds_in_repeated_draws():
    """With delta = 0.1, the certified precision falls short of the target in at most ~10% of draws."""
    g = torch.Generator().manual_seed(0)
    misses, runs = 0, 200
    for _ in range(runs):
        conf = torch.rand(3000, generator=g)
        correct = torch.rand(3000, generator=g) < 0.9 + 0.1 * conf  # precision rises with confidence
        cert = certify_threshold(conf, correct, target_precision=0.97, delta=0.1)
        true_precision = (0.9 + 0.1 * (1 + cert.threshold) / 2) if not cert.accept_nothing else 1.0
        misses += true_precision < 0.97
    assert misses / runs <= 0.15


def test_a_sample_too_small_for_the_promise_sends_everything_to_review():
    conf = torch.full((200,), 0.999)
    cert = certify_threshold(conf, torch.ones(200, dtype=torch.bool), target_precision=0.99, delta=0.05)
    assert cert.accept_nothing and cert.threshold == ACCEPT_NOTHING_THRESHOLD > 1.0
    assert cert.coverage == 0.0 and "299" in cert.reason and "review" in cert.reason


def test_certificate_round_trips_and_reports_its_evidence():
    conf = torch.linspace(0.5, 1.0, 5000)
    correct = conf > 0.55
    cert = certify_threshold(conf, correct, 0.99, 0.05)
    assert not cert.accept_nothing and cert.precision_lower_bound >= 0.99
    assert cert.n_accepted == int((conf >= cert.threshold).sum()) and cert.n_calibration == 5000
    assert Certificate.from_dict(cert.to_dict()) == cert
    with pytest.raises(ValueError, match="target precision"):
        certify_threshold(conf, correct, 1.5, 0.05)


def test_a_certificate_missing_a_field_is_refused_with_the_names():
    with pytest.raises(ValueError) as e:
        Certificate.from_dict({"threshold": 0.9, "delta": 0.05, "extra": 1})
    assert str(e.value) == ("certificate is missing ['n_calibration', 'target_precision']; "
                            "got keys ['delta', 'extra', 'threshold']")


# ---- edges of the arithmetic (each pinned by a mutant that once survived) --------------------------

def test_binomial_cdf_at_its_edges():
    assert log_binom_cdf(0, 0, 0.5) == 0.0                 # no trials: P(X <= 0) = 1
    assert log_binom_cdf(5, 5, 0.3) == 0.0 and log_binom_cdf(7, 5, 0.3) == 0.0  # k >= n: certain
    assert log_binom_cdf(2, 5, 0.0) == 0.0                 # p = 0: no event ever
    assert log_binom_cdf(2, 5, 1.0) == -math.inf           # p = 1: every trial an event
    for k, n in ((-1, 5), (2, -1)):
        with pytest.raises(ValueError) as e:
            log_binom_cdf(k, n, 0.5)
        assert str(e.value) == f"need 0 <= k and 0 <= n, got k={k}, n={n}"


def test_clopper_pearson_at_its_edges():
    assert clopper_pearson_upper(5, 5, 0.05) == 1.0 and clopper_pearson_upper(0, 0, 0.05) == 1.0
    assert clopper_pearson_upper(0, 1, 0.05) == pytest.approx(0.95, abs=1e-9)  # (1 - p)^1 = 0.05
    for delta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError) as e:
            clopper_pearson_upper(1, 10, delta)
        assert str(e.value) == f"delta must be in (0, 1), got {delta}"
    with pytest.raises(ValueError) as e:
        clopper_pearson_upper(11, 10, 0.05)
    assert str(e.value) == "need 0 <= k <= n, got k=11, n=10"


def test_a_p_value_equal_to_delta_rejects_and_one_photo_can_be_enough():
    assert rejects_risk_above(0, 1, 0.5, 0.5)               # P(Bin(1, .5) <= 0) = .5 <= .5
    assert rejects_risk_above(0, 1, 0.99, 0.05)             # .01 <= .05
    assert not rejects_risk_above(0, 0, 0.5, 0.5)           # nothing accepted proves nothing


def test_the_default_grid():
    g = default_grid()
    assert len(g) == 1000 and g.dtype == torch.float64
    assert g[0] == -math.expm1(-17.0) and g[-1] == 0.0 and (g[1:] < g[:-1]).all()
    assert default_grid(2).tolist() == [-math.expm1(-17.0), 0.0]
    with pytest.raises(ValueError) as e:
        default_grid(1)
    assert str(e.value) == "grid size must be at least 2, got 1"


@pytest.mark.parametrize("target, delta, message", [
    (0.0, 0.05, "target precision must be in (0, 1), got 0.0"),
    (1.0, 0.05, "target precision must be in (0, 1), got 1.0"),
    (0.99, 0.0, "delta must be in (0, 1), got 0.0"),
    (0.99, 1.0, "delta must be in (0, 1), got 1.0"),
    (0.99, 1.5, "delta must be in (0, 1), got 1.5"),
], ids=["target-0", "target-1", "delta-0", "delta-1", "delta-1.5"])
def test_certify_refuses_impossible_targets_by_name(target, delta, message):
    with pytest.raises(ValueError) as e:
        certify_threshold(torch.rand(10), torch.ones(10, dtype=torch.bool), target, delta)
    assert str(e.value) == message


def test_certify_refuses_bad_samples_by_name():
    cases = [
        (torch.rand(3), torch.ones(4, dtype=torch.bool), "confidence (3,) and correct (4,) must be 1-D and of equal length"),
        (torch.rand(2, 2), torch.ones(2, 2, dtype=torch.bool),
         "confidence (2, 2) and correct (2, 2) must be 1-D and of equal length"),
        (torch.rand(0), torch.ones(0, dtype=torch.bool), "the calibration sample is empty"),
        (torch.tensor([0.5, float("nan")]), torch.ones(2, dtype=torch.bool), "confidence contains NaN or infinite values"),
    ]
    for conf, correct, message in cases:
        with pytest.raises(ValueError) as e:
            certify_threshold(conf, correct)
        assert str(e.value) == message


def test_certify_defaults_are_99_percent_at_delta_5_percent():
    conf = torch.linspace(0.5, 1.0, 2000)
    cert = certify_threshold(conf, torch.ones(2000, dtype=torch.bool))
    assert (cert.target_precision, cert.delta) == (0.99, 0.05)
    one = certify_threshold(torch.tensor([0.9]), torch.tensor([True]))
    assert one.accept_nothing and one.reason.startswith("cannot certify precision 0.99 at delta 0.05: only 1 "
                                                        "calibration photos; even with zero errors at least 299")


def test_accept_nothing_when_exactly_the_minimum_accepted_has_one_error():
    """299 photos (the minimum for 99% at delta 0.05) with one error: the sample is big enough, the
    first candidate fails; the certificate says so, and accepts nothing."""
    n = min_accepted(0.01, 0.05)
    assert n == 299
    correct = torch.ones(n, dtype=torch.bool)
    correct[0] = False
    cert = certify_threshold(torch.full((n,), 0.999), correct, 0.99, 0.05)
    assert cert == Certificate(
        threshold=ACCEPT_NOTHING_THRESHOLD, target_precision=0.99, delta=0.05, n_calibration=299, n_accepted=0,
        errors=0, observed_precision=None, precision_lower_bound=None, coverage=0.0, accept_nothing=True,
        reason="cannot certify precision 0.99 at delta 0.05: the first candidate accepting >= 299 calibration "
               "photos already fails (1 errors among the 299 it accepts). Everything goes to review")


def walk_by_hand(conf: torch.Tensor, correct: torch.Tensor, grid: list[float], target: float, delta: float):
    """The fixed-sequence walk written out with scipy's binomial and beta: (t, n, k) or None."""
    from scipy.stats import binom

    best = None
    for t in grid:
        n = int((conf >= t).sum())
        if n < min_accepted(1 - target, delta):
            continue
        k = int((~correct[conf >= t]).sum())
        if binom.cdf(k, n, 1 - target) > delta:
            break
        best = (t, n, k)
    return best


def test_the_certificate_is_the_walk_done_by_hand_on_a_custom_grid():
    from scipy.stats import beta

    g = torch.Generator().manual_seed(5)
    conf = torch.rand(3000, generator=g, dtype=torch.float64) * 0.5 + 0.5
    correct = torch.rand(3000, generator=g, dtype=torch.float64) < conf ** 0.12  # errors more likely at low conf
    grid = [0.999, 0.99, 0.98, 0.96, 0.94, 0.92, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
    cert = certify_threshold(conf, correct, 0.97, 0.1, grid=torch.tensor(grid, dtype=torch.float64))
    t, n, k = walk_by_hand(conf, correct, grid, 0.97, 0.1)
    assert 0 < k and t not in (grid[0], grid[-1])  # an informative walk: errors seen, stopped inside the grid
    ucb = beta.ppf(0.9, k + 1, n - k)
    assert (cert.threshold, cert.n_accepted, cert.errors, cert.n_calibration) == (t, n, k, 3000)
    assert cert.observed_precision == 1 - k / n and cert.coverage == n / 3000
    assert cert.precision_lower_bound == pytest.approx(1 - ucb, abs=1e-9) and cert.precision_lower_bound >= 0.97
    assert (cert.target_precision, cert.delta, cert.accept_nothing) == (0.97, 0.1, False)
    assert cert.reason == f"certified: precision >= {1 - ucb:.5f} with probability >= 0.9"


def test_a_candidate_accepting_exactly_the_minimum_is_tested_not_skipped():
    cert = certify_threshold(torch.full((299,), 0.999), torch.ones(299, dtype=torch.bool), 0.99, 0.05)
    assert not cert.accept_nothing and cert.n_accepted == 299 and cert.errors == 0  # 0.99^299 = 0.0495 <= 0.05


def test_a_grid_that_never_accepts_enough_photos_says_so():
    cert = certify_threshold(torch.linspace(0.5, 0.9, 1000), torch.ones(1000, dtype=torch.bool), 0.99, 0.05,
                             grid=torch.tensor([0.99, 0.95]))
    assert cert.accept_nothing and "no candidate threshold of the grid accepts 299 or more of the 1000" in cert.reason


@pytest.mark.parametrize("grid", [[0.99, 0.5, 0.7], [], [[0.9, 0.5]]])
def test_a_grid_out_of_order_or_empty_is_refused(grid):
    with pytest.raises(ValueError) as e:
        certify_threshold(torch.rand(500), torch.ones(500, dtype=torch.bool), grid=torch.tensor(grid))
    assert str(e.value) == "grid must be a non-empty 1-D tensor sorted from high to low"


def test_a_grid_of_one_candidate_or_with_ties_is_fine():
    conf, ok = torch.full((400,), 0.95), torch.ones(400, dtype=torch.bool)
    assert certify_threshold(conf, ok, grid=torch.tensor([0.9])).threshold == pytest.approx(0.9)
    assert certify_threshold(conf, ok, grid=torch.tensor([0.96, 0.9, 0.9, 0.5])).threshold == pytest.approx(0.5)


def test_a_certificate_restated_higher_up_the_walk_is_recounted_and_never_lower():
    from training.certify import certificate_at, clopper_pearson_upper

    g = torch.Generator().manual_seed(7)
    conf = torch.rand(5000, generator=g) ** 0.3
    correct = torch.rand(5000, generator=g) < conf  # right more often when confident
    walked = certify_threshold(conf, correct, 0.9, 0.05)
    higher = float(default_grid()[(default_grid() > walked.threshold + 0.02)][-1])
    up = certificate_at(conf, correct, walked, higher)
    accepted = conf.double() >= higher
    assert up.threshold == higher and up.n_accepted == int(accepted.sum()) < walked.n_accepted
    assert up.errors == int((~correct)[accepted].sum()) and up.precision_lower_bound >= 0.9
    # every figure is recounted at the new threshold; the guarantee's target and delta are the walk's
    n, k = up.n_accepted, up.errors
    assert k > 0 and up.observed_precision == pytest.approx(1 - k / n)
    assert up.coverage == pytest.approx(n / len(conf))
    assert up.precision_lower_bound == pytest.approx(1 - clopper_pearson_upper(k, n, walked.delta))
    assert (up.target_precision, up.delta, up.accept_nothing) == (walked.target_precision, walked.delta, False)
    assert f"{up.precision_lower_bound:.5f}" in up.reason and f"{1 - walked.delta:g}" in up.reason
    assert certificate_at(conf, correct, walked, walked.threshold) == walked
    with pytest.raises(ValueError, match="below the walk's end"):
        certificate_at(conf, correct, walked, walked.threshold - 0.01)
    nothing = certificate_at(conf, correct, walked, 1.01, why="setup x cannot be certified")
    assert nothing.accept_nothing and nothing.coverage == 0 and nothing.reason.startswith("setup x cannot")
