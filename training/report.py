"""Calibrate and evaluate a trained network, and write its model folder and report.

    model.pt, model.json   the artifact (returns_model.artifact): weights and everything to use them
    metrics.json           test metrics, calibration and threshold figures
    *.png                  confusion matrix, reliability diagram, risk-coverage curve, t-SNE

Called at the end of training; also runnable on its own to redo the report, rebuilding the
network from model.json (train_config.json only says where the data is):

    returns-report --model-dir models/release

Exit codes (docs/exit-codes.md): 0 rewritten; 1 ``--device cuda`` (or a recorded ``cuda``) without
a GPU; 2 refused before anything is rewritten (argparse too): not a model folder, its
``train_config.json`` missing or unreadable, or the training data missing or truncated.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from returns_model.artifact import PROBE_PHOTOS, ArtifactError, load_model, make_probe, save_weights
from returns_model.device import DEVICES, DeviceError
from returns_model.fileio import write_json
from returns_model.meta import ModelMeta, PreprocessSpec, write_meta
from returns_model.names import (CONFUSION_MATRIX_PLOT, METRICS_FILE, RELIABILITY_PLOT, RISK_COVERAGE_PLOT,
                                 TSNE_PLOT)
from returns_model.network import SEResNet
from training import plots
from training.calibrate import Calibration, risk_coverage
from training.config import TrainConfig, gate_layer, make_arch, pick_device
from training.data import DataError, Dataset, load_data, make_spec
from training.errors import TrainConfigFileError
from training.evaluate import drift_reference, predict_logits
from training.gate_fit import forward_with_tap
from training.quantize import add_int8_path
from training.rule import Lessons, fit_rule
from training.trust import trust_report

log = logging.getLogger("training.report")
EXIT_DEVICE = 1  # --device cuda (or a recorded cuda) without a GPU
EXIT_REFUSED = 2  # argparse's code too: not a model folder, no train_config.json, no data


def write_model_folder(model: SEResNet, ds: Dataset, cfg: TrainConfig, device: torch.device, out: Path,
                       train_seconds: float | None = None, save: bool = True,
                       meta: ModelMeta | None = None, lessons: Lessons | None = None,
                       lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit the gate, calibrate and certify on validation, evaluate on test, and write the model
    folder with its report and trust report.

    ``meta`` (re-reporting an existing model) supplies the architecture and preprocessing;
    otherwise they come from the training config. A retrain (training/retrain.py) passes what it
    learnt from the reviewers' decisions (``lessons``: decided products become familiar to the gate,
    ``not_a_product`` photos stay flagged, new setups are certified) and the model's ``lineage``.
    """
    out = Path(out)
    spec: PreprocessSpec = meta.preprocess if meta else make_spec(cfg, ds)
    arch = meta.arch if meta else make_arch(cfg, spec, len(ds.class_names))
    if save:
        save_weights(model, out)
    layer = gate_layer(cfg, arch)
    rule = fit_rule(lambda images: forward_with_tap(model, images, spec, layer), ds, cfg, layer, arch.num_classes,
                    lessons)
    cal, cert, val_flag_rate = rule.cal, rule.cal.certificate, float(rule.val_flagged.float().mean())
    log.info("temperature %.4f; gate flags %.1f%% of validation; certified threshold %.4f: %s",
             cal.temperature, 100 * val_flag_rate, cert.threshold, cert.reason)
    metrics = rule.metrics
    metrics["train_seconds"] = round(train_seconds, 1) if train_seconds is not None else None
    metrics["data_snapshot_sha256"] = ds.snapshot_sha256
    val_probs = F.softmax(rule.val_logits / cal.temperature, 1)
    new_meta = ModelMeta(arch=arch, class_names=ds.class_names, preprocess=spec, temperature=cal.temperature,
                         threshold=cert.threshold, target_precision=cert.target_precision,
                         top_k=min(cfg.top_k, arch.num_classes), model_version=cfg.model_version,
                         coverage=cert.coverage, certificate=cert.to_dict(), unfamiliar=rule.gate.to_dict(),
                         reference=drift_reference(val_probs, ds.class_names, val_flag_rate),
                         data={"source": ds.source, "snapshot_sha256": ds.snapshot_sha256, "files": ds.files},
                         lineage=lineage,
                         probe=make_probe(ds.val.images[:PROBE_PHOTOS], rule.val_logits[:PROBE_PHOTOS]))
    if meta is not None:  # keep what the re-report does not recompute (name, version, top-k)
        new_meta = replace(new_meta, model_name=meta.model_name, model_version=meta.model_version, top_k=meta.top_k)
    write_meta(new_meta, out)  # the trust report serves this folder, so model.json comes first
    _plots(rule.val_logits, rule.test_logits, model, spec, ds, cal, metrics, cfg, out)
    trust = trust_report(out, ds.test.images, ds.test.labels, cfg.trust_photos, cfg.seed)
    metrics["trust"] = {"test": trust["test"], "mixed_night": trust["mixed_night"],
                        "unfamiliar_kinds_routed": {k: v["routed_to_review"] for k, v in trust["unfamiliar_kinds"].items()}}
    if cfg.int8:  # a retrained candidate's int8 rule learns the same decided photos (training/rule.py)
        section = add_int8_path(out, ds, cfg, lessons=lessons)
        metrics["int8"] = {k: section[k] for k in ("test", "agreement_with_float_path", "trust")}
    write_json(out / METRICS_FILE, metrics)
    log.info("test accuracy %.4f, macro-F1 %.4f, ECE %.4f -> %.4f; served rule: %.1f%% auto-accepted at %.2f%% precision",
             metrics["accuracy"], metrics["macro_f1"], metrics["ece_before_calibration"],
             metrics["ece_after_calibration"], 100 * metrics["test_coverage_at_threshold"],
             100 * (metrics["test_precision_at_threshold"] or 0))
    return metrics


