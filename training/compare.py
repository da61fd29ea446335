"""Champion against challenger, and the gate that promotes: ``returns-compare``.

    returns-compare --champion models/versions/1.0 --challenger build/candidate-1.1 \\
                    --photos /data/results/archive --promote-to models/versions

Both models answer through the serving core (handler.core.Classifier: calibrated confidence, the
certified threshold and the unfamiliar gate, as served) on the same photos:

* ``test``: the Fashion-MNIST test split (10,000 photos, never trained on by either);
* ``heldout``: the decided product photos the retrain held out (``heldout.jsonl`` in the candidate);
* ``heldout_not_a_product``: held-out photos people said are no product (none should be accepted);
* any extra sets a caller passes (the demo's shifted test photos).

For each: accuracy, coverage (auto-accepted share), the share sent to review, precision of the
auto-accepted, and per-class test accuracy; every difference comes with a 95% paired-bootstrap
interval (the same photos resampled for both models, 2,000 draws, seeded).

The gate promotes only when all of these hold, and otherwise names each that failed:

1. test accuracy no worse than the champion's by more than ``--tolerance`` (0.3 points);
2. the certified promise holds on test: precision of the auto-accepted >= the target (or, when the
   champion itself misses it, no lower than the champion's);
3. the challenger's threshold is certified (not "accept nothing");
4. better on the held-out decided photos: the 95% interval of the difference in correctly
   auto-accepted share lies above 0, and accuracy does not fall;
5. no more held-out ``not_a_product`` photos auto-accepted than the champion accepts;
6. the promise is not shown broken on the held-out decided photos: the challenger's errors among
   the ones it auto-accepts must not prove, at the 5% level (exact binomial test), a precision
   below the target. A handful of held-out photos can never certify the promise for a new setup,
   but a challenger that auto-accepts a new setup's photos at, say, 80% precision is refused.

Promotions stack: each challenger is judged against the champion it would replace, so several small
losses add up. Every comparison therefore also reports ``lineage_drift``: the challenger's test
accuracy against the lineage's first release (``lineage.root`` in model.json, both as their reports
measured them); ``--lineage-tolerance`` makes it a seventh check (off by default).

A promoted challenger is copied to ``<promote-to>/<model_version>/`` (never over an existing
folder): a new immutable model version, with its lineage in model.json. Serving it stays a values
change (``model.version``). Exit codes: 0 promoted (or would be, without --promote-to), 3 champion
kept, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from handler.core import Classifier
from returns_feedback.decisions import NOT_A_PRODUCT
from returns_model.artifact import ArtifactError, read_meta
from returns_model.fileio import write_json
from returns_model.preprocess import bytes_to_uint8
from training import plots
from training.certify import log_binom_cdf
from training.config import TrainConfig
from training.data import DataError, load_data
from training.lineage import model_sha256, recorded_test_accuracy
from training.decided import HELDOUT_FILE, index_photos

log = logging.getLogger("training.compare")
EXIT_PROMOTE, EXIT_BAD_ARGS, EXIT_KEEP = 0, 2, 3
TOLERANCE = 0.003  # test accuracy may fall by at most 0.3 points
BOOTSTRAP = 2000


def served(clf: Classifier, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Predicted class, and whether each photo is auto-accepted, under the served rule."""
    pred, accepted = [], []
    for i in range(0, len(images), 512):
        probs, unf = clf.scores(list(images[i:i + 512]))
        ok, _ = clf.rule.decide(probs, unf)
        pred.append(probs.max(1).indices)
        accepted.append(ok)
    if not pred:
        return {"pred": torch.empty(0, dtype=torch.long), "accepted": torch.empty(0, dtype=torch.bool)}
    return {"pred": torch.cat(pred), "accepted": torch.cat(accepted)}


def served_cached(clf: Classifier, folder: Path, images: torch.Tensor, cache: dict) -> dict[str, torch.Tensor]:
    """``served``, remembered by the model's SHA-256 and the photos' bytes."""
    key = (model_sha256(folder), hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest())
    if key not in cache:
        cache[key] = served(clf, images)
    return cache[key]


