"""Temperature scaling, ECE and the routing threshold on constructed data."""
import numpy as np
import pytest
import torch

from training.calibrate import calibrate, expected_calibration_error, fit_temperature, nll, risk_coverage


def overconfident(n=4000, k=10, seed=0, signal=2.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += signal  # informative but noisy
    return logits * 4.0, labels  # ...and far too sharp


def test_temperature_lowers_nll_of_an_overconfident_model():
    logits, labels = overconfident()
    t = fit_temperature(logits, labels)
    assert t > 2.0
    assert nll(logits, labels, t) < nll(logits, labels) - 0.2
    probs_before = torch.softmax(logits, 1).max(1)
    probs_after = torch.softmax(logits / t, 1).max(1)
    correct = probs_before[1] == labels
    assert expected_calibration_error(probs_after[0], correct) < expected_calibration_error(probs_before[0], correct)


def test_calibrate_certifies_the_served_rule_flagged_photos_are_never_accepted():
    logits, labels = overconfident(n=6000, seed=1)
    cal = calibrate(logits, labels, target_precision=0.9, delta=0.05)
    assert cal.temperature > 2.0 and not cal.certificate.accept_nothing
    assert cal.certificate.precision_lower_bound >= 0.9 and cal.threshold == cal.certificate.threshold
    # Flag every other photo: flagged photos never count as accepted, so about half the coverage remains.
    flagged = torch.arange(len(labels)) % 2 == 0
    gated = calibrate(logits, labels, target_precision=0.9, delta=0.05, flagged=flagged)
    assert 0 < gated.certificate.coverage <= 0.5 * cal.certificate.coverage + 0.02


def test_risk_coverage_curve_ends_at_the_error_rate():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    cov, risk, aurc = risk_coverage(conf, correct)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert cov.dtype == risk.dtype == torch.float64  # the curve is computed in double precision
    assert risk.tolist()[-1] == 0.25 and 0 < aurc < 0.25


def test_calibrate_certifies_softmax_of_logits_over_the_fitted_temperature_at_the_given_delta():
    """The certificate is exactly certify_threshold's on softmax(logits / T), with the caller's delta."""
    from training.certify import certify_threshold

    logits, labels = overconfident(n=6000, seed=2)
    cal = calibrate(logits, labels, target_precision=0.9, delta=0.2)
    t = fit_temperature(logits, labels)
    conf, pred = torch.softmax(logits / t, 1).max(1)
    assert cal.temperature == t and cal.certificate == certify_threshold(conf, pred == labels, 0.9, 0.2)
    assert cal.certificate.delta == 0.2 and cal.certificate != calibrate(logits, labels, 0.9, 0.05).certificate


def test_ece_on_bins_whose_edges_are_exact():
    """bins=4: edges 0, .25, .5, .75, 1; a bin is (lo, hi], so 0.25 falls in the first and 0.5 in the second."""
    conf = torch.tensor([0.25, 0.5, 0.6, 0.7, 0.9])
    correct = torch.tensor([True, False, True, True, False])  # 3 or 5 bins give other values here
    c6, c7, c9 = (float(conf[i]) for i in (2, 3, 4))  # as float32 holds them
    expected = (abs(1 - 0.25) * 1 + abs(0 - 0.5) * 1 + abs(1 - (c6 + c7) / 2) * 2 + abs(0 - c9) * 1) / 5
    assert expected_calibration_error(conf, correct, bins=4) == pytest.approx(expected, abs=1e-15)
    # the default is 15 bins: 0.87 and 0.93 share the bin (13/15, 14/15] and are apart with 16 bins
    # (0.87 <= 14/16 < 0.93); values placed by hand, so no CPU's rounding of a softmax decides it
    c, ok = torch.tensor([0.87, 0.93]), torch.tensor([True, False])
    assert expected_calibration_error(c, ok) == expected_calibration_error(c, ok, bins=15) == pytest.approx(0.4)
    assert expected_calibration_error(c, ok, bins=16) == pytest.approx((0.13 + 0.93) / 2)


def test_fit_temperature_finds_the_nll_minimum_for_over_and_underconfident_models():
    from scipy.optimize import minimize_scalar

    for scale in (4.0, 0.3):  # far too sharp (T > 1), far too flat (T < 1)
        logits, labels = overconfident(n=3000, seed=4)
        logits = logits / 4.0 * scale
        t = fit_temperature(logits, labels)
        best = minimize_scalar(lambda lt: nll(logits.double(), labels, float(np.exp(lt))), bounds=(-5, 5),
                               method="bounded", options={"xatol": 1e-10})
        assert t == pytest.approx(float(np.exp(best.x)), rel=1e-5)
        assert (t > 1) == (scale > 1)


def test_a_failed_temperature_fit_says_so():
    logits, labels = overconfident(n=100)
    logits[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"temperature fit failed \(got nan\)"):
        fit_temperature(logits, labels)


def test_a_new_setup_gets_its_own_certificate_and_the_highest_threshold_is_served():
    """A retrained model's new setup, less accurate than ordinary photos: certified on the mixture,
    its errors would hide among ordinary photos; certified on its own, the served threshold rises
    until the setup keeps the target too, and both certificates are stated at that threshold."""
    logits, labels = overconfident(n=6000, seed=2)
    hard, hard_labels = overconfident(n=4000, seed=3, signal=1.7)  # the setup: right less often at each confidence
    alone = calibrate(logits, labels, 0.8, 0.05)
    cal = calibrate(logits, labels, 0.8, 0.05, setups={"booth": (hard, hard_labels, None)})
    assert cal.temperature == alone.temperature  # fitted on ordinary validation photos only
    setup = cal.certificate.setups["booth"]
    assert cal.threshold > alone.threshold and setup["threshold"] == cal.threshold
    assert setup["precision_lower_bound"] >= 0.8 and setup["n_calibration"] == 4000
    # the validation certificate, restated at the served threshold: recounted, still certified
    conf = torch.softmax(logits / cal.temperature, 1).max(1)
    accepted = conf[0] >= cal.threshold
    assert cal.certificate.n_accepted == int(accepted.sum()) < alone.certificate.n_accepted
    assert cal.certificate.errors == int((conf[1] != labels)[accepted].sum())
    assert cal.certificate.precision_lower_bound >= 0.8
    # on a fresh draw of the setup, the served threshold keeps the promise
    fresh, fresh_labels = overconfident(n=20000, seed=4, signal=1.7)
    c, p = torch.softmax(fresh / cal.temperature, 1).max(1)
    assert (p == fresh_labels)[c >= cal.threshold].float().mean() >= 0.8
    c, p = torch.softmax(fresh / cal.temperature, 1).max(1)
    assert (p == fresh_labels)[c >= alone.threshold].float().mean() < 0.8  # what the mixture would have served


def test_a_new_setup_too_small_to_certify_sends_everything_to_review():
    logits, labels = overconfident(n=6000, seed=5)
    cal = calibrate(logits, labels, 0.9, 0.05, setups={"booth": (logits[:20], labels[:20], None)})
    assert cal.certificate.accept_nothing and cal.certificate.coverage == 0 and cal.threshold > 1
    assert "setup booth cannot be certified" in cal.certificate.reason
    assert cal.certificate.setups["booth"]["accept_nothing"] and "only 20 calibration photos" in cal.certificate.setups["booth"]["reason"]


def test_a_setup_restated_where_validation_cannot_be_certified_says_it_was_validation():
    logits, labels = overconfident(n=6000, seed=5)
    cal = calibrate(logits[:20], labels[:20], 0.9, 0.05, setups={"booth": (logits, labels, None)})
    assert cal.certificate.accept_nothing and cal.threshold > 1
    booth = cal.certificate.setups["booth"]
    assert booth["accept_nothing"] and booth["reason"].startswith("validation cannot be certified")
