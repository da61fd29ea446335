"""Two models' served answers on the same photos, and the paired differences between them.

Both models answer through the serving core (handler.core.Classifier: calibrated confidence, the
certified threshold and the unfamiliar gate, as served). For each set of photos: accuracy, coverage
(auto-accepted share), the share sent to review, precision of the auto-accepted, and per-class
accuracy; every difference comes with a 95% paired-bootstrap interval (the same photos resampled
for both models, 2,000 draws, seeded).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from handler.core import Classifier
from training.lineage import weights_sha256

BOOTSTRAP = 2000


def predicted_and_accepted(clf: Classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted class, and whether each photo is auto-accepted, under the served rule."""
    pred, accepted = [], []
    for i in range(0, len(images), 512):
        probs, unf = clf.scores(list(images[i:i + 512]))
        ok, _ = clf.rule.decide(probs, unf)
        pred.append(probs.max(1).indices)
        accepted.append(ok)
    if not pred:
        return {"pred": torch.empty(0, dtype=torch.long), "accepted": torch.empty(0, dtype=torch.bool)}
    return {"pred": torch.cat(pred), "accepted": torch.cat(accepted)}


def predicted_and_accepted_cached(clf: Classifier, folder: Path, images: torch.Tensor,
                                  cache: dict) -> dict[str, torch.Tensor]:
    """``predicted_and_accepted``, remembered by the model's weights digest and the photos' bytes."""
    key = (weights_sha256(folder), hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest())
    if key not in cache:
        cache[key] = predicted_and_accepted(clf, images)
    return cache[key]


def _stats(correct: torch.Tensor, accepted: torch.Tensor) -> dict[str, Any]:
    n = len(correct)
    if n == 0:
        return {"accuracy": None, "coverage": None, "review_share": None, "precision": None, "correct_accepted": None}
    cov = float(accepted.float().mean())
    return {"accuracy": float(correct.float().mean()), "coverage": cov, "review_share": 1 - cov,
            "precision": float(correct[accepted].float().mean()) if accepted.any() else None,
            "correct_accepted": float((correct & accepted).float().mean()), "accepted": int(accepted.sum()),
            "errors_accepted": int((~correct & accepted).sum())}


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, draws: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Mean of ``b - a`` (per-photo values of challenger and champion on the same photos) with a 95%
    percentile interval from resampling photos."""
    diff = (b.double() - a.double())
    if len(diff) == 0:
        return {"value": None, "ci95": [None, None]}
    gen = torch.Generator().manual_seed(seed)
    means = torch.stack([diff[torch.randint(0, len(diff), (len(diff),), generator=gen)].mean()
                         for _ in range(draws)])
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"value": float(diff.mean()), "ci95": [lo, hi]}


def compare_set(champ: dict, chall: dict, labels: torch.Tensor | None, class_names: list[str], seed: int) -> dict:
    """One set of photos: both models' figures and the differences. ``labels`` None = not-a-product photos
    (nothing is correct; only what is accepted counts)."""
    if labels is None:
        labels = torch.full((len(champ["pred"]),), -1, dtype=torch.long)
    c1, c2 = champ["pred"] == labels, chall["pred"] == labels
    a1, a2 = champ["accepted"], chall["accepted"]
    out = {"n": len(labels), "champion": _stats(c1, a1), "challenger": _stats(c2, a2), "difference": {
        "accuracy": paired_bootstrap(c1, c2, seed=seed),
        "coverage": paired_bootstrap(a1, a2, seed=seed + 1),
        "correct_accepted": paired_bootstrap(c1 & a1, c2 & a2, seed=seed + 2),
    }}
    if (labels >= 0).any():
        out["per_class_accuracy_change"] = {
            name: float(c2[labels == k].float().mean() - c1[labels == k].float().mean())
            for k, name in enumerate(class_names) if (labels == k).any()}
        out["difference"]["precision"] = {"value": None if out["champion"]["precision"] is None
                                          or out["challenger"]["precision"] is None
                                          else out["challenger"]["precision"] - out["champion"]["precision"]}
    return out
