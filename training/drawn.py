"""Drawn outliers: pen strokes and lines of print, drawn with Pillow, to teach the network that a
photo of paper or of a drawing is not a product (outlier exposure, Hendrycks et al. 2019).

At 28x28 a return slip (a light card with rows of print) looks like a bag or a dress, and a few light
strokes on a dark board like a sandal; on a network trained with composites but not with these, the
gate, reading the network's own features, let 23% and 10% of them through (training/unfamiliar.py's
``receipt`` and ``scribble`` kinds). Composites of garments (training/composite.py) cannot teach this:
they are made of garments.

    strokes   one to four polylines, light on dark or dark on light, of random width
    print     rows of random letters and digits, dark on a light card

Each is drawn at a random size and aspect and letterboxed by the serving preprocessing
(``returns_model.preprocess.image_to_uint8``), so the network sees them as it would a photo. They take
a share (``TrainConfig.drawn_share``) of the uniform-answer slots of each batch (``make_composites``).
For a model trained with them the trust report groups the kinds they imitate
(training/unfamiliar.py's ``DRAWN_KINDS``) as ``trained_against``.
"""
from __future__ import annotations

import string

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from returns_model.meta import PreprocessSpec
from returns_model.preprocess import image_to_uint8

POOL_SIZE = 12_000  # drawn once per run, reused across epochs (drawing costs ~1.7 ms a photo)
_CHARS = list(string.ascii_letters + string.digits + "  ")


def _strokes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    if rng.random() < 0.5:
        paper, ink = int(rng.integers(0, 60)), int(rng.integers(150, 256))
    else:
        paper, ink = int(rng.integers(180, 256)), int(rng.integers(0, 90))
    img = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(2, 8)))]
        draw.line(pts, fill=ink, width=max(1, min(w, h) // int(rng.integers(8, 40))))
    return img


def _print(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    img = Image.new("L", (w, h), int(rng.integers(150, 256)))
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(6, 18))
    font = ImageFont.load_default(size=size)
    y = int(rng.integers(0, 8))
    while y < h - size // 2:
        text = "".join(rng.choice(_CHARS, int(rng.integers(3, 20))))
        draw.text((int(rng.integers(0, 10)), y), text, fill=int(rng.integers(0, 110)), font=font)
        y += size + int(rng.integers(1, 8))
    return img


def drawn_pool(n: int, seed: int, spec: PreprocessSpec) -> torch.Tensor:
    """``n`` drawn outliers as served model inputs, uint8 ``[n, C, size, size]``; half strokes, half print."""
    if n < 1:
        raise ValueError(f"the drawn pool needs at least 1 photo, got {n}")
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        w, h = int(rng.integers(24, 200)), int(rng.integers(24, 200))
        out.append(image_to_uint8((_strokes if j % 2 == 0 else _print)(rng, w, h), spec))
    return torch.stack(out)


def pool_for(drawn_share: float, composite_weight: float, seed: int, spec: PreprocessSpec,
             train_size: int) -> torch.Tensor | None:
    """The run's drawn pool, or None where no uniform-answer slot goes to drawn outliers.

    Small runs (smoke tests) get a pool of a quarter of their training split, at least 256."""
    if drawn_share <= 0 or composite_weight <= 0:
        return None
    return drawn_pool(min(POOL_SIZE, max(256, train_size // 4)), seed, spec)
