"""Batch-wise augmentation of in-memory uint8 images: no per-sample PIL work.

Every function takes and returns a whole batch ``[N, C, H, W]`` and draws its
randomness from an explicit generator, so training is reproducible.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator, fill: int = 0) -> torch.Tensor:
    """Pad by ``padding`` on every side and cut a random ``H x W`` window per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, value=fill)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [N, H, 1]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [N, 1, W]
    out = padded[torch.arange(n)[:, None, None], :, rows, cols]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=gen) < p).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(3), x)


def random_erasing(x: torch.Tensor, gen: torch.Generator, p: float = 0.5,
                   area: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Replace one random rectangle per chosen image with noise (on normalised floats)."""
    n, _, h, w = x.shape
    scale = torch.empty(n).uniform_(area[0], area[1], generator=gen) * h * w
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    eh = (scale * log_r.exp()).sqrt().round().clamp(1, h).long()
    ew = (scale / log_r.exp()).sqrt().round().clamp(1, w).long()
    y0 = (torch.rand(n, generator=gen) * (h - eh + 1)).long()
    x0 = (torch.rand(n, generator=gen) * (w - ew + 1)).long()
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = (ys >= y0.view(-1, 1, 1)) & (ys < (y0 + eh).view(-1, 1, 1)) & \
          (xs >= x0.view(-1, 1, 1)) & (xs < (x0 + ew).view(-1, 1, 1))
    chosen = (torch.rand(n, generator=gen) < p).view(-1, 1, 1)
    mask = (box & chosen).unsqueeze(1).to(x.device)
    noise = torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
    return torch.where(mask, noise, x)
