"""The training recipe, one copy for training (training/train.py) and fine-tuning (training/finetune.py).

A step is ``training_batch`` (raw uint8 photos -> the augmented, normalised device batch) then
``train_step`` (forward, ``batch_loss``, the finite-loss check, backward, optional clipping, the
optimiser and schedule). Both loops call exactly these, with the same ``TrainConfig``, so the two
cannot drift; what only fine-tuning does (new-setup backdrops, distillation against the champion)
plugs in through ``paste`` and ``extra_loss``.

Every random draw comes from the caller's generator, in a fixed order: crop, flip, ``paste``,
composites, erasing. Reordering them changes every trained weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from returns_model.network import SEResNet
from returns_model.preprocess import PreprocessSpec, normalize
from training.augment import random_crop, random_erasing, random_hflip
from training.composite import composite_count, make_composites, uniform_loss
from training.config import TrainConfig

# (uint8 batch after crop and flip) -> (the batch to train on, bool mask of the photos it changed)
Paste = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (returns-train: exit code 3)."""


@dataclass
class Batch:
    """One training batch on the device.

    ``x`` holds ``len(y)`` photos of the batch, then ``composites`` uniform-answer photos
    (training/composite.py), normalised and channels-last. Where a ``paste`` changed some photos,
    ``pasted`` marks them and ``unpasted`` holds the uint8 batch as it was before (CPU).
    """

    x: torch.Tensor
    y: torch.Tensor
    composites: int
    pasted: torch.Tensor | None = None
    unpasted: torch.Tensor | None = None


def training_batch(images: torch.Tensor, labels: torch.Tensor, spec: PreprocessSpec, cfg: TrainConfig,
                   device: torch.device, gen: torch.Generator, drawn: torch.Tensor | None = None,
                   paste: Paste | None = None) -> Batch:
    """Random crop and flip, ``paste``, composites of the batch (and drawn outliers from ``drawn``),
    normalisation, random erasing, channels-last: ``images`` uint8 ``[N, C, H, W]`` as stored."""
    x = images
    if cfg.crop_padding:
        x = random_crop(x, cfg.crop_padding, gen, spec.fill)
    if cfg.hflip:
        x = random_hflip(x, gen)
    pasted = unpasted = None
    if paste is not None:
        unpasted = x
        x, pasted = paste(x)
    n_comp = composite_count(len(x), cfg.composite_weight, cfg.composite_share)
    if n_comp:  # composites ride in the same forward pass, after the batch's own photos
        x = torch.cat([x, make_composites(x, n_comp, gen, spec.fill, drawn, cfg.drawn_share)])
    x = normalize(x.to(device, non_blocking=True), spec)
    if cfg.erasing_p:
        x = random_erasing(x, gen, cfg.erasing_p)
    x = x.contiguous(memory_format=torch.channels_last)
    return Batch(x, labels.to(device, non_blocking=True), n_comp, pasted, unpasted)


def batch_loss(logits: torch.Tensor, batch: Batch, cfg: TrainConfig) -> torch.Tensor:
    """Cross-entropy on the batch's own photos (label smoothing as configured), plus
    ``cfg.composite_weight`` times the uniform-answer loss on its composites."""
    n = len(batch.y)
    loss = F.cross_entropy(logits[:n].float(), batch.y, label_smoothing=cfg.label_smoothing)
    if batch.composites:
        loss = loss + cfg.composite_weight * uniform_loss(logits[n:])
    return loss


def train_step(model: SEResNet, forward: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer,
               sched, batch: Batch, cfg: TrainConfig, device: torch.device, *, lr: float, where: str,
               clip_norm: float | None = None,
               extra_loss: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
               ) -> tuple[float, torch.Tensor]:
    """One optimiser step on ``batch``; the loss and the logits of the batch's own photos.

    ``forward`` is ``model`` or its compiled graph. ``extra_loss`` gets those logits and returns a
    term to add (or None). bf16 autocast on CUDA for every loop, so a fine-tune runs in the precision
    its champion was trained in; on the CPU the step stays float32. A NaN or infinite loss raises
    TrainingDiverged before it can reach the weights (``where`` and ``lr`` go into the message).
    ``clip_norm`` caps the gradient's norm; the callers say why they do or do not clip.
    """
    n = len(batch.y)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = forward(batch.x)
        out = logits[:n]
        loss = batch_loss(logits, batch, cfg)
        if extra_loss is not None:
            extra = extra_loss(out)
            if extra is not None:
                loss = loss + extra
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss is {value} at {where}; lower --lr (now {lr}) or check the data")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    sched.step()
    return value, out


def make_optimizer(model: SEResNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Nesterov SGD at ``cfg.lr``; weight decay on weights, none on norms and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
