"""Fine-tune a champion model on reviewers' decisions: ``returns-retrain``.

    returns-retrain --champion models/versions/1.0 --decisions decisions/*.jsonl \\
                    --photos /data/results/archive /data/inbox --output models/versions/1.1-candidate

1. The decisions are validated (returns_feedback): against the photo folders (every decided photo
   must be found there, by the SHA-256 of its bytes), the champion's class names, and optionally the
   runs. Any problem stops the retrain with exit code 2 before anything is written: a bad decision
   file never changes a model.
2. Photos are found by hash in the folders (deduplicated: one photo, one decision). A seeded share
   of them, chosen by hash (``returns_feedback.decisions.held_out``), is held out and never trained
   on; training/compare.py judges the candidate on it.
3. The champion is fine-tuned for a few epochs on a replay of its own training split plus the
   decided photos (each repeated, so a few hundred photos weigh against thousands), with the same
   batch augmentation as training, a small learning rate annealed to zero, clipped steps, and a
   distillation term holding the champion's answers on the replayed photos, so what it knew is
   kept. (Frozen batch-norm statistics were tried: with a quarter of each batch from a bright new
   setup the training diverged or lost 2.3 points of test accuracy.) Backdrop transfer
   (``--backdrop-share``, training/backdrop.py): decided photos shot on a new backdrop lend it to a
   share of the replayed garments, so the fine-tune sees thousands of known garments in the new
   setup instead of a few hundred; a moved garment is held to the champion's answer on it as it was.
   ``not_a_product`` photos are never a class: they sharpen the unfamiliar gate instead; ``unsure``
   ones are counted and left out. ``--interpolate A`` (weight-space ensembling, WiSE-FT, Wortsman et
   al. 2022) then takes A of the fine-tuned weights and 1 - A of the champion's. Measured on a short
   fine-tune that lost 0.72 test points: A = 0.7 lost 0.28 and kept 89% booth accuracy of its 92%
   (docs/history/2026-12-04-readme-round-two.md, the feedback loop). Default 1: the fine-tuned weights as they are.
4. training/report.write_model_folder then refits the gate (decided products become familiar,
   not-a-product ones must stay flagged), recalibrates, recertifies the threshold on validation and,
   with backdrop transfer, on every validation garment shown on a decided backdrop (the highest
   threshold is served, so the promise holds in the new setup too, not only on average),
   evaluates on test and writes the candidate folder, with ``lineage`` in model.json: the parent
   model's SHA-256, the decisions' hash and the held-out split's hash. The int8 CPU path is built
   and its own rule fitted the same way, decisions included (``--no-int8`` skips it).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from returns_feedback.decisions import NOT_A_PRODUCT, UNSURE, Decision, decisions_hash, held_out, split_hash
from returns_feedback.validate import print_report, read_runs, validate
from returns_model.artifact import load_model
from returns_model.device import DeviceError
from returns_model.fileio import write_json, write_text
from returns_model.manifest import sha256_file
from returns_model.names import IMAGE_SUFFIXES, META_FILE
from returns_model.preprocess import PhotoError, PreprocessSpec, bytes_to_uint8, normalize
from training.augment import random_crop, random_erasing, random_hflip
from training.backdrop import BackdropError, estimate_backdrops, paste, plain_backdrop
from training.composite import composite_count, make_composites, uniform_loss
from training.config import TrainConfig, pick_device
from training.data import Dataset, Split, load_data
from training.drawn import pool_for
from training.lineage import model_sha256, parent_record
from training.report import write_model_folder
from training.rule import Lessons
from training.train import make_optimizer

log = logging.getLogger("training.retrain")
EXIT_BAD_DECISIONS = 2
HELDOUT_FILE = "heldout.jsonl"
SETUP_NAME = "validation_garments_on_decided_backdrops"
LINEAGE_FILE = "lineage.json"


@dataclass
class RetrainConfig:
    champion: str = ""
    decisions: list[str] = field(default_factory=list)
    photos: list[str] = field(default_factory=list)
    output: str = ""
    runs: list[str] = field(default_factory=list)  # optional: decisions must also name photos of these runs
    holdout_share: float = 0.2  # of the decided photos, by hash: never trained on
    seed: int = 0
    epochs: int = 4
    replay: int = 30000  # training-split photos per epoch (a fresh draw each epoch), so nothing is forgotten
    decided_repeat: int = 6  # each decided photo appears this many times per epoch
    lr: float = 0.01  # peak of a one-cycle schedule annealed to 0: a nudge, not a new training run
    distill: float = 3.0  # weight of keeping the champion's answers on replayed photos (0 = plain fine-tuning)
    distill_temperature: float = 2.0
    batch_size: int = 128
    gate_photos: int = 20000  # training photos the gate's statistics are fitted on (0 = all 55,000)
    trust_photos: int = 200
    data_dir: str | None = None  # override the champion's data folder
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    model_version: str = ""  # default: the champion's, with the last number raised by one
    int8: bool = True  # also the int8 CPU graph, its rule fitted on its own outputs with the same decisions
    # of replayed photos shown on a new setup's backdrop (training/backdrop.py); 0 = off. Needs a
    # training split with a plain backdrop; without one it is off, with a warning.
    backdrop_share: float = 0.3
    # candidate = interpolate * fine-tuned + (1 - interpolate) * champion, weight by weight (WiSE-FT)
    interpolate: float = 1.0

    def validate(self) -> list[str]:
        errors = []
        if not self.champion or not (Path(self.champion) / META_FILE).exists():
            errors.append(f"--champion {self.champion!r}: not a model folder (no {META_FILE})")
        if not self.decisions:
            errors.append("--decisions: at least one file")
        if not self.photos:
            errors.append("--photos: at least one folder")
        if not self.output:
            errors.append("--output: a folder for the candidate")
        elif (Path(self.output) / META_FILE).exists():
            errors.append(f"--output {self.output}: already holds a model; versions are immutable, pick a new folder")
        if not 0 <= self.holdout_share < 1:
            errors.append(f"--holdout-share {self.holdout_share}: must be in [0, 1)")
        if not 0 <= self.backdrop_share <= 1:
            errors.append(f"--backdrop-share {self.backdrop_share}: must be in [0, 1]")
        if not 0 < self.interpolate <= 1:
            errors.append(f"--interpolate {self.interpolate}: must be in (0, 1] (1 = the fine-tuned weights as they are)")
        if self.epochs < 1 or self.decided_repeat < 1 or self.replay < 0:
            errors.append("--epochs and --decided-repeat must be >= 1, --replay >= 0")
        return errors


def next_version(version: str) -> str:
    """'1.0' -> '1.1', '1.0.0' -> '1.0.1', 'v3' -> 'v3.1'."""
    head, _, last = version.rpartition(".")
    return f"{head}.{int(last) + 1}" if head and last.isdigit() else f"{version}.1"


def index_photos(folders: list[str]) -> dict[str, Path]:
    """SHA-256 of every image file under the folders -> its first path (the same photo archived twice
    is one photo)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.is_symlink():
                found.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
    return found


