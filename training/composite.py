"""Composite photos made from a training batch's own garments, to teach the network that a photo of
two garments at once is not one product (outlier exposure, Hendrycks et al. 2019).

Two makers, each batch-wise on the uint8 images after augmentation and before normalisation:

    blends   two garments laid over each other, mixed between 35/65 and 65/35 (a double exposure,
             one item seen through another's bag)
    tiles    two garments side by side or one above the other, or four in a 2x2 grid, scaled down
             and letterboxed as returns_model.preprocess letterboxes a wide or tall photo (a bundle
             photographed together)

Training pushes the network's answer on them towards uniform (``uniform_loss``), so they fall below
the review threshold. The trust report's ``double_exposure`` and ``collage`` kinds are made the same
way from test garments; once a model is trained with composites they are no longer held out from it
(training/unfamiliar.py groups them as ``trained_against``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.augment import random_hflip


def _partners(n: int, gen: torch.Generator, k: int) -> list[torch.Tensor]:
    """``k`` index vectors over a batch of ``n``, each a random cyclic shift of 1..n-1 (never the image itself)."""
    return [(torch.arange(n) + int(torch.randint(1, n, (1,), generator=gen))) % n for _ in range(k)]


def blends(x: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` blends of two different images of the batch ``x`` ``[N, C, H, W]`` (uint8 or float)."""
    n = x.shape[0]
    pick = torch.randperm(n, generator=gen)[:count]
    (other,) = _partners(n, gen, 1)
    lam = torch.empty(count, 1, 1, 1).uniform_(0.35, 0.65, generator=gen)
    a, b = x[pick].float(), x[other[pick]].float()
    return lam * a + (1 - lam) * b


def _letterbox(wide: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """Scale ``[M, C, h, w]`` so its longer side is ``size`` and pad to ``size x size`` with ``fill``, centred."""
    h, w = wide.shape[-2:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(wide, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (size - nh) // 2, (size - nw) // 2
    return F.pad(small, (left, size - nw - left, top, size - nh - top), value=fill)


def tiles(x: torch.Tensor, count: int, gen: torch.Generator, fill: float = 0.0) -> torch.Tensor:
    """``count`` tilings of batch images: a third side by side, a third stacked, a third 2x2 grids."""
    n, _, size, _ = x.shape
    pick = torch.randperm(n, generator=gen)[:count]
    o1, o2, o3 = (p[pick] for p in _partners(n, gen, 3))
    a, b, c, d = (x[i].float() for i in (pick, o1, o2, o3))
    third = count // 3
    side = _letterbox(torch.cat([a[:third], b[:third]], 3), size, fill)
    stacked = _letterbox(torch.cat([a[third:2 * third], b[third:2 * third]], 2), size, fill)
    rest = slice(2 * third, count)
    grid = torch.cat([torch.cat([a[rest], b[rest]], 3), torch.cat([c[rest], d[rest]], 3)], 2)
    return torch.cat([side, stacked, _letterbox(grid, size, fill)])


def composite_count(batch: int, weight: float, share: float) -> int:
    """Composites to add to ``batch`` garments: ``share`` of them, none when the loss ``weight`` is 0.
    Training, fine-tuning and the int8 calibration set all ask this one question."""
    return round(batch * share) if weight > 0 else 0


def make_composites(x: torch.Tensor, count: int, gen: torch.Generator, fill: float = 0.0,
                    drawn: torch.Tensor | None = None, drawn_share: float = 0.0) -> torch.Tensor:
    """``count`` uniform-answer photos for the batch ``x``, uint8 like a photo: a share ``drawn_share``
    picked from the ``drawn`` pool (training/drawn.py, mirrored at random), the rest composites of the
    batch, half blends and half tiles."""
    m = round(count * drawn_share) if drawn is not None and len(drawn) else 0
    parts = []
    if count > m:
        half = (count - m) // 2
        parts.append(torch.cat([blends(x, half, gen), tiles(x, count - m - half, gen, fill)]).round().clamp(0, 255).to(torch.uint8))
    if m:
        parts.append(random_hflip(drawn[torch.randint(0, len(drawn), (m,), generator=gen)], gen))
    return torch.cat(parts)


def uniform_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy from the network's answer to the uniform distribution over classes."""
    return -F.log_softmax(logits.float(), 1).mean(1).mean()