def _plots(val_logits: torch.Tensor, test_logits: torch.Tensor, model: SEResNet, spec: PreprocessSpec, ds: Dataset,
           cal: Calibration, metrics: dict[str, Any], cfg: TrainConfig, out: Path) -> None:
    labels = ds.test.labels
    raw_conf, pred = F.softmax(test_logits, 1).max(1)
    conf = F.softmax(test_logits / cal.temperature, 1).max(1)[0]
    correct = pred == labels
    val_conf, val_pred = F.softmax(val_logits / cal.temperature, 1).max(1)
    curves = {"validation (calibration)": risk_coverage(val_conf, val_pred == ds.val.labels)[:2],
              "test": risk_coverage(conf, correct)[:2]}
    plots.confusion_matrix(pred, labels, ds.class_names, out / CONFUSION_MATRIX_PLOT)
    plots.reliability_diagram(raw_conf, conf, correct, out / RELIABILITY_PLOT)
    plots.risk_coverage_curve(curves, cal.certificate, {"test": metrics["test_coverage_at_threshold"]},
                              out / RISK_COVERAGE_PLOT)
    n = min(cfg.tsne_samples, len(labels))
    if n >= 50:
        _, feats = predict_logits(model, ds.test.subset(torch.arange(n)), spec, next(model.parameters()).device,
                                  with_features=True)
        plots.tsne_embeddings(feats, labels[:n], ds.class_names, out / TSNE_PLOT, seed=cfg.seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Re-run calibration, evaluation and the report for a trained model.")
    p.add_argument("--model-dir", default="models/release", help="folder with model.pt, model.json, train_config.json")
    p.add_argument("--data-dir", default=None, help="override the data folder recorded in train_config.json")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help="override the device recorded in train_config.json (a model trained on a GPU, "
                        "reported on the CPU that serves it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_dir = Path(args.model_dir)
    try:
        cfg = TrainConfig.of_folder(model_dir, args.data_dir)
        if args.device:
            cfg.device = args.device
        device = pick_device(cfg)
        model, meta = load_model(model_dir, device)
        ds = load_data(cfg, meta.preprocess)
    except DeviceError as exc:
        print(f"returns-report: {exc}", file=sys.stderr)
        return EXIT_DEVICE
    except (ArtifactError, TrainConfigFileError, DataError) as exc:
        print(f"returns-report: {exc}; nothing was rewritten", file=sys.stderr)
        return EXIT_REFUSED
    model = model.to(memory_format=torch.channels_last)
    old = json.loads((model_dir / METRICS_FILE).read_text()) if (model_dir / METRICS_FILE).exists() else {}
    write_model_folder(model, ds, cfg, device, model_dir, train_seconds=old.get("train_seconds"), save=False,
                       meta=meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