def _stats(correct: torch.Tensor, accepted: torch.Tensor) -> dict[str, Any]:
    n = len(correct)
    if n == 0:
        return {"accuracy": None, "coverage": None, "review_share": None, "precision": None, "correct_accepted": None}
    cov = float(accepted.float().mean())
    return {"accuracy": float(correct.float().mean()), "coverage": cov, "review_share": 1 - cov,
            "precision": float(correct[accepted].float().mean()) if accepted.any() else None,
            "correct_accepted": float((correct & accepted).float().mean()), "accepted": int(accepted.sum()),
            "errors_accepted": int((~correct & accepted).sum())}


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, draws: int = BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """Mean of ``b - a`` (per-photo values of challenger and champion on the same photos) with a 95%
    percentile interval from resampling photos."""
    diff = (b.double() - a.double())
    if len(diff) == 0:
        return {"value": None, "ci95": [None, None]}
    gen = torch.Generator().manual_seed(seed)
    means = torch.stack([diff[torch.randint(0, len(diff), (len(diff),), generator=gen)].mean()
                         for _ in range(draws)])
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"value": float(diff.mean()), "ci95": [lo, hi]}


def compare_set(champ: dict, chall: dict, labels: torch.Tensor | None, class_names: list[str], seed: int) -> dict:
    """One set of photos: both models' figures and the differences. ``labels`` None = not-a-product photos
    (nothing is correct; only what is accepted counts)."""
    if labels is None:
        labels = torch.full((len(champ["pred"]),), -1, dtype=torch.long)
    c1, c2 = champ["pred"] == labels, chall["pred"] == labels
    a1, a2 = champ["accepted"], chall["accepted"]
    out = {"n": len(labels), "champion": _stats(c1, a1), "challenger": _stats(c2, a2), "difference": {
        "accuracy": paired_bootstrap(c1, c2, seed=seed),
        "coverage": paired_bootstrap(a1, a2, seed=seed + 1),
        "correct_accepted": paired_bootstrap(c1 & a1, c2 & a2, seed=seed + 2),
    }}
    if (labels >= 0).any():
        out["per_class_accuracy_change"] = {
            name: float(c2[labels == k].float().mean() - c1[labels == k].float().mean())
            for k, name in enumerate(class_names) if (labels == k).any()}
        out["difference"]["precision"] = {"value": None if out["champion"]["precision"] is None
                                          or out["challenger"]["precision"] is None
                                          else out["challenger"]["precision"] - out["champion"]["precision"]}
    return out


PROMISE_LEVEL = 0.05  # check 6 refuses when errors this many would happen with probability <= 5% at the target


def precision_below_p_value(errors: int, accepted: int, target: float) -> float:
    """P(at least ``errors`` wrong among ``accepted``) if the precision were exactly ``target``."""
    if errors == 0:
        return 1.0
    return max(0.0, 1.0 - math.exp(log_binom_cdf(errors - 1, accepted, 1 - target)))


