"""Backdrop transfer (training/backdrop.py): a new setup's backdrop recovered from decided photos,
training garments pasted onto it, and a training set without a plain backdrop refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from returns_model.meta import PreprocessSpec
from returns_model.preprocess import bytes_to_uint8
from training.backdrop import BackdropError, border, estimate_backdrops, garment_alpha, paste, plain_backdrop
from training.data import DEFAULT_FASHION_MNIST_DIR, Split, read_idx


@pytest.fixture(scope="module")
def fashion():
    images, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")
    labels, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")
    return Split(images[:6000, None].clone(), labels[:6000].long())


def smooth_backdrops(n: int, seed: int) -> torch.Tensor:
    """Light, uneven backdrops: a random 4x4 field upsampled, grey 120..230."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 1, 4, 4, generator=g) * 60 + torch.rand(n, 1, 1, 1, generator=g) * 50 + 120
    return torch.nn.functional.interpolate(small, size=(28, 28), mode="bilinear", align_corners=True)


def test_the_training_split_has_a_plain_black_backdrop(fashion):
    assert plain_backdrop(fashion) == 0.0


def test_a_training_split_without_a_plain_backdrop_is_refused(fashion):
    noisy = Split(torch.randint(0, 256, (500, 1, 28, 28), dtype=torch.uint8), fashion.labels[:500])
    with pytest.raises(BackdropError, match="borders vary"):
        plain_backdrop(noisy)


def test_pasted_garments_keep_their_pixels_and_take_the_backdrop_elsewhere(fashion):
    garments, backs = fashion.images[:64], smooth_backdrops(64, 0)
    out = paste(garments, backs, 0.0)
    assert out.dtype == torch.uint8 and out.shape == garments.shape
    solid, empty = garments >= 32, garments == 0
    assert torch.equal(out[solid], garments[solid])
    assert (out[empty].float() - backs[empty]).abs().max() <= 0.5
    assert garment_alpha(garments, 0.0)[empty].max() == 0


def test_a_decided_photos_backdrop_is_recovered_where_its_garment_hides_it(fashion):
    """Decided photos = other garments pasted on known backdrops (as a new booth shoots them): the
    estimate is close to the true backdrop everywhere, under the garment too."""
    decided_idx = torch.arange(5000, 5200)
    truth = smooth_backdrops(200, 1)
    decided = Split(paste(fashion.images[decided_idx], truth, 0.0), fashion.labels[decided_idx])
    train = fashion.subset(torch.arange(5000))
    est = estimate_backdrops(decided, train, 0.0)
    assert est.shape == truth.shape  # every one of them differs from the training backdrop
    err = (est - truth).abs()
    x = decided.images.float()  # the naive guess: the photo's mean border grey everywhere
    flat = border(x).mean(-1).view(-1, 1, 1, 1)
    assert err.mean() < 9 and err.mean() < 0.7 * (flat - truth).abs().mean()  # measured 7.4 against 13.2
    assert err.flatten(1).mean(1).quantile(0.9) < 13  # grey levels; the backdrops span 120..230 (measured 10.8)
    # a photo on the training split's own backdrop gives no new backdrop
    ordinary = Split(fashion.images[decided_idx[:20]], fashion.labels[decided_idx[:20]])
    assert len(estimate_backdrops(ordinary, train, 0.0)) == 0


def test_the_demo_booth_backdrop_is_recovered_from_its_png(fashion):
    """The same through real PNG bytes of the feedback demo's booth (its own generator)."""
    from scripts.demo_feedback import studio_shot

    idx = np.arange(5000, 5100)
    spec = PreprocessSpec()
    shots = torch.stack([bytes_to_uint8(b, spec) for b in studio_shot(fashion.images[:, 0].numpy(), idx, seed=4)])
    est = estimate_backdrops(Split(shots, fashion.labels[idx]), fashion.subset(torch.arange(5000)), 0.0)
    assert len(est) == len(idx)
    # where the garment leaves the photo's backdrop visible, the estimate matches it
    visible = fashion.images[idx] == 0
    x = shots.float()
    flat = border(x).mean(-1).view(-1, 1, 1, 1)
    err, naive = (est - x).abs()[visible], (flat - x).expand_as(x).abs()[visible]
    assert err.median() < 3 and err.mean() < 0.6 * naive.mean()  # measured 1.3 and 7.9 against 19.1
