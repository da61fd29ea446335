"""Backdrop transfer: the training garments shown on the backdrops of a new setup.

A few hundred decided photos of a new setup (a photo booth with a light, uneven backdrop) teach a
fine-tune little on their own: each garment is seen once. What they do show well is the setup's
*backdrop*. The training split has a plain backdrop (Fashion-MNIST: black), so each of its garments
can be cut out by its own pixels and pasted onto a backdrop taken from a decided photo (copy-paste
augmentation, Ghiasi et al. 2021, with the target setup's backdrops). The fine-tune then sees every
replayed garment in the new setup, labelled by the training split.

A decided photo's backdrop is estimated where its garment is unlikely to be: the pixels that the
training garments of its decided class leave empty (``mask_share`` or fewer of them cover the pixel),
filled in over the garment by normalised convolution (a Gaussian-weighted average of the known
pixels); "empty" pixels far from that average (the photo's own garment reaching where few of its
class do) are dropped and the fill repeated. Decided photos whose estimated backdrop is the
training split's own (ordinary photos) add nothing and are skipped.

A fine-tune (training/finetune.py) shows a share of each batch's replayed garments on them
(``onto_backdrops``), and the candidate's threshold is certified on every validation garment shown on
one of them as well (``new_setup``), so the promise holds in the new setup too, not only on average.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from training.augment import random_hflip
from training.data import Dataset, Split

log = logging.getLogger("training.backdrop")
# The calibration set of the new setup, by this name in the certificate's ``setups``.
SETUP_NAME = "validation_garments_on_decided_backdrops"


class BackdropError(ValueError):
    """The training split has no plain backdrop to cut garments from."""


def border(images: torch.Tensor) -> torch.Tensor:
    """The outermost pixels of each image, ``[N, C, 2H + 2W]`` (corners twice)."""
    return torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], -1)


def plain_backdrop(train: Split, spread: float = 8.0) -> float:
    """The training split's backdrop level: the median of its outermost pixels. Raises BackdropError
    when those pixels vary (a median absolute deviation over ``spread`` grey levels): then its
    garments cannot be cut out by their pixels."""
    x = train.images[: min(len(train), 5000)].float()
    ring = border(x).flatten()
    level = float(ring.median())
    mad = float((ring - level).abs().median())
    if mad > spread:
        raise BackdropError(f"the training photos' borders vary (median absolute deviation {mad:.1f} grey levels "
                            f"around {level:.0f}): no plain backdrop to cut garments from; backdrop transfer needs one")
    return level


def garment_alpha(images: torch.Tensor, level: float, edge: float = 32.0) -> torch.Tensor:
    """How much each pixel of a plain-backdrop photo is garment: 0 at the backdrop level, 1 from
    ``edge`` grey levels away from it (antialiased edges blend)."""
    return ((images.float() - level).abs().amax(1, keepdim=True) / edge).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(math.ceil(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _fill(x: torch.Tensor, known: torch.Tensor, sigma: float) -> torch.Tensor:
    """Normalised convolution at ``sigma``; far from any known pixel, the same at three times it."""
    weight = _blur(known, sigma)
    fine = _blur(x * known, sigma) / weight.clamp_min(1e-6)
    coarse = _blur(x * known, 3 * sigma) / _blur(known, 3 * sigma).clamp_min(1e-6)
    trust = (weight / 0.1).clamp(0, 1)
    return trust * fine + (1 - trust) * coarse


def estimate_backdrops(decided: Split, train: Split, level: float, mask_share: float = 0.02,
                       sigma: float = 4.0, min_difference: float = 16.0, outlier: float = 40.0) -> torch.Tensor:
    """float32 [M, C, H, W] backdrops of the decided photos that are not on the training backdrop."""
    if len(decided) == 0:
        return torch.empty((0, *train.images.shape[1:]))
    cover = garment_alpha(train.images, level) > 0.5
    empty = torch.stack([cover[train.labels == c].float().mean(0) <= mask_share
                         if (train.labels == c).any() else torch.zeros_like(cover[0, :1], dtype=torch.bool)
                         for c in range(int(train.labels.max()) + 1)])  # [classes, 1, H, W]
    known = empty[decided.labels].float()
    x = decided.images.float()
    for _ in range(2):  # the second pass drops "empty" pixels that the photo's own garment covers
        filled = _fill(x, known, sigma)
        known = known * ((x - filled).abs() <= outlier).float()
    bg = torch.where(known.bool(), x, filled)
    differs = ((bg - level).abs() * known).sum((1, 2, 3)) / known.sum((1, 2, 3)).clamp_min(1) > min_difference
    return bg[differs]


def paste(garments: torch.Tensor, backdrops: torch.Tensor, level: float) -> torch.Tensor:
    """uint8 garments of a plain-backdrop split shown on the given backdrops (one each)."""
    a = garment_alpha(garments, level)
    return (a * garments.float() + (1 - a) * backdrops).round().clamp(0, 255).to(torch.uint8)


def onto_backdrops(garments: torch.Tensor, movable: torch.Tensor, backdrops: torch.Tensor, level: float,
                   share: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A uint8 batch with a random ``share`` of its ``movable`` garments pasted onto backdrops picked
    from ``backdrops`` (each mirrored at random), and the mask of those moved."""
    moved = movable & (torch.rand(len(garments), generator=gen) < share)
    pick = torch.randint(0, len(backdrops), (int(moved.sum()),), generator=gen)
    out = garments.clone()
    out[moved] = paste(garments[moved], random_hflip(backdrops[pick], gen), level)
    return out, moved


def new_setup(decided: Split, ds: Dataset, share: float, seed: int) -> tuple[tuple[torch.Tensor, float] | None, dict[str, Split]]:
    """Backdrops of the decided photos that were not shot like the training split, with the training
    split's backdrop level; and the new setup's calibration photos: every validation garment (never
    trained on) shown on one of them. ``(None, {})`` when ``share`` is 0, when the training split has
    no plain backdrop (with a warning) or when no decided photo shows a new one."""
    if not share:
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
    pick = torch.randint(0, len(found), (len(ds.val),), generator=torch.Generator().manual_seed(seed + 1))
    return (found, level), {SETUP_NAME: Split(paste(ds.val.images, found[pick], level), ds.val.labels)}
