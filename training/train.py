"""Train the SE-ResNet returns classifier, then calibrate, evaluate and write the model folder.

    returns-train --output models/release          # the release model
    returns-train --image-folder shop_photos/ ...  # a shop's own categories

Before training it prints what the data allows (training/requirements.py) and writes it to
``data_requirements.json`` in the output folder. Exit codes (docs/exit-codes.md): 0 model written;
1 a setting it refuses, every problem named (``TrainConfig.validate``, ``--init-from``, ``--device``,
a batch larger than the training split, a checkpoint of other settings); 2 argparse, or the data,
found before any training and with nothing written: missing or truncated (training/data.py), or it
cannot keep the promise (the unfamiliar-photo gate could not be fitted, or with
``--require-certifiable`` no threshold could be certified); 3 training diverged.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from returns_model.artifact import ArtifactError, load_model
from returns_model.device import DeviceError
from returns_model.fileio import atomic_open, write_json
from returns_model.network import ArchConfig, SEResNet, build_model
from returns_model.preprocess import PreprocessSpec
from returns_model.names import CHECKPOINT_FILE, HISTORY_FILE, TRAIN_CONFIG_FILE
from training.config import TrainConfig, make_arch, pick_device
from training.data import DataError, Dataset, load_data, make_spec
from training.drawn import pool_for
from training.errors import SettingError
from training.evaluate import predict_logits
from training.lineage import parent_record
from training.pipeline import build_model_folder
from training.recipe import TrainingDiverged, make_optimizer, train_step, training_batch
from training.requirements import REPORT_FILE, DataRequirements, for_run, render, verdict

log = logging.getLogger("training")
EXIT_REFUSED = 1  # a setting it refuses (SettingError, DeviceError)
EXIT_DATA = 2  # argparse's code too: the data is missing or truncated, or cannot keep the promise
EXIT_DIVERGED = 3  # the loss became NaN or infinite (TrainingDiverged)


class NotEnoughData(RuntimeError):
    """The data cannot keep the promise, found before training: exit code 2."""


def get_args_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train, calibrate and evaluate the returns classifier.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=d.data_dir, help="folder with Fashion-MNIST's IDX .gz files "
                   "(default: /usr/share/datasets/fashion-mnist, else torchvision's download into data/)")
    p.add_argument("--image-folder", default=d.image_folder, help="a shop's photos: train/<class>/* (+ val/, test/)")
    p.add_argument("--val-size", type=int, default=d.val_size, help="validation images held out of train")
    p.add_argument("--train-subset", type=int, default=d.train_subset, help="train on this many images only (0 = all)")
    p.add_argument("--widths", type=int, nargs="+", default=list(d.widths), help="channels per stage")
    p.add_argument("--depths", type=int, nargs="+", default=list(d.depths), help="SE blocks per stage")
    p.add_argument("--se-reduction", type=int, default=d.se_reduction)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--no-flip-average", dest="flip_average", action="store_false",
                   help="predict from the photo alone, not the mean of it and its mirror image (half the compute)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="model input size (image-folder data)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d.channels, help="1 = grey, 3 = colour")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="off by default: it blurs the confidence ranking that review routing relies on")
    p.add_argument("--crop-padding", type=int, default=d.crop_padding)
    p.add_argument("--no-hflip", dest="hflip", action="store_false")
    p.add_argument("--erasing-p", type=float, default=d.erasing_p)
    p.add_argument("--composite-weight", type=float, default=d.composite_weight,
                   help="weight of the uniform-answer loss on composites of the batch's garments "
                        "(blends and tiles, training/composite.py); 0 = none")
    p.add_argument("--composite-share", type=float, default=d.composite_share,
                   help="composites per batch, as a share of the batch size")
    p.add_argument("--drawn-share", type=float, default=d.drawn_share,
                   help="share of the composite slots given to drawn outliers (strokes, print: training/drawn.py)")
    p.add_argument("--init-from", default=d.init_from,
                   help="start from this model folder's weights (same architecture) instead of random ones")
    p.add_argument("--target-precision", type=float, default=d.target_precision,
                   help="precision the auto-accepted items must reach; sets the review threshold")
    p.add_argument("--delta", type=float, default=d.delta,
                   help="the threshold is certified to reach --target-precision with probability 1 - delta")
    # A policy of this run, not a setting of the model: kept out of TrainConfig, so a resumed run's
    # checkpoint matches whether or not it is given.
    p.add_argument("--require-certifiable", action="store_true",
                   help="stop before training (exit code 2) when the validation split is too small for any "
                        "threshold to be certified; without it that is a warning and every photo goes to review")
    p.add_argument("--unfamiliar-rate", type=float, default=d.unfamiliar_rate,
                   help="share of ordinary validation photos the unfamiliar-photo gate may flag")
    p.add_argument("--gate-layer", default=d.gate_layer, help="block the gate reads (default: the middle one)")
    p.add_argument("--trust-photos", type=int, default=d.trust_photos,
                   help="photos of each unfamiliar kind in the trust report")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="skip the int8 CPU graph and its review rule (training/quantize.py)")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (0 = all cores)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="train in eager mode (skips the ~40 s compile; for short runs)")
    p.add_argument("--output", default=d.output, help="folder for weights, metrics, plots and checkpoints")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--tsne-samples", type=int, default=d.tsne_samples)
    p.add_argument("--model-version", default=d.model_version)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    values["widths"], values["depths"] = tuple(values["widths"]), tuple(values["depths"])
    return TrainConfig(**values)


def compiled_forward(model: SEResNet, cfg: TrainConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The training forward, compiled where that can work; the module itself stays uncompiled.

    Only the training step runs through the compiled graph: evaluation, checkpoints and the saved
    weights use ``model`` directly, so state_dict keys and the artifact are the same either way.
    """
    if not cfg.compile:
        return model
    # Inductor builds C++ kernels on CPU; on CUDA, Triton builds its launcher with a C compiler.
    compilers = ("c++", "g++") if device.type == "cpu" else ("cc", "gcc")
    if not any(shutil.which(c) for c in compilers):
        log.warning("no %s compiler on PATH: training in eager mode (install g++ for faster epochs)",
                    "C++" if device.type == "cpu" else "C")
        return model
    log.info("compiling the training forward (about 40 s on 2 cores; --no-compile skips it)")
    return torch.compile(model, dynamic=False)


