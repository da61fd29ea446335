"""Fine-tune a champion model on reviewers' decisions: ``returns-retrain``.

    returns-retrain --champion models/versions/1.0 --decisions decisions/*.jsonl \\
                    --photos /data/results/archive /data/inbox --output models/versions/1.1-candidate

1. The decisions are checked and their photos found by hash, loaded and split into trained and
   held out (training/decided.py). Any problem stops the retrain with exit code 2 before anything is
   written: a bad decision file never changes a model.
2. Decided photos shot on a new backdrop lend it to the fine-tune and to a calibration set of the
   new setup (training/backdrop.py, ``--backdrop-share``).
3. The champion is fine-tuned on a replay of its training split plus the decided photos, through
   the batch recipe it was trained with, held to its own answers by distillation
   (training/finetune.py); ``--interpolate A`` then takes A of the fine-tuned weights and 1 - A of
   the champion's. Default 1: the fine-tuned weights as they are. A non-finite loss stops the
   retrain with exit code 1, before anything is written.
4. training/pipeline.build_model_folder then refits the gate (decided products become familiar,
   not-a-product ones must stay flagged), recalibrates, recertifies the threshold on validation and,
   with backdrop transfer, on every validation garment shown on a decided backdrop (the highest
   threshold is served, so the promise holds in the new setup too, not only on average),
   evaluates on test and writes the candidate folder, with ``lineage`` in model.json: the parent
   model's SHA-256, the decisions' hash and the held-out split's hash. The int8 CPU path is built
   and its own rule fitted the same way, decisions included (``--no-int8`` skips it).

Exit codes (docs/exit-codes.md): 0 candidate written; 1 ``--device cuda`` without a GPU, or the
fine-tune diverged; 2 refused before anything is written (argparse too): a setting
(``RetrainConfig.validate``), the decisions, an unusable champion, a ``--runs`` folder without
predictions, missing or truncated training data.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from returns_feedback.decisions import Decision, decisions_hash, split_hash
from returns_feedback.validate import RunError
from returns_model.artifact import ArtifactError, load_model
from returns_model.device import DeviceError
from returns_model.fileio import write_json, write_text
from returns_model.manifest import sha256_file
from returns_model.names import HELDOUT_FILE, HISTORY_FILE, LINEAGE_FILE, RETRAIN_CONFIG_FILE, TRAIN_CONFIG_FILE
from training.backdrop import new_setup
from training.config import TrainConfig, pick_device
from training.data import DataError, Split, load_data
from training.decided import DecidedPhotos, check_decisions, decision_files, load_decided
from training.errors import SettingError, TrainConfigFileError
from training.finetune import fine_tune, interpolate
from training.lineage import parent_record, weights_sha256
from training.pipeline import build_model_folder
from training.recipe import TrainingDiverged
from training.retrain_config import RetrainConfig, next_version
from training.rule import Lessons

log = logging.getLogger("training.retrain")
EXIT_DEVICE = 1  # --device cuda without a GPU (DeviceError)
EXIT_DIVERGED = 1  # the fine-tune's loss became NaN or infinite; nothing was written
# refused before anything is written: settings, decisions, the champion, the runs, the training data
EXIT_REFUSED = 2


def candidate_lineage(champion: Path, meta, decisions: list[Decision], decided: DecidedPhotos, rc: RetrainConfig,
                      backdrops: tuple[torch.Tensor, float] | None) -> dict[str, Any]:
    """The candidate's ``lineage``: its parent, what it learnt from and how it was fine-tuned."""
    return {
        **parent_record(champion, meta),
        "decisions_sha256": decisions_hash(decisions),
        "heldout_sha256": split_hash(r["sha256"] for r in decided.heldout_rows),
        "heldout_share": rc.holdout_share, "seed": rc.seed,
        "decision_files": {str(p): sha256_file(p) for p in decision_files(rc.decisions)},
        "counts": decided.counts,
        "fine_tune": {"epochs": rc.epochs, "replay": rc.replay, "decided_repeat": rc.decided_repeat, "lr": rc.lr,
                      "distill": rc.distill, "backdrop_share": rc.backdrop_share, "interpolate": rc.interpolate,
                      "new_setup_backdrops": len(backdrops[0]) if backdrops else 0},
    }