@dataclass
class DecidedPhotos:
    """The decided photos, loaded and split: what trains, what judges, what sharpens the gate."""

    train: Split
    heldout: Split
    train_not_products: torch.Tensor
    heldout_not_products: torch.Tensor
    heldout_rows: list[dict[str, Any]]
    counts: dict[str, int]


def load_decided(decisions: list[Decision], paths: dict[str, Path], class_names: list[str], spec: PreprocessSpec,
                 share: float, seed: int) -> DecidedPhotos:
    index = {c: i for i, c in enumerate(class_names)}
    groups: dict[tuple[bool, bool], list] = {(h, n): [] for h in (False, True) for n in (False, True)}
    rows, unsure = [], 0
    for d in decisions:
        if d.label == UNSURE:
            unsure += 1
            continue
        img = bytes_to_uint8(paths[d.sha256].read_bytes(), spec)
        hold, nap = held_out(d.sha256, share, seed), d.label == NOT_A_PRODUCT
        groups[(hold, nap)].append((img, -1 if nap else index[d.label]))
        if hold:
            rows.append({"sha256": d.sha256, "label": d.label, "path": str(paths[d.sha256].resolve())})

    def stack(items: list, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not items:
            return torch.empty((0, spec.channels, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return torch.stack([i for i, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    tr, ho = Split(*stack(groups[(False, False)], spec.size)), Split(*stack(groups[(True, False)], spec.size))
    counts = {"decided": len(decisions), "unsure_not_used": unsure, "train_products": len(tr),
              "heldout_products": len(ho), "train_not_a_product": len(groups[(False, True)]),
              "heldout_not_a_product": len(groups[(True, True)])}
    return DecidedPhotos(tr, ho, stack(groups[(False, True)], spec.size)[0], stack(groups[(True, True)], spec.size)[0],
                         sorted(rows, key=lambda r: r["sha256"]), counts)


def fine_tune(model, ds: Dataset, decided: Split, spec: PreprocessSpec, rc: RetrainConfig, cfg: TrainConfig,
              device: torch.device, backdrops: tuple[torch.Tensor, float] | None = None) -> list[dict]:
    """A few epochs over a fresh replay draw of the training split plus the repeated decided photos;
    with ``backdrops`` (new-setup backdrops and the training split's backdrop level), a share
    ``rc.backdrop_share`` of the replayed garments is pasted onto them.

    Loss: cross-entropy on every photo, plus (``rc.distill``) the KL divergence from the champion's
    softened answers on the replayed photos (learning without forgetting, Li & Hoiem 2016): the new
    setup may move the early layers, but the answers on ordinary photos are held where they were.
    A champion trained against composites (``cfg.composite_weight``, training/composite.py) and drawn
    outliers (``cfg.drawn_share``, training/drawn.py) gets the same uniform-answer loss on them in each
    batch, so a retrain does not unlearn them.
    """
    teacher = copy.deepcopy(model).eval() if rc.distill else None
    drawn = pool_for(cfg.drawn_share, cfg.composite_weight, rc.seed, spec, len(ds.train))
    t2 = rc.distill_temperature
    gen = torch.Generator().manual_seed(rc.seed)
    torch.manual_seed(rc.seed)
    per_epoch = min(rc.replay, len(ds.train)) + rc.decided_repeat * len(decided)
    steps = max(1, per_epoch // rc.batch_size)
    opt = make_optimizer(model, replace(cfg, lr=rc.lr))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rc.lr, total_steps=rc.epochs * steps, pct_start=0.1)
    history = []
    for epoch in range(rc.epochs):
        replay = torch.randperm(len(ds.train), generator=gen)[:min(rc.replay, len(ds.train))]
        x_all = torch.cat([ds.train.images[replay]] + [decided.images] * rc.decided_repeat)
        y_all = torch.cat([ds.train.labels[replay]] + [decided.labels] * rc.decided_repeat)
        is_replay = torch.arange(len(y_all)) < len(replay)
        perm = torch.randperm(len(y_all), generator=gen)
        bar = range(steps)
        if rc.progress:
            from tqdm import tqdm

            bar = tqdm(bar, desc=f"fine-tune {epoch + 1}/{rc.epochs}", leave=False, file=sys.stderr)
        model.train()
        total, correct, seen, t0 = 0.0, 0, 0, time.time()
        for step in bar:
            idx = perm[step * rc.batch_size:(step + 1) * rc.batch_size]
            x = random_crop(x_all[idx], cfg.crop_padding, gen, spec.fill) if cfg.crop_padding else x_all[idx]
            x = random_hflip(x, gen) if cfg.hflip else x
            keep = is_replay[idx]
            moved = torch.zeros_like(keep)
            if backdrops is not None and len(backdrops[0]):
                clean = x
                moved = keep & (torch.rand(len(idx), generator=gen) < rc.backdrop_share)
                pick = torch.randint(0, len(backdrops[0]), (int(moved.sum()),), generator=gen)
                x = x.clone()
                x[moved] = paste(x[moved], random_hflip(backdrops[0][pick], gen), backdrops[1])
            n_comp = composite_count(len(idx), cfg.composite_weight, cfg.composite_share)
            if n_comp:  # a champion trained against composites keeps being trained against them
                x = torch.cat([x, make_composites(x, n_comp, gen, spec.fill, drawn, cfg.drawn_share)])
            x = normalize(x.to(device), spec)
            x = random_erasing(x, gen, cfg.erasing_p) if cfg.erasing_p else x
            y = y_all[idx].to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            if n_comp:
                out, out_comp, x = out[:len(y)], out[len(y):], x[:len(y)]
            loss = F.cross_entropy(out.float(), y)
            if n_comp:
                loss = loss + cfg.composite_weight * uniform_loss(out_comp)
            keep = keep.to(device)
            if teacher is not None and keep.any():
                # A garment moved onto a new backdrop is held to the champion's answer on it as
                # it was (its own backdrop), which the champion knows.
                seen_by_teacher = x
                if moved.any():
                    m = moved.to(device).view(-1, 1, 1, 1)
                    seen_by_teacher = torch.where(m, normalize(clean.to(device), spec).contiguous(
                        memory_format=torch.channels_last), x)
                with torch.no_grad():  # log-probabilities on both sides: no 0 * log 0 where a softmax underflows
                    target = F.log_softmax(teacher(seen_by_teacher[keep]).float() / t2, 1)
                kl = F.kl_div(F.log_softmax(out[keep].float() / t2, 1), target, reduction="batchmean", log_target=True)
                loss = loss + rc.distill * t2 * t2 * kl * keep.float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Photos of a new setup can start with large losses; a clipped step cannot throw the
            # champion's weights far on one batch.
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
        history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), "train_acc": correct / max(seen, 1),
                        "photos": seen, "seconds": round(time.time() - t0, 1)})
        log.info("fine-tune epoch %d/%d: loss %.4f acc %.4f (%.0fs)", epoch + 1, rc.epochs,
                 history[-1]["train_loss"], history[-1]["train_acc"], history[-1]["seconds"])
    model.eval()
    return history


def interpolate(champion: dict[str, torch.Tensor], model: torch.nn.Module, share: float) -> None:
    """In place: every floating-point weight and batch-norm statistic of ``model`` becomes
    ``share * model + (1 - share) * champion`` (WiSE-FT); counters stay the fine-tuned model's."""
    if share == 1:
        return
    own = model.state_dict()
    if own.keys() != champion.keys():
        raise ValueError("interpolate: the champion and the fine-tuned model have different layers")
    model.load_state_dict({k: torch.lerp(champion[k].to(v.device, v.dtype), v, share) if v.is_floating_point() else v
                           for k, v in own.items()})


def new_setup(decided: Split, ds: Dataset, rc: RetrainConfig) -> tuple[tuple[torch.Tensor, float] | None, dict[str, Split]]:
    """Backdrops of the decided photos that were not shot like the training split (training/backdrop.py),
    and the new setup's calibration photos: every validation garment (never trained on) shown on one
    of them, on which the candidate's threshold is certified as well."""
    if not rc.backdrop_share:
        return None, {}
    try:
        level = plain_backdrop(ds.train)
    except BackdropError as exc:
        log.warning("backdrop transfer off: %s", exc)
        return None, {}
    found = estimate_backdrops(decided, ds.train, level)
    log.info("backdrop transfer: %d new-setup backdrops among %d decided product photos", len(found), len(decided))
    if not len(found):
        return None, {}
    pick = torch.randint(0, len(found), (len(ds.val),), generator=torch.Generator().manual_seed(rc.seed + 1))
    return (found, level), {SETUP_NAME: Split(paste(ds.val.images, found[pick], level), ds.val.labels)}


def decision_files(given: list[str]) -> list[Path]:
    """Files as given; a folder stands for every ``*.jsonl`` and ``*.csv`` in it (sorted)."""
    out: list[Path] = []
    for item in map(Path, given):
        out += sorted(p for p in item.iterdir() if p.suffix.lower() in (".jsonl", ".csv")) if item.is_dir() else [item]
    return out


def check_decisions(rc: RetrainConfig, class_names: list[str]) -> tuple[list[Decision], dict[str, Path]] | None:
    """Valid decisions and where their photos are, or None (after printing every problem)."""
    paths = index_photos(rc.photos)
    files = decision_files(rc.decisions)
    if not files:
        print(f"returns-retrain: no decision files in {rc.decisions}", file=sys.stderr)
        return None
    report = validate(files, set(paths), class_names, where="the photo folders " + ", ".join(rc.photos))
    problems = list(report.problems)
    if rc.runs:
        known = set(read_runs([Path(r) for r in rc.runs]).photos)
        problems += [p for p in validate(files, known, class_names,
                                         where="the given runs").problems if p.code == "unknown_hash"]
    unreadable = []
    for d in report.valid:
        try:
            bytes_to_uint8(paths[d.sha256].read_bytes(), PreprocessSpec())
        except (PhotoError, OSError) as exc:
            unreadable.append(f"{d.source}: photo {paths[d.sha256]} cannot be read: {exc}")
    if problems or unreadable:
        report.problems = problems
        print_report(report, sys.stderr)
        for line in unreadable:
            print(line, file=sys.stderr)
        print("returns-retrain: the decisions have problems; nothing was trained or written", file=sys.stderr)
        return None
    if not any(d.label not in (NOT_A_PRODUCT, UNSURE) for d in report.valid):
        print("returns-retrain: no decision names a product class; nothing to learn", file=sys.stderr)
        return None
    return report.valid, paths


def retrain(rc: RetrainConfig) -> int:
    t_start = time.time()
    champion = Path(rc.champion)
    model, meta = load_model(champion)
    checked = check_decisions(rc, meta.class_names)
    if checked is None:
        return EXIT_BAD_DECISIONS
    decisions, paths = checked
    cfg = TrainConfig.from_json(champion / "train_config.json")
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
    backdrops, setups = new_setup(decided.train, ds, rc)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history = fine_tune(model, ds, decided.train, spec, rc, cfg, device, backdrops)
    interpolate(start, model, rc.interpolate)
    out = Path(rc.output)
    out.mkdir(parents=True, exist_ok=True)
    lineage = {
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
    cfg.write(out / "train_config.json")
    write_text(out / HELDOUT_FILE, "".join(json.dumps(r) + "\n" for r in decided.heldout_rows))
    write_json(out / "retrain_config.json", asdict(rc))
    write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    # The report's "training split" is what the gate's statistics are fitted on: a prefix of the
    # (seeded, shuffled) training split, or all of it, plus the decided photos, which it then knows.
    base = ds.train.subset(torch.arange(min(rc.gate_photos, len(ds.train)))) if rc.gate_photos else ds.train
    report_ds = replace(ds, train=Split(torch.cat([base.images, decided.train.images]),
                                        torch.cat([base.labels, decided.train.labels])))
    metrics = write_model_folder(model, report_ds, cfg, device, out, train_seconds=time.time() - t_start,
                                 lessons=Lessons(decided.train, decided.train_not_products, setups), lineage=lineage)
    write_json(out / LINEAGE_FILE, {**lineage, "model_sha256": model_sha256(out), "model_version": cfg.model_version,
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
    rc = RetrainConfig(**vars(args))
    errors = rc.validate()
    if errors:
        for e in errors:
            print(f"returns-retrain: {e}", file=sys.stderr)
        return EXIT_BAD_DECISIONS
    try:
        return retrain(rc)
    except DeviceError as exc:
        print(f"returns-retrain: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
