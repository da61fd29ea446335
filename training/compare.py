"""Champion against challenger, and the checks that promote: ``returns-compare``.

    returns-compare --champion models/versions/1.0 --challenger build/candidate-1.1 \\
                    --photos /data/results/archive --promote-to models/versions

Both models answer through the serving core on the same photos (training/paired.py):

* ``test``: the Fashion-MNIST test split (10,000 photos, never trained on by either);
* ``heldout``: the decided product photos the retrain held out (``heldout.jsonl`` in the candidate,
  read back by training/decided.py);
* ``heldout_not_a_product``: held-out photos people said are no product (none should be accepted);
* any extra sets a caller passes (the demo's shifted test photos).

The promotion checks (training/promotion.py) then decide. Every comparison also reports
``lineage_drift``: the challenger's test accuracy against the lineage's first release
(``lineage.root`` in model.json, both as their reports measured them).

A promoted challenger is copied to ``<promote-to>/<model_version>/`` (never over an existing
folder): a new immutable model version, with its lineage in model.json. Serving it stays a values
change (``model.version``). Exit codes: 0 promoted (or would be, without --promote-to), 3 champion
kept, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from handler.core import Classifier
from returns_model.artifact import ArtifactError, read_meta
from returns_model.fileio import write_json
from returns_model.names import COMPARISON_FILE, COMPARISON_PLOT, TRAIN_CONFIG_FILE
from training import plots, promotion
from training.config import TrainConfig
from training.data import DataError, load_data
from training.decided import load_heldout
from training.lineage import lineage_drift, read_lineage
from training.paired import BOOTSTRAP, compare_set, predicted_and_accepted_cached
from training.promotion import TOLERANCE

log = logging.getLogger("training.compare")
EXIT_PROMOTE, EXIT_BAD_ARGS, EXIT_KEEP = 0, 2, 3


def compare(champion: Path, challenger: Path, test: tuple[torch.Tensor, torch.Tensor],
            sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]], tolerance: float = TOLERANCE,
            seed: int = 0, out: Path | None = None, cache: dict | None = None, threads: int = 0,
            lineage_tolerance: float | None = None) -> dict[str, Any]:
    """Both models on ``test`` and each named set; the promotion verdict; comparison.json and
    comparison.png in ``out`` (default: the challenger's folder).

    ``cache`` (a dict the caller keeps) remembers a model's answers on a set by the model's weights
    digest and the photos' bytes: a loop that compares each night's challenger with the last night's
    winner scores the winner once."""
    cache = {} if cache is None else cache
    c1, c2 = Classifier(champion, warmup=False, threads=threads), Classifier(challenger, warmup=False, threads=threads)
    if c1.meta.class_names != c2.meta.class_names:
        raise ValueError(f"the models' classes differ: {c1.meta.class_names} vs {c2.meta.class_names}")
    names = c1.meta.class_names
    lineage = read_lineage(c2.meta.lineage)  # an older candidate's under today's key names
    result: dict[str, Any] = {
        "champion": {"path": str(champion), "version": c1.meta.model_version, "threshold": c1.meta.threshold},
        "challenger": {"path": str(challenger), "version": c2.meta.model_version, "threshold": c2.meta.threshold,
                       "lineage": lineage},
        "method": f"served rule (handler.core.Classifier) on the same photos; 95% paired bootstrap, {BOOTSTRAP} draws",
        "sets": {}}
    for i, (name, (images, labels)) in enumerate({"test": test, **sets}.items()):
        log.info("comparing on %s (%d photos)", name, len(images))
        answers = [predicted_and_accepted_cached(clf, folder, images, cache)
                   for clf, folder in ((c1, champion), (c2, challenger))]
        result["sets"][name] = compare_set(*answers, labels, names, seed + 10 * i)
    result["lineage_drift"] = lineage_drift(challenger, lineage)
    cert = c2.meta.certificate or {}
    result[promotion.KEY] = promotion.decide(result, c2.meta.target_precision, tolerance,
                                             not cert.get("accept_nothing", False), lineage_tolerance)
    out = Path(out or challenger)
    write_json(out / COMPARISON_FILE, result)
    plots.champion_challenger(result, out / COMPARISON_PLOT)
    return result


def promote(challenger: Path, versions_root: Path) -> Path:
    """Copy the challenger to ``<versions_root>/<model_version>/``; never over an existing version."""
    version = read_meta(challenger).model_version
    dest = Path(versions_root) / version
    if dest.exists():
        raise FileExistsError(f"{dest} already exists: model versions are immutable")
    tmp = dest.with_name(f".{version}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(challenger, tmp)
    tmp.rename(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="returns-compare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--champion", required=True, type=Path, help="the model folder now served")
    p.add_argument("--challenger", required=True, type=Path, help="the candidate written by returns-retrain")
    p.add_argument("--photos", nargs="*", default=[], help="folders to find held-out photos in, by hash, if moved")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the challenger's train_config)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="test accuracy may fall by this much (0.003 = 0.3 points)")
    p.add_argument("--lineage-tolerance", type=float, default=None,
                   help="also refuse a challenger whose test accuracy is more than this below the lineage's first "
                        "release (0.005 = 0.5 points); default: reported only")
    p.add_argument("--promote-to", type=Path, default=None, help="versions folder: a promoted challenger is copied to <it>/<version>/")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("tolerance", "lineage_tolerance"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            print(f"returns-compare: --{name.replace('_', '-')} {value}: must be in [0, 1) (0.003 = 0.3 points)",
                  file=sys.stderr)
            return EXIT_BAD_ARGS
    try:
        meta = read_meta(args.challenger)
        read_meta(args.champion)  # a champion that is no model folder is refused before anything is scored
        if args.promote_to and (args.promote_to / meta.model_version).exists():
            raise ValueError(f"--promote-to {args.promote_to}: version {meta.model_version} is there already, and "
                             "model versions are immutable: give the candidate a new version")
        cfg = TrainConfig.from_json(args.challenger / TRAIN_CONFIG_FILE)
        if args.data_dir:
            cfg.data_dir = args.data_dir
        ds = load_data(cfg, meta.preprocess)
        sets = load_heldout(args.challenger, args.photos, meta.class_names, meta.preprocess)
    except (OSError, ValueError, ArtifactError, DataError) as exc:
        print(f"returns-compare: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    result = compare(args.champion, args.challenger, (ds.test.images, ds.test.labels), sets, args.tolerance, args.seed,
                     lineage_tolerance=args.lineage_tolerance)
    print(result[promotion.KEY]["reason"])
    drift = result["lineage_drift"]
    if drift:
        print(f"test accuracy against {drift['root_version']}, the lineage's first release: "
              f"{100 * drift['change']:+.2f} points ({100 * drift['root_test_accuracy']:.2f}% -> "
              f"{100 * drift['test_accuracy']:.2f}%)")
    if not result[promotion.KEY]["promote"]:
        return EXIT_KEEP
    if args.promote_to:
        print(f"promoted to {promote(args.challenger, args.promote_to)}")
    return EXIT_PROMOTE


if __name__ == "__main__":
    raise SystemExit(main())
