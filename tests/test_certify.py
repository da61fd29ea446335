"""The certified review threshold: exact Clopper-Pearson bounds, the fixed-sequence walk, and an
honest 'review everything' when the calibration sample cannot carry the promise."""
import math

import pytest
import torch

from training.certify import (ACCEPT_NOTHING_THRESHOLD, Certificate, certify_threshold, clopper_pearson_upper,
                              log_binom_cdf, min_accepted)


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
