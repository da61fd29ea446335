"""Build a model folder from a trained network: steps that each return their section, and
``model.json`` written once, at the end.

    metrics = build_model_folder(model, ds, cfg, out, drawn=pool)             # returns-train
    build_model_folder(model, ds, cfg, out, lessons=lessons, lineage=lineage)  # returns-retrain
    build_model_folder(model, ds, cfg, out, save=False, meta=meta)             # returns-report

The steps, in order; each returns what it made, and none reads back from disk what an earlier one holds:

    weights  model.pt (not when re-reporting a folder): the CPU state dict it holds (ModelParts.weights)
    rule     the float path's review rule (training/rule.py: gate, temperature, certified threshold, test
             figures), and the ModelMeta it makes: model.json without its int8 section
    plots    the evaluation figures: confusion matrix, reliability diagram, risk-coverage, t-SNE
    trust    the trust report on the float rule (training/trust.py: trust.json and its figures);
             returns metrics.json's ``trust`` section
    int8     with ``TrainConfig.int8``: the float graph exported once, quantised, the int8 rule fitted
             with the same settings and lessons, its trust figures measured (training/quantize.py
             ``int8_path``); returns the graph and model.json's ``int8`` section

then ``model.int8.onnx``, ``model.json`` (``returns_model.meta.write_meta``, atomic; after the graph
it names) and ``metrics.json``. A run that stops in a step leaves the folder's model.json as it was
(none, for a new folder), never one without the sections the later steps would have added.

How a step serves a folder that is not written yet: the trust reports run the real serving core,
``handler.core.Classifier``, so their figures are what a server answers. The core serves a
``returns_model.artifact.ModelParts`` (the ModelMeta, the weights and the graphs, held in memory:
what the folder will hold) through the same rule choice, probe checks, forward pass and decisions as
a folder; only where the weights and graphs come from differs. The other way, a staging folder
renamed into place at the end, would still write a model.json before each trust report (without and
then with the int8 section) and read the network back from disk for each, and a re-report would have
to carry the folder's other files (train_config.json, history, checkpoint) across the rename.

What is made once and handed on: the float graph, exported in the int8 step and given to the int8
trust report's core too (its fallback would otherwise export again); the drawn-outlier pool, which
training drew for its batches and hands to the int8 step's calibration photos (``drawn``).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from returns_model.artifact import PROBE_PHOTOS, ModelParts, make_probe, save_weights, weights_of
from returns_model.fileio import write_bytes, write_json
from returns_model.meta import ArchConfig, ModelMeta, PreprocessSpec, write_meta
from returns_model.names import (CONFUSION_MATRIX_PLOT, INT8_FILE, METRICS_FILE, RELIABILITY_PLOT,
                                 RISK_COVERAGE_PLOT, TSNE_PLOT)
from returns_model.network import SEResNet
from training import plots
from training.calibrate import risk_coverage
from training.config import TrainConfig, gate_layer, make_arch
from training.data import Dataset, make_spec
from training.evaluate import drift_reference, predict_logits
from training.gate_fit import forward_with_tap
from training.quantize import CalibrationPhotos, int8_path
from training.rule import Lessons, Rule, RuleSettings, fit_rule
from training.trust import TrustSettings, trust_report, trust_section

log = logging.getLogger("training.pipeline")


def build_model_folder(model: SEResNet, ds: Dataset, cfg: TrainConfig, out: Path, *,
                       train_seconds: float | None = None, save: bool = True, meta: ModelMeta | None = None,
                       lessons: Lessons | None = None, lineage: dict[str, Any] | None = None,
                       drawn: torch.Tensor | None = None) -> dict[str, Any]:
    """Run the steps of the module docstring on ``model`` (trained, on its device) and write the
    folder ``out``; returns metrics.json's content.

    ``meta`` (re-reporting an existing folder, ``save=False``) supplies the architecture and
    preprocessing, and the name, version and top-k to keep; otherwise they come from ``cfg``. A
    retrain (training/retrain.py) passes what it learnt from the reviewers' decisions (``lessons``:
    decided products become familiar to the gate, ``not_a_product`` photos stay flagged, new setups
    are certified; both paths' rules learn them) and the model's ``lineage``. ``drawn``: the
    drawn-outlier pool training drew with ``cfg`` (training/drawn.py ``pool_for``), for the int8
    calibration photos; without it the int8 step draws the pool ``cfg`` describes.
    """
    out = Path(out)
    spec: PreprocessSpec = meta.preprocess if meta else make_spec(cfg, ds)
    arch = meta.arch if meta else make_arch(cfg, spec, len(ds.class_names))
    weights = save_weights(model, out) if save else weights_of(model)
    settings = RuleSettings.of(cfg, lessons)
    rule = fit_float_rule(model, ds, spec, gate_layer(cfg, arch), arch.num_classes, settings)
    float_meta = model_meta(rule, ds, arch, spec, min(cfg.top_k, arch.num_classes), cfg.model_version, lineage, meta)
    metrics = rule.metrics
    metrics["train_seconds"] = round(train_seconds, 1) if train_seconds is not None else None
    metrics["data_snapshot_sha256"] = ds.snapshot_sha256
    evaluation_plots(rule, model, spec, ds, cfg.tsne_samples, cfg.seed, out)
    served = ModelParts(float_meta, weights)
    trust = TrustSettings.of(cfg)
    metrics["trust"] = trust_section(trust_report(served, ds.test.images, ds.test.labels, trust, out=out))
    final_meta = float_meta
    if cfg.int8:
        graph, section = int8_path(served, ds, settings, CalibrationPhotos.of(cfg), trust, drawn)
        metrics["int8"] = {k: section[k] for k in ("test", "agreement_with_float_path", "trust")}
        write_bytes(out / INT8_FILE, graph)
        final_meta = replace(float_meta, int8=section)
    write_meta(final_meta, out)
    write_json(out / METRICS_FILE, metrics)
    log.info("test accuracy %.4f, macro-F1 %.4f, ECE %.4f -> %.4f; served rule: %.1f%% auto-accepted at %.2f%% precision",
             metrics["accuracy"], metrics["macro_f1"], metrics["ece_before_calibration"],
             metrics["ece_after_calibration"], 100 * metrics["test_coverage_at_threshold"],
             100 * (metrics["test_precision_at_threshold"] or 0))
    return metrics


def fit_float_rule(model: SEResNet, ds: Dataset, spec: PreprocessSpec, layer: str, num_classes: int,
                   settings: RuleSettings) -> Rule:
    """The rule step: gate, temperature and certified threshold fitted on the eager network's outputs."""
    rule = fit_rule(lambda images: forward_with_tap(model, images, spec, layer), ds, layer, num_classes, settings)
    cal, cert = rule.cal, rule.cal.certificate
    log.info("temperature %.4f; gate flags %.1f%% of validation; certified threshold %.4f: %s",
             cal.temperature, 100 * float(rule.val_flagged.float().mean()), cert.threshold, cert.reason)
    return rule


