"""Score a trained network on a split: the batched inference loop and the test metrics."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from returns_model.manifest import REFERENCE_EDGES, make_reference
from returns_model.meta import PreprocessSpec
from returns_model.network import SEResNet
from returns_model.preprocess import normalize
from returns_model.rule import accepted
from training.calibrate import Calibration, expected_calibration_error, nll, risk_coverage
from training.data import Split

@torch.inference_mode()
def predict_logits(model: SEResNet, split: Split, spec: PreprocessSpec, device: torch.device,
                   batch_size: int = 512, with_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (and optionally penultimate features) for a whole split, in order."""
    model.eval()
    logits, feats = [], []
    for i in range(0, len(split), batch_size):
        x = normalize(split.images[i:i + batch_size].to(device), spec).contiguous(memory_format=torch.channels_last)
        f = model.features(x)
        logits.append(model.head(f).float().cpu())
        if with_features:
            feats.append(f.float().cpu())
    return torch.cat(logits), (torch.cat(feats) if with_features else None)



def per_class_scores(pred: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for k, name in enumerate(class_names):
        tp = int(((pred == k) & (labels == k)).sum())
        fp = int(((pred == k) & (labels != k)).sum())
        fn = int(((pred != k) & (labels == k)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        out[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": tp + fn}
    return out


def calibrated_and_accepted(logits: torch.Tensor, temperature: float, threshold: float,
                            flagged: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The served rule on logits: (calibrated probabilities, predicted class, auto-accepted). A photo
    is auto-accepted when its calibrated confidence reaches the threshold and the gate does not flag it."""
    probs = F.softmax(logits / temperature, 1)
    conf, pred = probs.max(1)
    return probs, pred, accepted(conf, threshold, flagged)


def test_metrics(logits: torch.Tensor, labels: torch.Tensor, cal: Calibration, class_names: list[str],
                 flagged: torch.Tensor | None = None) -> dict[str, Any]:
    """Accuracy, calibration and the served review rule's effect on the test split: a photo is
    auto-accepted when its calibrated confidence reaches the certified threshold and the gate
    does not flag it."""
    raw_conf, pred = F.softmax(logits, 1).max(1)
    probs, _, auto = calibrated_and_accepted(logits, cal.temperature, cal.threshold, flagged)
    conf = probs.max(1)[0]
    correct = pred == labels
    flagged = torch.zeros_like(correct) if flagged is None else flagged
    _, _, aurc = risk_coverage(conf, correct)
    per_class = per_class_scores(pred, labels, class_names)
    return {
        "test_size": len(labels),
        "accuracy": float(correct.float().mean()),
        "macro_f1": sum(v["f1"] for v in per_class.values()) / len(per_class),
        "per_class": per_class,
        "nll_before_calibration": nll(logits, labels),
        "nll_after_calibration": nll(logits, labels, cal.temperature),
        "ece_before_calibration": expected_calibration_error(raw_conf, correct),
        "ece_after_calibration": expected_calibration_error(conf, correct),
        "temperature": cal.temperature,
        "target_precision": cal.certificate.target_precision,
        "threshold": cal.threshold,
        "certificate": cal.certificate.to_dict(),
        "val_size": cal.certificate.n_calibration,
        "val_coverage_at_target": cal.certificate.coverage,
        "val_precision_at_threshold": cal.certificate.observed_precision,
        "test_flagged_unfamiliar": float(flagged.float().mean()),
        "test_coverage_at_threshold": float(auto.float().mean()),
        "test_precision_at_threshold": float(correct[auto].float().mean()) if auto.any() else None,
        "aurc": aurc,
    }


def drift_reference(probs: torch.Tensor, class_names: list[str], unfamiliar_rate: float | None) -> dict[str, Any]:
    """What the submitter compares a night's run against: predicted class mix, confidence histogram
    and the share of photos the gate flags."""
    conf, pred = probs.max(1)
    mix = torch.bincount(pred, minlength=len(class_names)).double() / len(pred)
    counts = torch.histogram(conf.double(), bins=torch.tensor(REFERENCE_EDGES, dtype=torch.float64))[0]
    return make_reference(class_names, mix.tolist(), counts.tolist(), len(pred), "validation split, calibrated",
                          unfamiliar_rate)
