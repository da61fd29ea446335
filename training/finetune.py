"""Fine-tuning a champion on decided photos, and mixing its weights back with the champion's.

The champion is fine-tuned for a few epochs on a replay of its own training split plus the decided
photos (each repeated, so a few hundred photos weigh against thousands), through the batch recipe it
was trained with (training/recipe.py, with its own train_config.json: crop, flip, erasing, label
smoothing, composites and drawn outliers), at a small learning rate annealed to zero, with clipped
steps. Batch-norm statistics keep adapting: with a quarter of each batch from a bright new setup,
frozen statistics diverged or lost 2.3 points of test accuracy.

Two terms only a fine-tune has plug into the recipe:

* backdrop transfer (``RetrainConfig.backdrop_share``, training/backdrop.py): a share of the replayed
  garments is shown on backdrops of the decided photos, so the fine-tune sees thousands of known
  garments in the new setup instead of a few hundred;
* distillation (``RetrainConfig.distill``): the KL divergence from the champion's softened answers on
  the replayed photos (learning without forgetting, Li & Hoiem 2016), so the new setup may move the
  early layers while the answers on ordinary photos are held where they were. A garment moved onto a
  new backdrop is held to the champion's answer on it as it was, on its own backdrop.

``interpolate`` (weight-space ensembling, WiSE-FT, Wortsman et al. 2022) then takes a share of the
fine-tuned weights and the rest of the champion's. On a short fine-tune that lost 0.72 test points,
a share of 0.7 lost 0.28 and kept 89% booth accuracy of its 92%.
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from returns_model.preprocess import PreprocessSpec, normalize
from training.backdrop import onto_backdrops
from training.config import TrainConfig
from training.data import Dataset, Split
from training.drawn import pool_for
from training.recipe import Batch, make_optimizer, train_step, training_batch
from training.retrain_config import RetrainConfig

log = logging.getLogger("training.finetune")
# Photos of a new setup can start with large losses: a clipped step cannot throw the champion's
# weights far on one batch. (Training from scratch is not clipped: training/train.py says why.)
CLIP_NORM = 5.0


def distillation(teacher: torch.nn.Module, out: torch.Tensor, batch: Batch, replayed: torch.Tensor,
                 spec: PreprocessSpec, weight: float, temperature: float) -> torch.Tensor | None:
    """``weight * T^2 * KL(champion || model)`` on the replayed photos of ``batch``, scaled by their
    share of it; None when it has none. ``out`` are the model's logits on the batch's own photos."""
    replayed = replayed.to(out.device)
    if not replayed.any():
        return None
    seen_by_teacher = batch.x[:len(batch.y)]
    if batch.pasted is not None and batch.pasted.any():
        m = batch.pasted.to(out.device).view(-1, 1, 1, 1)
        as_was = normalize(batch.unpasted.to(out.device), spec).contiguous(memory_format=torch.channels_last)
        seen_by_teacher = torch.where(m, as_was, seen_by_teacher)
    t = temperature
    with torch.no_grad():  # log-probabilities on both sides: no 0 * log 0 where a softmax underflows
        target = F.log_softmax(teacher(seen_by_teacher[replayed]).float() / t, 1)
    kl = F.kl_div(F.log_softmax(out[replayed].float() / t, 1), target, reduction="batchmean", log_target=True)
    return weight * t * t * kl * replayed.float().mean()


def fine_tune(model, ds: Dataset, decided: Split, spec: PreprocessSpec, rc: RetrainConfig, cfg: TrainConfig,
              device: torch.device, backdrops: tuple[torch.Tensor, float] | None = None) -> list[dict]:
    """A few epochs over a fresh replay draw of the training split plus the repeated decided photos;
    with ``backdrops`` (new-setup backdrops and the training split's backdrop level), a share
    ``rc.backdrop_share`` of the replayed garments is pasted onto them. ``cfg`` is the champion's
    training config: its batch recipe is the fine-tune's. Raises TrainingDiverged on a non-finite loss."""
    teacher = copy.deepcopy(model).eval() if rc.distill else None
    drawn = pool_for(cfg.drawn_share, cfg.composite_weight, rc.seed, spec, len(ds.train))
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
            replayed = is_replay[idx]
            paste = None
            if backdrops is not None and len(backdrops[0]):
                paste = partial(onto_backdrops, movable=replayed, backdrops=backdrops[0], level=backdrops[1],
                                share=rc.backdrop_share, gen=gen)
            batch = training_batch(x_all[idx], y_all[idx], spec, cfg, device, gen, drawn, paste)
            extra = None if teacher is None else partial(distillation, teacher, batch=batch, replayed=replayed,
                                                         spec=spec, weight=rc.distill,
                                                         temperature=rc.distill_temperature)
            loss, out = train_step(model, model, opt, sched, batch, cfg, device, lr=rc.lr,
                                   where=f"fine-tune epoch {epoch + 1}, step {step}",
                                   clip_norm=CLIP_NORM, extra_loss=extra)
            total += loss * len(batch.y)
            correct += int((out.argmax(1) == batch.y).sum())
            seen += len(batch.y)
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
