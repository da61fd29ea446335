"""Redo the report of a trained model folder: ``returns-report``.

    returns-report --model-dir models/release

Rebuilds the network from model.json and model.pt (train_config.json only says where the data is)
and runs the model-folder pipeline on it again without saving the weights (training/pipeline.py):
the rule refitted and recertified on validation, the evaluation and its figures, the trust report,
the int8 path where the recorded settings build one, then model.json and metrics.json.

Exit codes (docs/exit-codes.md): 0 rewritten; 1 ``--device cuda`` (or a recorded ``cuda``) without
a GPU; 2 refused before anything is rewritten (argparse too): not a model folder, its
``train_config.json`` missing or unreadable, or the training data missing or truncated.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from returns_model.artifact import ArtifactError, load_model
from returns_model.device import DEVICES, DeviceError
from returns_model.names import METRICS_FILE
from training.config import TrainConfig, pick_device
from training.data import DataError, load_data
from training.errors import TrainConfigFileError
from training.pipeline import build_model_folder

EXIT_DEVICE = 1  # --device cuda (or a recorded cuda) without a GPU
EXIT_REFUSED = 2  # argparse's code too: not a model folder, no train_config.json, no data


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
    build_model_folder(model, ds, cfg, model_dir, train_seconds=old.get("train_seconds"), save=False, meta=meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