def train_one_epoch(model: SEResNet, forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
                    sched, ds: Dataset, spec: PreprocessSpec, cfg: TrainConfig, device: torch.device,
                    gen: torch.Generator, epoch: int, drawn: torch.Tensor | None = None) -> dict:
    """One pass over a fresh permutation of the training split, each batch through training/recipe.py.

    Not clipped: the one-cycle schedule up to ``cfg.lr`` is the recipe the release was trained and
    measured with, and a run that blows up stops at its first non-finite loss (TrainingDiverged)."""
    model.train()
    n = len(ds.train)
    perm = torch.randperm(n, generator=gen)
    steps = n // cfg.batch_size
    total_loss, correct, seen = 0.0, 0, 0
    bar = range(steps)
    if cfg.progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(bar, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
    for step in bar:
        idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = training_batch(ds.train.images[idx], ds.train.labels[idx], spec, cfg, device, gen, drawn)
        loss, out = train_step(model, forward, opt, sched, batch, cfg, device, lr=cfg.lr,
                               where=f"epoch {epoch + 1}, step {step}")
        total_loss += loss * len(batch.y)
        correct += int((out.argmax(1) == batch.y).sum())
        seen += len(batch.y)
        if hasattr(bar, "set_postfix") and step % 20 == 0:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1)}


def warm_start(model: SEResNet, cfg: TrainConfig, arch, spec: PreprocessSpec) -> dict:
    """Load ``cfg.init_from``'s weights into ``model``; the parent's identity for the new model's lineage."""
    try:
        parent, meta = load_model(Path(cfg.init_from))
    except ArtifactError as exc:
        raise SettingError([f"--init-from {cfg.init_from}: {exc}"]) from None
    if meta.arch != arch:
        raise SettingError([f"--init-from {cfg.init_from}: its network {meta.arch} differs from this run's {arch}"])
    if meta.preprocess != spec:
        raise SettingError([f"--init-from {cfg.init_from}: its preprocessing {meta.preprocess} differs from "
                            f"this run's {spec}"])
    model.load_state_dict(parent.state_dict())
    log.info("starting from the weights of %s (version %s)", cfg.init_from, meta.model_version)
    return {**parent_record(cfg.init_from, meta),
            "warm_start": {"epochs": cfg.epochs, "lr": cfg.lr, "drawn_share": cfg.drawn_share,
                           "composite_weight": cfg.composite_weight}}