def model_meta(rule: Rule, ds: Dataset, arch: ArchConfig, spec: PreprocessSpec, top_k: int, model_version: str,
               lineage: dict[str, Any] | None, reported: ModelMeta | None = None) -> ModelMeta:
    """model.json's content but for its int8 section: the network, the float rule, the drift
    reference and the float probe. A re-report keeps the ``reported`` folder's name, version and
    top-k, which it does not recompute."""
    cal, cert = rule.cal, rule.cal.certificate
    val_flag_rate = float(rule.val_flagged.float().mean())
    val_probs = F.softmax(rule.val_logits / cal.temperature, 1)
    meta = ModelMeta(arch=arch, class_names=ds.class_names, preprocess=spec, temperature=cal.temperature,
                     threshold=cert.threshold, target_precision=cert.target_precision,
                     top_k=top_k, model_version=model_version,
                     coverage=cert.coverage, certificate=cert.to_dict(), unfamiliar=rule.gate.to_dict(),
                     reference=drift_reference(val_probs, ds.class_names, val_flag_rate),
                     data={"source": ds.source, "snapshot_sha256": ds.snapshot_sha256, "files": ds.files},
                     lineage=lineage,
                     probe=make_probe(ds.val.images[:PROBE_PHOTOS], rule.val_logits[:PROBE_PHOTOS]))
    if reported is not None:
        meta = replace(meta, model_name=reported.model_name, model_version=reported.model_version,
                       top_k=reported.top_k)
    return meta


def evaluation_plots(rule: Rule, model: SEResNet, spec: PreprocessSpec, ds: Dataset, tsne_samples: int, seed: int,
                     out: Path) -> None:
    """The plots step: the figures of the float rule on the test split (and validation's risk-coverage)."""
    labels, cal = ds.test.labels, rule.cal
    raw_conf, pred = F.softmax(rule.test_logits, 1).max(1)
    conf = F.softmax(rule.test_logits / cal.temperature, 1).max(1)[0]
    correct = pred == labels
    val_conf, val_pred = F.softmax(rule.val_logits / cal.temperature, 1).max(1)
    curves = {"validation (calibration)": risk_coverage(val_conf, val_pred == ds.val.labels)[:2],
              "test": risk_coverage(conf, correct)[:2]}
    plots.confusion_matrix(pred, labels, ds.class_names, out / CONFUSION_MATRIX_PLOT)
    plots.reliability_diagram(raw_conf, conf, correct, out / RELIABILITY_PLOT)
    plots.risk_coverage_curve(curves, cal.certificate, {"test": rule.metrics["test_coverage_at_threshold"]},
                              out / RISK_COVERAGE_PLOT)
    n = min(tsne_samples, len(labels))
    if n >= 50:
        _, feats = predict_logits(model, ds.test.subset(torch.arange(n)), spec, next(model.parameters()).device,
                                  with_features=True)
        plots.tsne_embeddings(feats, labels[:n], ds.class_names, out / TSNE_PLOT, seed=seed)