def retrain(rc: RetrainConfig) -> int:
    """The steps of the module docstring; the exit code."""
    t_start = time.time()
    champion = Path(rc.champion)
    model, meta = load_model(champion)
    checked = check_decisions(rc.decisions, rc.photos, rc.runs, meta.class_names)
    if checked is None:
        return EXIT_REFUSED
    decisions, paths = checked
    cfg = TrainConfig.from_json(champion / TRAIN_CONFIG_FILE)
    cfg = replace(cfg, output=rc.output, device=rc.device, threads=rc.threads, progress=rc.progress,
                  trust_photos=rc.trust_photos, tsne_samples=0, compile=False,
                  model_version=rc.model_version or next_version(meta.model_version),
                  data_dir=rc.data_dir or cfg.data_dir, int8=rc.int8)
    device = pick_device(cfg)
    model = model.to(device).to(memory_format=torch.channels_last)
    spec = meta.preprocess
    decided = load_decided(decisions, paths, meta.class_names, spec, rc.holdout_share, rc.seed)
    log.info("decisions: %s", decided.counts)
    ds = load_data(cfg, spec)
    backdrops, setups = new_setup(decided.train, ds, rc.backdrop_share, rc.seed)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        history = fine_tune(model, ds, decided.train, spec, rc, cfg, device, backdrops)
    except TrainingDiverged as exc:
        log.error("fine-tune stopped, nothing written: %s", exc)
        return EXIT_DIVERGED
    interpolate(start, model, rc.interpolate)
    out = Path(rc.output)
    out.mkdir(parents=True, exist_ok=True)
    lineage = candidate_lineage(champion, meta, decisions, decided, rc, backdrops)
    cfg.write(out / TRAIN_CONFIG_FILE)
    write_text(out / HELDOUT_FILE, "".join(json.dumps(r) + "\n" for r in decided.heldout_rows))
    write_json(out / RETRAIN_CONFIG_FILE, asdict(rc))
    write_text(out / HISTORY_FILE, "".join(json.dumps(h) + "\n" for h in history))
    # The report's "training split" is what the gate's statistics are fitted on: a prefix of the
    # (seeded, shuffled) training split, or all of it, plus the decided photos, which it then knows.
    base = ds.train.subset(torch.arange(min(rc.gate_photos, len(ds.train)))) if rc.gate_photos else ds.train
    report_ds = replace(ds, train=Split(torch.cat([base.images, decided.train.images]),
                                        torch.cat([base.labels, decided.train.labels])))
    metrics = build_model_folder(model, report_ds, cfg, out, train_seconds=time.time() - t_start,
                                 lessons=Lessons(decided.train, decided.train_not_products, setups), lineage=lineage)
    write_json(out / LINEAGE_FILE, {**lineage, "weights_sha256": weights_sha256(out), "model_version": cfg.model_version,
                                    "test_accuracy": metrics["accuracy"]})
    log.info("candidate %s written to %s in %.0f s", cfg.model_version, out, time.time() - t_start)
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    d = RetrainConfig()
    p = argparse.ArgumentParser(prog="returns-retrain", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Fine-tune a champion model on reviewers' decisions into a candidate "
                                            "model folder (judge it with returns-compare).")
    p.add_argument("--champion", required=True, help="the model folder now served (model.pt, model.json, train_config.json)")
    p.add_argument("--decisions", nargs="+", required=True,
                   help="decision files, JSONL or .csv (docs/interfaces.md); a folder = every *.jsonl and *.csv in it")
    p.add_argument("--photos", nargs="+", required=True, help="folders holding the decided photos (archive, inbox): found by hash")
    p.add_argument("--output", required=True, help="new folder for the candidate model")
    p.add_argument("--runs", nargs="*", default=[], help="run folders the decisions must refer to (optional)")
    p.add_argument("--holdout-share", type=float, default=d.holdout_share)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--replay", type=int, default=d.replay, help="training-split photos replayed per epoch")
    p.add_argument("--decided-repeat", type=int, default=d.decided_repeat, help="times each decided photo is seen per epoch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--distill", type=float, default=d.distill,
                   help="weight of keeping the champion's answers on replayed photos (0 = plain fine-tuning)")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--backdrop-share", type=float, default=d.backdrop_share,
                   help="share of replayed photos shown on backdrops of the decided photos (0 = off)")
    p.add_argument("--interpolate", type=float, default=d.interpolate,
                   help="candidate = A * fine-tuned + (1 - A) * champion, weight by weight (WiSE-FT); 1 = fine-tuned as is")
    p.add_argument("--gate-photos", type=int, default=d.gate_photos, help="training photos for the gate's statistics (0 = all)")
    p.add_argument("--trust-photos", type=int, default=d.trust_photos)
    p.add_argument("--data-dir", default=d.data_dir, help="override the champion's training data folder")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--model-version", default=d.model_version, help="default: the champion's, last number + 1")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="skip the int8 CPU graph (about a minute on 2 cores); the candidate then serves the float graph")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        rc = RetrainConfig(**vars(args)).validate()
    except SettingError as exc:
        for problem in exc.problems:
            print(f"returns-retrain: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return retrain(rc)
    except DeviceError as exc:
        print(f"returns-retrain: {exc}", file=sys.stderr)
        return EXIT_DEVICE
    # found before anything is written: the champion, the runs, the training data
    except (ArtifactError, TrainConfigFileError, RunError, DataError) as exc:
        print(f"returns-retrain: {exc}; nothing was trained or written", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    raise SystemExit(main())
