"""Who a model descends from: its identity, the accuracy its report measured, and its lineage's first
release. A retrain (training/retrain.py) and a warm-started training run (training/train.py
``--init-from``) both record their parent with these; returns-compare (training/compare.py) reads
them back to measure a challenger's drift from the first release."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from returns_model.manifest import content_digest, sha256_file
from returns_model.names import META_FILE, METRICS_FILE, WEIGHTS_FILE


def model_sha256(model_dir: Path) -> str:
    """A model's identity: the content digest of its weights and model.json (what serving rebuilds from)."""
    model_dir = Path(model_dir)
    return content_digest({name: sha256_file(model_dir / name) for name in (WEIGHTS_FILE, META_FILE)})


def recorded_test_accuracy(model_dir: Path) -> float | None:
    """The test accuracy a model folder's report measured (metrics.json, the float graph), or None."""
    metrics = Path(model_dir) / METRICS_FILE
    return json.loads(metrics.read_text()).get("accuracy") if metrics.exists() else None


def lineage_root(model_dir: Path, meta) -> dict[str, Any]:
    """The first release of a model's lineage: the champion's own ``lineage.root``, or the champion
    itself when it has none (a trained release; or a candidate whose lineage records no root, whose
    drift is then counted from it). ``test_accuracy`` is what its report measured
    (metrics.json, the float graph on the test split), so that every later candidate can say how far
    it has moved from it, however many promotions lie between."""
    if meta.lineage and meta.lineage.get("root"):
        return meta.lineage["root"]
    return {"model_version": meta.model_version, "model_sha256": model_sha256(model_dir),
            "test_accuracy": recorded_test_accuracy(model_dir)}


def parent_record(model_dir: Path, meta) -> dict[str, Any]:
    """What a child's ``lineage`` says of the model it started from: its identity, version and root."""
    return {"parent_model_sha256": model_sha256(model_dir), "parent_model_version": meta.model_version,
            "root": lineage_root(model_dir, meta)}


def lineage_drift(challenger: Path, lineage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Test accuracy of the challenger (its metrics.json) against its lineage's root, or None when
    either figure is missing (a model without lineage, a folder without metrics)."""
    root = (lineage or {}).get("root") or {}
    accuracy = recorded_test_accuracy(challenger)
    if root.get("test_accuracy") is None or accuracy is None:
        return None
    return {"root_version": root.get("model_version"), "root_test_accuracy": root["test_accuracy"],
            "test_accuracy": accuracy, "change": accuracy - root["test_accuracy"]}