def lineage_drift(challenger: Path, lineage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Test accuracy of the challenger (its metrics.json) against its lineage's root, or None when
    either figure is missing (a model without lineage, a folder without metrics)."""
    root = (lineage or {}).get("root") or {}
    accuracy = recorded_test_accuracy(challenger)
    if root.get("test_accuracy") is None or accuracy is None:
        return None
    return {"root_version": root.get("model_version"), "root_test_accuracy": root["test_accuracy"],
            "test_accuracy": accuracy, "change": accuracy - root["test_accuracy"]}


def gate(cmp: dict, target: float, tolerance: float, certified: bool,
         lineage_tolerance: float | None = None) -> dict[str, Any]:
    """The promotion rule of the module docstring: every check with its figures; promote iff all pass."""
    test, checks = cmp["sets"]["test"], []
    d_acc = test["difference"]["accuracy"]["value"]
    checks.append(("test_accuracy_within_tolerance", d_acc >= -tolerance,
                   f"test accuracy {100 * d_acc:+.2f} points (tolerance -{100 * tolerance:.1f})"))
    p1, p2 = test["champion"]["precision"] or 0.0, test["challenger"]["precision"] or 0.0
    checks.append(("certified_promise_holds_on_test", p2 >= min(target, p1),
                   f"test precision of auto-accepted {100 * p2:.2f}% (target {100 * target:g}%, champion {100 * p1:.2f}%)"))
    checks.append(("threshold_certified", certified, "the challenger's threshold is certified"
                   if certified else "the challenger's threshold certifies nothing: everything would go to review"))
    ho = cmp["sets"].get("heldout")
    if not ho or ho["n"] == 0:
        checks.append(("better_on_heldout", False, "no held-out decided photos: nothing shows the challenger is better"))
    else:
        ca, acc = ho["difference"]["correct_accepted"], ho["difference"]["accuracy"]["value"]
        checks.append(("better_on_heldout", ca["ci95"][0] > 0 and acc >= 0,
                       f"held-out correctly auto-accepted {100 * ca['value']:+.1f} points, 95% CI "
                       f"[{100 * ca['ci95'][0]:+.1f}, {100 * ca['ci95'][1]:+.1f}]; accuracy {100 * acc:+.1f} points"))
        errors, accepted = ho["challenger"].get("errors_accepted", 0), ho["challenger"].get("accepted", 0)
        if accepted:
            p_value = precision_below_p_value(errors, accepted, target)
            checks.append(("promise_not_broken_on_heldout", p_value > PROMISE_LEVEL,
                           f"held-out decided photos auto-accepted: {errors} wrong of {accepted} "
                           f"(precision {100 * (1 - errors / accepted):.1f}%; p = {p_value:.3g} that a "
                           f"{100 * target:g}% precision gives this many errors)"))
    nap = cmp["sets"].get("heldout_not_a_product")
    if nap and nap["n"]:
        n1, n2 = nap["champion"]["accepted"], nap["challenger"]["accepted"]
        checks.append(("not_a_product_stays_in_review", n2 <= n1,
                       f"held-out not-a-product photos auto-accepted: {n2} (champion {n1})"))
    if lineage_tolerance is not None:
        drift = cmp.get("lineage_drift")
        checks.append(("within_lineage_tolerance", drift is not None and drift["change"] >= -lineage_tolerance,
                       f"test accuracy {100 * drift['change']:+.2f} points against {drift['root_version']}, the "
                       f"lineage's first release (tolerance -{100 * lineage_tolerance:.1f})" if drift else
                       "no lineage root with a test accuracy to compare with"))
    promote = all(ok for _, ok, _ in checks)
    failed = [why for _, ok, why in checks if not ok]
    return {"promote": promote, "tolerance": tolerance, "lineage_tolerance": lineage_tolerance,
            "target_precision": target,
            "checks": [{"name": n, "passed": ok, "detail": why} for n, ok, why in checks],
            "reason": "every check passed" if promote else "kept the champion: " + "; ".join(failed)}


def load_heldout(challenger: Path, photo_folders: list[str], class_names: list[str], spec) -> dict[str, tuple]:
    """The held-out decided photos recorded by the retrain, by hash (path first, else the folders)."""
    rows = [json.loads(x) for x in (challenger / HELDOUT_FILE).read_text().splitlines() if x.strip()] \
        if (challenger / HELDOUT_FILE).exists() else []
    index = index_photos(photo_folders) if photo_folders else {}
    products, labels, nap = [], [], []
    for r in rows:
        path = Path(r["path"])
        data = path.read_bytes() if path.exists() else None
        if data is None or hashlib.sha256(data).hexdigest() != r["sha256"]:
            if r["sha256"] not in index:
                raise FileNotFoundError(f"held-out photo {r['sha256'][:16]}... is neither at {path} nor in {photo_folders}")
            data = index[r["sha256"]].read_bytes()
        img = bytes_to_uint8(data, spec)
        if r["label"] == NOT_A_PRODUCT:
            nap.append(img)
        else:
            products.append(img)
            labels.append(class_names.index(r["label"]))
    empty = torch.empty((0, spec.channels, spec.size, spec.size), dtype=torch.uint8)
    out = {"heldout": (torch.stack(products) if products else empty, torch.tensor(labels, dtype=torch.long))}
    if nap:
        out["heldout_not_a_product"] = (torch.stack(nap), None)
    return out


def compare(champion: Path, challenger: Path, test: tuple[torch.Tensor, torch.Tensor],
            sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]], tolerance: float = TOLERANCE,
            seed: int = 0, out: Path | None = None, cache: dict | None = None, threads: int = 0,
            lineage_tolerance: float | None = None) -> dict[str, Any]:
    """Both models on ``test`` and each named set; the gate's decision; comparison.json and
    comparison.png in ``out`` (default: the challenger's folder).

    ``cache`` (a dict the caller keeps) remembers a model's answers on a set by the model's SHA-256
    and the photos' bytes: a loop that compares each night's challenger with the last night's
    winner scores the winner once."""
    cache = {} if cache is None else cache
    c1, c2 = Classifier(champion, warmup=False, threads=threads), Classifier(challenger, warmup=False, threads=threads)
    if c1.meta.class_names != c2.meta.class_names:
        raise ValueError(f"the models' classes differ: {c1.meta.class_names} vs {c2.meta.class_names}")
    names = c1.meta.class_names
    result: dict[str, Any] = {
        "champion": {"path": str(champion), "version": c1.meta.model_version, "threshold": c1.meta.threshold},
        "challenger": {"path": str(challenger), "version": c2.meta.model_version, "threshold": c2.meta.threshold,
                       "lineage": c2.meta.lineage},
        "method": f"served rule (handler.core.Classifier) on the same photos; 95% paired bootstrap, {BOOTSTRAP} draws",
        "sets": {}}
    for i, (name, (images, labels)) in enumerate({"test": test, **sets}.items()):
        log.info("comparing on %s (%d photos)", name, len(images))
        answers = [served_cached(clf, folder, images, cache) for clf, folder in ((c1, champion), (c2, challenger))]
        result["sets"][name] = compare_set(*answers, labels, names, seed + 10 * i)
    result["lineage_drift"] = lineage_drift(challenger, c2.meta.lineage)
    cert = c2.meta.certificate or {}
    result["gate"] = gate(result, c2.meta.target_precision, tolerance, not cert.get("accept_nothing", False),
                          lineage_tolerance)
    out = Path(out or challenger)
    write_json(out / "comparison.json", result)
    plots.champion_challenger(result, out / "comparison.png")
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
        cfg = TrainConfig.from_json(args.challenger / "train_config.json")
        if args.data_dir:
            cfg.data_dir = args.data_dir
        ds = load_data(cfg, meta.preprocess)
        sets = load_heldout(args.challenger, args.photos, meta.class_names, meta.preprocess)
    except (OSError, ValueError, ArtifactError, DataError) as exc:
        print(f"returns-compare: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGS
    result = compare(args.champion, args.challenger, (ds.test.images, ds.test.labels), sets, args.tolerance, args.seed,
                     lineage_tolerance=args.lineage_tolerance)
    print(result["gate"]["reason"])
    drift = result["lineage_drift"]
    if drift:
        print(f"test accuracy against {drift['root_version']}, the lineage's first release: "
              f"{100 * drift['change']:+.2f} points ({100 * drift['root_test_accuracy']:.2f}% -> "
              f"{100 * drift['test_accuracy']:.2f}%)")
    if not result["gate"]["promote"]:
        return EXIT_KEEP
    if args.promote_to:
        print(f"promoted to {promote(args.challenger, args.promote_to)}")
    return EXIT_PROMOTE


if __name__ == "__main__":
    raise SystemExit(main())
