"""Calibrate, choose the review threshold, evaluate on the test split, and write the report.

Called at the end of training; also runnable on its own to redo the report:

    python -m training.evaluate --model-dir models/release
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from training import plots
from training.artifact import WEIGHTS_FILE, ModelMeta
from training.calibrate import choose_threshold, expected_calibration_error, fit_temperature, nll, risk_coverage
from training.config import TrainConfig
from training.data import Dataset
from training.io import write_json
from training.model import ArchConfig, SEResNet
from training.preprocess import PreprocessSpec

log = logging.getLogger("training.evaluate")
# Confidence histogram edges for drift monitoring: most mass sits near 1, so the top is finely cut.
REFERENCE_EDGES = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0]


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


def drift_reference(probs: torch.Tensor, num_classes: int, class_names: list[str]) -> dict[str, Any]:
    """What the submitter compares a night's run against: predicted class mix and confidence histogram."""
    conf, pred = probs.max(1)
    mix = torch.bincount(pred, minlength=num_classes).double() / len(pred)
    counts = torch.histogram(conf.double(), bins=torch.tensor(REFERENCE_EDGES, dtype=torch.float64))[0]
    return {"n": len(pred), "source": "validation split, calibrated", "class_names": class_names,
            "class_distribution": [round(float(v), 6) for v in mix],
            "confidence_histogram": {"edges": REFERENCE_EDGES, "counts": [int(c) for c in counts]}}


def finalize(model: SEResNet, ds: Dataset, spec: PreprocessSpec, arch: ArchConfig, cfg: TrainConfig,
             device: torch.device, out: Path, train_seconds: float | None = None, save_weights: bool = True) -> dict:
    from training.train import predict_logits  # the one batched inference loop

    out = Path(out)
    if save_weights:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tmp = out / (WEIGHTS_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(out / WEIGHTS_FILE)

    val_logits, _ = predict_logits(model, ds.val, spec, device)
    temperature = fit_temperature(val_logits, ds.val.labels)
    val_probs = F.softmax(val_logits / temperature, 1)
    val_conf, val_pred = val_probs.max(1)
    thr = choose_threshold(val_conf, val_pred == ds.val.labels, cfg.target_precision)
    log.info("temperature %.4f; threshold %.4f gives %.1f%% coverage at %.2f%% validation precision",
             temperature, thr.threshold, 100 * thr.coverage, 100 * thr.precision)

    test_logits, feats = predict_logits(model, ds.test, spec, device, with_features=True)
    labels = ds.test.labels
    raw_conf, pred = F.softmax(test_logits, 1).max(1)
    conf = F.softmax(test_logits / temperature, 1).max(1)[0]
    correct = pred == labels
    accepted = conf >= thr.threshold
    coverage, risk, aurc = risk_coverage(conf, correct)
    per_class = per_class_scores(pred, labels, ds.class_names)
    metrics: dict[str, Any] = {
        "test_size": len(labels),
        "accuracy": float(correct.float().mean()),
        "macro_f1": sum(v["f1"] for v in per_class.values()) / len(per_class),
        "per_class": per_class,
        "nll_before_calibration": nll(test_logits, labels),
        "nll_after_calibration": nll(test_logits, labels, temperature),
        "ece_before_calibration": expected_calibration_error(raw_conf, correct),
        "ece_after_calibration": expected_calibration_error(conf, correct),
        "temperature": temperature,
        "target_precision": cfg.target_precision,
        "threshold": thr.threshold,
        "val_size": len(ds.val.labels),
        "val_coverage_at_target": thr.coverage,
        "val_precision_at_threshold": thr.precision,
        "test_coverage_at_threshold": float(accepted.float().mean()),
        "test_precision_at_threshold": float(correct[accepted].float().mean()) if accepted.any() else None,
        "aurc": aurc,
        "train_seconds": round(train_seconds, 1) if train_seconds is not None else None,
        "data_snapshot_sha256": ds.snapshot_sha256,
    }
    meta = ModelMeta(arch=arch, class_names=ds.class_names, preprocess=spec, temperature=temperature,
                     threshold=thr.threshold, target_precision=cfg.target_precision, top_k=min(cfg.top_k, arch.num_classes),
                     model_version=cfg.model_version, coverage=thr.coverage,
                     reference=drift_reference(val_probs, arch.num_classes, ds.class_names),
                     data={"source": ds.source, "snapshot_sha256": ds.snapshot_sha256, "files": ds.files})
    write_json(out / "model.json", meta.to_dict())
    write_json(out / "metrics.json", metrics)

    plots.confusion_matrix(pred, labels, ds.class_names, out / "confusion_matrix.png")
    plots.reliability_diagram(raw_conf, conf, correct, out / "reliability_diagram.png")
    plots.risk_coverage_curve(coverage, risk, thr, float(accepted.float().mean()), out / "risk_coverage.png")
    n = min(cfg.tsne_samples, len(labels))
    if n >= 50:
        plots.tsne_embeddings(feats[:n], labels[:n], ds.class_names, out / "tsne_embeddings.png", seed=cfg.seed)
    log.info("test accuracy %.4f, macro-F1 %.4f, ECE %.4f -> %.4f, test coverage %.3f at threshold",
             metrics["accuracy"], metrics["macro_f1"], metrics["ece_before_calibration"],
             metrics["ece_after_calibration"], metrics["test_coverage_at_threshold"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Re-run calibration, evaluation and the report for a trained model.")
    p.add_argument("--model-dir", default="models/release", help="folder with model.pt and train_config.json")
    p.add_argument("--data-dir", default=None, help="override the data folder recorded in train_config.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from training.train import load_data, make_arch, make_spec, pick_device

    model_dir = Path(args.model_dir)
    cfg = TrainConfig.from_json(model_dir / "train_config.json")
    if args.data_dir:
        cfg.data_dir = args.data_dir
    device = pick_device(cfg)
    ds = load_data(cfg, make_spec(cfg))
    spec = make_spec(cfg, ds)
    arch = make_arch(cfg, spec, ds)
    from training.model import build_model

    model = build_model(arch)
    model.load_state_dict(torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    model = model.to(device).to(memory_format=torch.channels_last)
    old = json.loads((model_dir / "metrics.json").read_text()) if (model_dir / "metrics.json").exists() else {}
    finalize(model, ds, spec, arch, cfg, device, model_dir, train_seconds=old.get("train_seconds"), save_weights=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
