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
WEIGHTS_FILE = "model.pt"  # a model folder: plain state_dict ...
META_FILE = "model.json"  # ... and everything needed to rebuild and use it
MODEL_ROOT_IN_POD = "/mnt/models"  # where KServe mounts storageUri (and the chart the model volume)

# Photo file names the submitter sends and training reads from image folders.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 40_000_000  # a 40-megapixel phone photo; larger is treated as a decompression bomb
MAX_INSTANCES = 256  # photos in one JSON request; the submitter's batches stay below it
