"""Calibrate and evaluate a trained network, and write its model folder and report.

    model.pt, model.json   the artifact (returns_model.artifact): weights and everything to use them
    metrics.json           test metrics, calibration and threshold figures
    *.png                  confusion matrix, reliability diagram, risk-coverage curve, t-SNE

Called at the end of training; also runnable on its own to redo the report, rebuilding the
network from model.json (train_config.json only says where the data is):

    python -m training.report --model-dir models/release
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from returns_model.artifact import ModelMeta, load_model, save_weights, write_meta
from returns_model.fileio import write_json
from returns_model.manifest import REFERENCE_EDGES, make_reference
from returns_model.network import SEResNet
from returns_model.preprocess import PreprocessSpec
from training import plots
from training.calibrate import Calibration, calibrate, risk_coverage
from training.config import TrainConfig, make_arch, pick_device
from training.data import Dataset, load_data, make_spec
from training.evaluate import predict_logits, test_metrics

log = logging.getLogger("training.report")


def drift_reference(probs: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """What the submitter compares a night's run against: predicted class mix and confidence histogram."""
    conf, pred = probs.max(1)
    mix = torch.bincount(pred, minlength=len(class_names)).double() / len(pred)
    counts = torch.histogram(conf.double(), bins=torch.tensor(REFERENCE_EDGES, dtype=torch.float64))[0]
    return make_reference(class_names, mix.tolist(), counts.tolist(), len(pred), "validation split, calibrated")


def write_model_folder(model: SEResNet, ds: Dataset, cfg: TrainConfig, device: torch.device, out: Path,
                       train_seconds: float | None = None, save: bool = True,
                       meta: ModelMeta | None = None) -> dict[str, Any]:
    """Calibrate on validation, evaluate on test, and write the model folder and its report.

    ``meta`` (re-reporting an existing model) supplies the architecture and preprocessing;
    otherwise they come from the training config.
    """
    out = Path(out)
    spec: PreprocessSpec = meta.preprocess if meta else make_spec(cfg, ds)
    arch = meta.arch if meta else make_arch(cfg, spec, len(ds.class_names))
    if save:
        save_weights(model, out)
    val_logits, _ = predict_logits(model, ds.val, spec, device)
    cal = calibrate(val_logits, ds.val.labels, cfg.target_precision)
    log.info("temperature %.4f; threshold %.4f gives %.1f%% coverage at %.2f%% validation precision",
             cal.temperature, cal.threshold.threshold, 100 * cal.threshold.coverage, 100 * cal.threshold.precision)
    test_logits, feats = predict_logits(model, ds.test, spec, device, with_features=True)
    metrics = test_metrics(test_logits, ds.test.labels, cal, ds.class_names)
    metrics["train_seconds"] = round(train_seconds, 1) if train_seconds is not None else None
    metrics["data_snapshot_sha256"] = ds.snapshot_sha256
    new_meta = ModelMeta(arch=arch, class_names=ds.class_names, preprocess=spec, temperature=cal.temperature,
                         threshold=cal.threshold.threshold, target_precision=cal.target_precision,
                         top_k=min(cfg.top_k, arch.num_classes), model_version=cfg.model_version,
                         coverage=cal.threshold.coverage,
                         reference=drift_reference(F.softmax(val_logits / cal.temperature, 1), ds.class_names),
                         data={"source": ds.source, "snapshot_sha256": ds.snapshot_sha256, "files": ds.files})
    if meta is not None:  # keep what the re-report does not recompute (name, version, top-k)
        new_meta = replace(new_meta, model_name=meta.model_name, model_version=meta.model_version, top_k=meta.top_k)
    write_meta(new_meta, out)
    write_json(out / "metrics.json", metrics)
    _plots(test_logits, feats, ds, cal, cfg, out)
    log.info("test accuracy %.4f, macro-F1 %.4f, ECE %.4f -> %.4f, test coverage %.3f at threshold",
             metrics["accuracy"], metrics["macro_f1"], metrics["ece_before_calibration"],
             metrics["ece_after_calibration"], metrics["test_coverage_at_threshold"])
    return metrics


def _plots(test_logits: torch.Tensor, feats: torch.Tensor, ds: Dataset, cal: Calibration, cfg: TrainConfig,
           out: Path) -> None:
    labels = ds.test.labels
    raw_conf, pred = F.softmax(test_logits, 1).max(1)
    conf = F.softmax(test_logits / cal.temperature, 1).max(1)[0]
    correct = pred == labels
    coverage, risk, _ = risk_coverage(conf, correct)
    plots.confusion_matrix(pred, labels, ds.class_names, out / "confusion_matrix.png")
    plots.reliability_diagram(raw_conf, conf, correct, out / "reliability_diagram.png")
    plots.risk_coverage_curve(coverage, risk, cal.threshold, float((conf >= cal.threshold.threshold).float().mean()),
                              out / "risk_coverage.png")
    n = min(cfg.tsne_samples, len(labels))
    if n >= 50:
        plots.tsne_embeddings(feats[:n], labels[:n], ds.class_names, out / "tsne_embeddings.png", seed=cfg.seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Re-run calibration, evaluation and the report for a trained model.")
    p.add_argument("--model-dir", default="models/release", help="folder with model.pt, model.json, train_config.json")
    p.add_argument("--data-dir", default=None, help="override the data folder recorded in train_config.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_dir = Path(args.model_dir)
    cfg = TrainConfig.from_json(model_dir / "train_config.json")
    if args.data_dir:
        cfg.data_dir = args.data_dir
    device = pick_device(cfg)
    model, meta = load_model(model_dir, device)
    model = model.to(memory_format=torch.channels_last)
    ds = load_data(cfg, meta.preprocess)
    old = json.loads((model_dir / "metrics.json").read_text()) if (model_dir / "metrics.json").exists() else {}
    write_model_folder(model, ds, cfg, device, model_dir, train_seconds=old.get("train_seconds"), save=False,
                       meta=meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
