"""Names and limits that several components must agree on. Standard library only.

One owner for each fact: the archive builder, the handler, the submitter, the local server
and the benchmarks import these instead of restating them (the chart's copies are checked
against them by tests/test_helm_chart.py).
"""
from __future__ import annotations

MODEL_NAME = "returns-classifier"  # the TorchServe/KServe model name and the .mar's base name
MAR_FILE = f"{MODEL_NAME}.mar"
MODEL_STORE = "model-store"  # the folder under a model root that holds the .mar
MANIFEST_FILE = "artifact_manifest.json"  # beside model-store/: SHA-256s, metrics, drift reference
MODEL_ROOT_IN_POD = "/mnt/models"  # where KServe mounts storageUri (and the chart the model volume)

# --- a model folder's files (docs/interfaces.md, "Model artifact") -------------------------------
# What serving rebuilds the model from (returns_model.artifact, returns_model.meta):
WEIGHTS_FILE = "model.pt"  # plain state_dict ...
META_FILE = "model.json"  # ... and everything needed to rebuild and use it
INT8_FILE = "model.int8.onnx"  # the int8 graph; its review rule in model.json is fitted on its outputs
# What training leaves beside them (training/train.py, report.py, trust.py, requirements.py):
TRAIN_CONFIG_FILE = "train_config.json"  # the run's resolved TrainConfig
DATA_REQUIREMENTS_FILE = "data_requirements.json"  # what the data allows, written before training
CHECKPOINT_FILE = "checkpoint.pt"  # the resume point after each epoch
HISTORY_FILE = "history.jsonl"  # one line per epoch (training or fine-tuning)
METRICS_FILE = "metrics.json"  # the report: test metrics, calibration and threshold figures
TRUST_FILE = "trust.json"  # the trust report under the served rule
CONFUSION_MATRIX_PLOT = "confusion_matrix.png"
RELIABILITY_PLOT = "reliability_diagram.png"
RISK_COVERAGE_PLOT = "risk_coverage.png"
TSNE_PLOT = "tsne_embeddings.png"
UNFAMILIAR_SCORES_PLOT = "unfamiliar_scores.png"
UNFAMILIAR_ROUTED_PLOT = "unfamiliar_routed.png"
# A retrained candidate's (training/retrain.py) and a challenger's verdict (training/compare.py):
RETRAIN_CONFIG_FILE = "retrain_config.json"
HELDOUT_FILE = "heldout.jsonl"  # the decided photos held out of the fine-tune, judged by returns-compare
LINEAGE_FILE = "lineage.json"
COMPARISON_FILE = "comparison.json"
COMPARISON_PLOT = "comparison.png"
# Inside the .mar, beside model.pt and model.json (an extracted archive is a model folder too):
ONNX_FILE = "model.onnx"  # the float graph, built by training/archive.py
MODEL_CONFIG_FILE = "model-config.yaml"  # the serving knobs, as TorchServe reads them
METRICS_CONFIG_FILE = "metrics.yaml"  # the metrics TorchServe exports (also in the model root's config/)

# --- a night's run folder, <output>/run_<run-id>/ (docs/submitter.md, "What a run writes") -------
# returns-submit writes them (returns_submit.journal, returns_submit.outputs); reviewers' tools,
# retraining, the demo and the benchmarks read them.
PREDICTIONS_FILE = "predictions.jsonl"  # the journal: one classified photo a line
REJECTED_FILE = "rejected.jsonl"  # the journal: one rejected photo a line
RUN_METADATA_FILE = "run_metadata.json"  # counts, drift, model check, exit code, resolved config
REVIEW_QUEUE_FILE = "review_queue.jsonl"  # the photos people should look at, in review order
PREDICTIONS_CSV = "predictions.csv"
SUCCESS_MARKER = "_SUCCESS"  # the run is complete and published
LATEST_FILE = "LATEST"  # in <output>: the name of the latest published run folder


def run_folder(run_id: str) -> str:
    """The run folder's name under the output volume."""
    return f"run_{run_id}"


def shard_file(name: str, shard_index: int | str, shard_count: int | str) -> str:
    """One shard's own copy of a run-folder file: ``predictions.jsonl`` -> ``predictions.shard-0-of-2.jsonl``,
    ``_SUCCESS`` -> ``_SUCCESS.shard-0-of-2``. ``"*"`` for both gives the glob of every shard's copy."""
    base, dot, ext = name.rpartition(".")
    if not base:  # no extension (a leading dot is not one)
        base, dot, ext = name, "", ""
    return f"{base}.shard-{shard_index}-of-{shard_count}{dot}{ext}"


# Photo file names the submitter sends and training reads from image folders.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel phone photo; larger is treated as a decompression bomb
MAX_INSTANCES = 256  # photos in one JSON request; the submitter's batches stay below it
