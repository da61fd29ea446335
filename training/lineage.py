"""Who a model descends from: its identity, the accuracy its report measured, and its lineage's first
release. A retrain (training/retrain.py) and a warm-started training run (training/train.py
``--init-from``) both record their parent with these; returns-compare (training/compare.py) reads
them back to measure a challenger's drift from the first release.

A model's identity here is its *weights digest* (``weights_sha256``: the content digest of model.pt
and model.json), not the ``model_sha256`` that served answers carry (the content digest of the
whole archive the server loaded, docs/interfaces.md). Folders written before these names (the
committed release's model.json among them) say ``parent_model_sha256`` and ``model_sha256`` for the
weights digest; ``read_lineage`` gives their lineage under today's names."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from returns_model.manifest import content_digest, sha256_file
from returns_model.names import META_FILE, METRICS_FILE, WEIGHTS_FILE


# Keys of lineages written before the weights digest had its own name -> today's (same values).
FORMER_KEYS = {"parent_model_sha256": "parent_weights_sha256", "model_sha256": "weights_sha256"}


def weights_sha256(model_dir: Path) -> str:
    """A model's identity in its lineage: the content digest of its weights and model.json (what serving
    rebuilds from; the report files and the int8 graph aside)."""
    model_dir = Path(model_dir)
    return content_digest({name: sha256_file(model_dir / name) for name in (WEIGHTS_FILE, META_FILE)})


def _renamed(record: dict[str, Any]) -> dict[str, Any]:
    return {FORMER_KEYS[k] if k in FORMER_KEYS and FORMER_KEYS[k] not in record else k: v for k, v in record.items()}


def read_lineage(lineage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A lineage (model.json's ``lineage`` or lineage.json) under today's key names: ``FORMER_KEYS``
    renamed in it and in its ``root``, every value as it was. None stays None."""
    if not lineage:
        return lineage
    out = _renamed(lineage)
    if isinstance(out.get("root"), dict):
        out["root"] = _renamed(out["root"])
    return out


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
    lineage = read_lineage(meta.lineage)
    if lineage and lineage.get("root"):
        return lineage["root"]
    return {"model_version": meta.model_version, "weights_sha256": weights_sha256(model_dir),
            "test_accuracy": recorded_test_accuracy(model_dir)}


def parent_record(model_dir: Path, meta) -> dict[str, Any]:
    """What a child's ``lineage`` says of the model it started from: its weights digest, version and root."""
    return {"parent_weights_sha256": weights_sha256(model_dir), "parent_model_version": meta.model_version,
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
