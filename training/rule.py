"""The review rule fitted on one forward path's own outputs: gate, temperature, certified threshold.

Both served paths are fitted by this one sequence on the same splits, with the same settings
(``RuleSettings``: the promise's targets and a retrain's lessons): the float model
(training/pipeline.py, eager) and the int8 graph (training/quantize.py, ONNX Runtime). Only the
forward pass differs, so it is passed in:

    rule = fit_rule(forward, ds, layer, num_classes, settings)

1. the gate's statistics on the training split's tapped embedding, its cutoff on validation;
2. with reviewers' decisions (a retrain, ``lessons``): decided product photos become familiar,
   ``not_a_product`` ones must stay flagged, and the cutoff is chosen again on ordinary validation photos;
3. temperature and certified threshold on validation (flagged photos never count as accepted); a
   retrain's new setups are certified too, and the highest of the thresholds is served;
4. the served rule's figures on the test split.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from returns_model.gate import UnfamiliarGate
from training.calibrate import Calibration, calibrate
from training.config import TrainConfig
from training.data import Dataset, Split
from training.evaluate import test_metrics
from training.gate_fit import add_modes, choose_cutoff, fit_statistics, sharpen

log = logging.getLogger(__name__)

# uint8 images [N, C, H, W] -> (logits [N, K], the gate layer's pooled embedding [N, D])
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Lessons:
    """What a retrain learnt from reviewers' decisions, for the rule of either path (float, int8)."""

    decided: Split | None = None  # decided product photos: they become familiar to the gate
    not_products: torch.Tensor | None = None  # uint8 photos decided ``not_a_product``: they stay flagged
    # labelled photos of each new setup, never trained on: the threshold is certified on each as well
    setups: dict[str, Split] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleSettings:
    """What a rule is fitted to, the same for the float and the int8 path: the share of ordinary
    validation photos the gate may flag, the certificate's target precision and delta, and what a
    retrain learnt from reviewers' decisions."""

    unfamiliar_rate: float
    target_precision: float
    delta: float
    lessons: Lessons = field(default_factory=Lessons)

    @classmethod
    def of(cls, cfg: TrainConfig, lessons: Lessons | None = None) -> "RuleSettings":
        return cls(cfg.unfamiliar_rate, cfg.target_precision, cfg.delta, lessons or Lessons())


@dataclass
class Rule:
    gate: UnfamiliarGate
    cal: Calibration
    val_logits: torch.Tensor
    val_flagged: torch.Tensor
    test_logits: torch.Tensor
    test_tap: torch.Tensor
    test_flagged: torch.Tensor
    metrics: dict[str, Any]  # training.evaluate.test_metrics of the served rule on the test split


def fit_rule(forward: Forward, ds: Dataset, layer: str, num_classes: int, settings: RuleSettings) -> Rule:
    lessons, rate = settings.lessons, settings.unfamiliar_rate
    _, train_tap = forward(ds.train.images)
    gate = fit_statistics(train_tap, ds.train.labels, ds.train.images, layer, num_classes)
    val_logits, val_tap = forward(ds.val.images)
    gate = choose_cutoff(gate, val_tap, ds.val.images, rate)
    if lessons.decided is not None and len(lessons.decided):
        gate = learn_from_decisions(gate, forward, lessons.decided, lessons.not_products, num_classes, val_tap,
                                    ds.val.images, rate)
    val_flagged = gate.flag(gate.score(val_tap, pixels=ds.val.images))
    setups = {}
    for name, split in lessons.setups.items():
        logits, tap = forward(split.images)
        setups[name] = (logits, split.labels, gate.flag(gate.score(tap, pixels=split.images)))
    cal = calibrate(val_logits, ds.val.labels, settings.target_precision, settings.delta, flagged=val_flagged,
                    setups=setups)
    test_logits, test_tap = forward(ds.test.images)
    test_flagged = gate.flag(gate.score(test_tap, pixels=ds.test.images))
    metrics = test_metrics(test_logits, ds.test.labels, cal, ds.class_names, flagged=test_flagged)
    return Rule(gate, cal, val_logits, val_flagged, test_logits, test_tap, test_flagged, metrics)


def learn_from_decisions(gate: UnfamiliarGate, forward: Forward, decided: Split, not_products: torch.Tensor | None,
                         num_classes: int, val_tap: torch.Tensor, val_images: torch.Tensor,
                         rate: float) -> UnfamiliarGate:
    """Decided product photos become familiar (extra modes), ``not_a_product`` ones must stay flagged;
    the cutoff is then chosen again on ordinary validation photos, so their flag rate stays ``rate``."""
    base_rows = len(gate.means)
    _, dec_tap = forward(decided.images)
    gate, info = add_modes(gate, dec_tap, decided.labels, decided.images, num_classes)
    gate = choose_cutoff(gate, val_tap, val_images, rate)
    if not_products is not None and len(not_products):
        _, nap_tap = forward(not_products)
        gate, nap = sharpen(gate, base_rows, nap_tap, not_products)
        gate = choose_cutoff(gate, val_tap, val_images, rate)
        info = {**info, "not_a_product": nap}
    log.info("gate after decisions: %s", info)
    return gate
