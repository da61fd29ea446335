"""Temperature scaling, ECE and the routing threshold on constructed data."""
import torch

from training.calibrate import choose_threshold, expected_calibration_error, fit_temperature, nll, risk_coverage


def overconfident(n=4000, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    logits = torch.randn(n, k, generator=g)
    logits[torch.arange(n), labels] += 2.0  # informative but noisy
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


def test_threshold_is_the_lowest_meeting_the_target():
    # 10 items by falling confidence; the 4th and 9th are wrong.
    conf = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90])
    correct = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    t = choose_threshold(conf, correct, target_precision=0.85)
    # Precision at cut k: 3/3, 3/4, 4/5, 5/6=.833, 6/7=.857, 7/8=.875, 7/9=.778, 8/10=.8 -> lowest ok cut is 0.92
    assert abs(t.threshold - 0.92) < 1e-6 and abs(t.coverage - 0.8) < 1e-9 and t.precision >= 0.85
    strict = choose_threshold(conf, correct, target_precision=1.0)
    assert abs(strict.threshold - 0.97) < 1e-6 and abs(strict.coverage - 0.3) < 1e-9


def test_ties_are_never_split_and_impossible_targets_review_everything():
    conf = torch.tensor([0.9, 0.9, 0.8])
    correct = torch.tensor([1, 0, 1], dtype=torch.bool)
    t = choose_threshold(conf, correct, target_precision=0.6)
    assert abs(t.threshold - 0.8) < 1e-6 and t.coverage == 1.0  # 0.9 alone is 1/2 < 0.6
    none = choose_threshold(torch.tensor([0.7, 0.6]), torch.tensor([0, 0], dtype=torch.bool), 0.99)
    assert none.coverage == 0.0 and none.threshold > 0.7


def test_risk_coverage_curve_ends_at_the_error_rate():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([1, 1, 0, 1], dtype=torch.bool)
    cov, risk, aurc = risk_coverage(conf, correct)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist()[-1] == 0.25 and 0 < aurc < 0.25
