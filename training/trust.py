"""The trust report: how the served review rule treats ordinary photos and photos unlike the
training data, measured through the serving core itself (handler.core.Classifier).

    trust.json                  test coverage and precision under the served rule, each unfamiliar
                                kind's share routed to review (and why), a mixed night
    unfamiliar_scores.png       the gate's score for ordinary photos and for each kind
    unfamiliar_routed.png       the share of each kind sent to review

Each kind is reported with its group (training/unfamiliar.py's ``GROUPS``: `tuning` kinds were looked
at while designing the gate, every other group is only reported); for a model trained with composites
(train_config.json `composite_weight` > 0) the kinds composites imitate are `trained_against`, and
with drawn outliers as well (`drawn_share` > 0) the kinds they imitate. training/pipeline.py calls this
on the folder's contents in memory (``ModelParts``), before model.json is written, so `make train`,
`returns-retrain` and `returns-report` all produce it; training/quantize.py measures the int8 path so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handler.core import Classifier
from returns_model.artifact import ModelParts
from returns_model.fileio import write_json
from returns_model.names import TRAIN_CONFIG_FILE, TRUST_FILE, UNFAMILIAR_ROUTED_PLOT, UNFAMILIAR_SCORES_PLOT
from training import plots, unfamiliar
from training.config import TrainConfig

MIXED_NIGHT_SHARE = 0.15  # unfamiliar photos in the mixed night


def _group(kind: str, against: frozenset[str]) -> str:
    return unfamiliar.TRAINED_AGAINST if kind in against else unfamiliar.GROUP_OF[kind]


def _train_config(model_dir: Path) -> TrainConfig | None:
    path = Path(model_dir) / TRAIN_CONFIG_FILE
    return TrainConfig.from_json(path) if path.exists() else None


def against_kinds(composite_weight: float, drawn_share: float) -> frozenset[str]:
    """The kinds whose like a network trained with these settings was trained against: composites' and
    drawn outliers' (drawn outliers ride in the composite slots, so none without composites)."""
    if composite_weight <= 0:
        return frozenset()
    return frozenset(unfamiliar.COMPOSITE_KINDS + (unfamiliar.DRAWN_KINDS if drawn_share > 0 else ()))


def trained_against(model_dir: Path) -> frozenset[str]:
    """``against_kinds`` for the folder's network, from its train_config.json (none without one)."""
    cfg = _train_config(model_dir)
    return frozenset() if cfg is None else against_kinds(cfg.composite_weight, cfg.drawn_share)


@dataclass(frozen=True)
class TrustSettings:
    """What a trust report is measured with: photos of each unfamiliar kind, the seed they and the
    mixed night are drawn with, and the kinds the network was trained against (grouped as such)."""

    photos: int
    seed: int
    against: frozenset[str] = frozenset()

    @classmethod
    def of(cls, cfg: TrainConfig) -> "TrustSettings":
        return cls(cfg.trust_photos, cfg.seed, against_kinds(cfg.composite_weight, cfg.drawn_share))


def _answers(clf: Classifier, pixels: list[torch.Tensor]) -> list[dict[str, Any]]:
    out = []
    for i in range(0, len(pixels), 256):
        probs, unf = clf.scores(pixels[i:i + 256])
        out.extend(clf.describe(probs, unf))
    return out


def trust_report(served: Path | ModelParts, test_images: torch.Tensor, test_labels: torch.Tensor,
                 settings: TrustSettings, cpu_backend: str = "eager", out: Path | None = None) -> dict[str, Any]:
    """Measure the served rule (a model folder's, or its contents in memory) on the test split and on
    every kind of unfamiliar photo; write the report and its figures into ``out`` (None: only return
    it, as training/quantize.py does for the int8 path)."""
    clf = Classifier(served, warmup=False, cpu_backend=cpu_backend)
    photos_per_kind, seed = settings.photos, settings.seed
    ordinary = _answers(clf, list(test_images))
    pred = torch.tensor([r["class_id"] for r in ordinary])
    correct = pred == test_labels
    accepted = torch.tensor([not r["needs_review"] for r in ordinary])
    scores = {"ordinary": torch.tensor([r["unfamiliar_score"] or 0.0 for r in ordinary])}
    test = {"n": len(ordinary), "accuracy": float(correct.float().mean()),
            "coverage": float(accepted.float().mean()),
            "precision": float(correct[accepted].float().mean()) if accepted.any() else None,
            "flagged_unfamiliar": sum("unfamiliar" in r["review_reason"] for r in ordinary) / len(ordinary)}
    kinds: dict[str, dict[str, Any]] = {}
    routed_pool: list[bool] = []
    images_np = test_images[:, 0].numpy()
    against = settings.against
    for kind in unfamiliar.ALL_KINDS:
        results = clf.classify(unfamiliar.make(kind, photos_per_kind, seed, images_np))
        routed = [bool(r.get("needs_review", True)) for r in results]  # a rejected photo is never accepted
        routed_pool.extend(routed)
        kinds[kind] = {
            "group": _group(kind, against), "n": len(results),
            "routed_to_review": sum(routed) / len(results),
            "flagged_unfamiliar": sum("unfamiliar" in r.get("review_reason", []) for r in results) / len(results),
            "low_confidence": sum("low_confidence" in r.get("review_reason", []) for r in results) / len(results),
            "rejected_as_bad_photo": sum("error" in r for r in results) / len(results),
        }
        scores[kind] = torch.tensor([r["unfamiliar_score"] for r in results if r.get("unfamiliar_score") is not None])
    # A night of ordinary photos with 15% unfamiliar ones of every kind (seeded draw from the pool).
    n_unf = min(len(routed_pool), round(len(ordinary) * MIXED_NIGHT_SHARE / (1 - MIXED_NIGHT_SHARE)))
    pick = torch.randperm(len(routed_pool), generator=torch.Generator().manual_seed(seed))[:n_unf]
    night = {"ordinary": len(ordinary), "unfamiliar": n_unf,
             "unfamiliar_routed_to_review": float(torch.tensor(routed_pool)[pick].float().mean()),
             "ordinary_auto_accepted": test["coverage"], "ordinary_accepted_precision": test["precision"]}
    report = {"measured_with": f"handler.core.Classifier on this model folder (the served code path, {clf.backend})",
              "threshold": clf.meta.threshold, "certificate": clf.meta.certificate,
              "gate": {k: v for k, v in (clf.meta.unfamiliar or {}).items() if k not in ("means", "precision")},
              "test": test, "unfamiliar_kinds": kinds, "mixed_night": night}
    if out is None:
        return report
    out = Path(out)
    write_json(out / TRUST_FILE, report)
    if clf.gate is not None:
        plots.unfamiliar_histograms(scores["ordinary"], {k: v for k, v in scores.items() if k != "ordinary" and len(v)},
                                    clf.gate.cutoff, out / UNFAMILIAR_SCORES_PLOT)
    plots.routed_shares({"ordinary test": {"group": "ordinary", "routed_to_review": 1 - test["coverage"],
                                           "flagged_unfamiliar": test["flagged_unfamiliar"]}, **kinds},
                        out / UNFAMILIAR_ROUTED_PLOT)
    return report


def trust_section(report: dict[str, Any]) -> dict[str, Any]:
    """The trust report's figures that metrics.json (and model.json's ``int8``) carry."""
    return {"test": report["test"], "mixed_night": report["mixed_night"],
            "unfamiliar_kinds_routed": {k: v["routed_to_review"] for k, v in report["unfamiliar_kinds"].items()}}