def check_data(ds: Dataset, cfg: TrainConfig, arch: ArchConfig, spec: PreprocessSpec,
               require_certifiable: bool) -> DataRequirements:
    """Print what the data allows; raise NotEnoughData when the gate could not be fitted after training,
    or when nothing could be certified and ``require_certifiable``; SettingError when the training
    split is smaller than one batch."""
    if len(ds.train) < cfg.batch_size:
        raise SettingError([f"--batch-size {cfg.batch_size}: must be at most {len(ds.train)}, the number of training "
                            "images"])
    try:
        needs = for_run(ds, cfg, arch, spec)
    except ValueError as exc:
        raise SettingError([f"cannot work out what the data allows: {exc}"]) from None
    print(render(needs), flush=True)
    if not needs.can_finish:
        raise NotEnoughData(f"{verdict(needs)}; stopping before training, as the run would fail once it is over")
    if not needs.certifiable:
        if require_certifiable:
            raise NotEnoughData(f"--require-certifiable: {verdict(needs)}")
        log.warning("%s; training anyway (--require-certifiable stops here instead)", verdict(needs))
    return needs


def train(cfg: TrainConfig, require_certifiable: bool = False) -> Path:
    cfg.validate()  # every setting that cannot work, before any work (SettingError)
    out = Path(cfg.output)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg)
    ds = load_data(cfg, make_spec(cfg))
    spec = make_spec(cfg, ds)
    arch = make_arch(cfg, spec, len(ds.class_names))
    needs = check_data(ds, cfg, arch, spec, require_certifiable)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / REPORT_FILE, needs.to_dict())
    model = build_model(arch).to(device).to(memory_format=torch.channels_last)
    lineage = warm_start(model, cfg, arch, spec) if cfg.init_from else None
    drawn = pool_for(cfg.drawn_share, cfg.composite_weight, cfg.seed, spec, len(ds.train))
    opt = make_optimizer(model, cfg)
    forward = compiled_forward(model, cfg, device)
    steps = len(ds.train) // cfg.batch_size
    if steps == 0:
        raise SystemExit(f"only {len(ds.train)} training images for a batch size of {cfg.batch_size}")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.25)
    gen = torch.Generator().manual_seed(cfg.seed)
    cfg.write(out / TRAIN_CONFIG_FILE)
    log.info("device %s, %d threads; %d train / %d val / %d test images, %d classes; %.2fM parameters",
             device, torch.get_num_threads(), len(ds.train), len(ds.val), len(ds.test), len(ds.class_names),
             sum(p.numel() for p in model.parameters()) / 1e6)

    ckpt_path, history_path = out / CHECKPOINT_FILE, out / HISTORY_FILE
    start_epoch = 0
    if cfg.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt["config"] != json.dumps(cfg.to_dict(), sort_keys=True):
            raise SystemExit(f"{ckpt_path} was written with other settings; pass --no-resume to start over")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["generator"])
        start_epoch = int(ckpt["epoch"])
        log.info("resuming after epoch %d from %s", start_epoch, ckpt_path)
    elif history_path.exists():
        history_path.unlink()

    t_start = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        row = train_one_epoch(model, forward, opt, sched, ds, spec, cfg, device, gen, epoch, drawn)
        val_logits, _ = predict_logits(model, ds.val, spec, device)
        row = {"epoch": epoch + 1, **row,
               "val_loss": F.cross_entropy(val_logits, ds.val.labels).item(),
               "val_acc": float((val_logits.argmax(1) == ds.val.labels).float().mean()),
               "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)}
        with open(history_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("epoch %d/%d  loss %.4f  acc %.4f  val_loss %.4f  val_acc %.4f  (%.0fs)", row["epoch"], cfg.epochs,
                 row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"], row["seconds"])
        with atomic_open(ckpt_path, "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "generator": gen.get_state(), "epoch": epoch + 1,
                        "config": json.dumps(cfg.to_dict(), sort_keys=True)}, f)
    train_seconds = time.time() - t_start

    build_model_folder(model, ds, cfg, out, train_seconds=train_seconds, lineage=lineage, drawn=drawn)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = get_args_parser().parse_args(argv)
    try:
        out = train(config_from_args(args), require_certifiable=args.require_certifiable)
    except (SettingError, DeviceError) as exc:
        log.error("refused: %s", exc)
        return EXIT_REFUSED
    except DataError as exc:
        log.error("training data: %s", exc)
        return EXIT_DATA
    except NotEnoughData as exc:
        log.error("not enough data: %s", exc)
        return EXIT_DATA
    except TrainingDiverged as exc:
        log.error("training stopped: %s", exc)
        return EXIT_DIVERGED
    log.info("model written to %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
