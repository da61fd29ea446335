"""Fit the unfamiliar-photo gate (returns_model/gate.py): statistics on the training split, cutoff on
the validation split. training/trust.py runs it as part of a model's trust step.

Math
----
Class means ``mu_k`` and the tied covariance ``S = (1/N) sum_i (e_i - mu_{y_i})(e_i - mu_{y_i})^T`` of the
tapped embedding over the *training* split (55,000 photos; 48 dims gives ~1,100 photos per
covariance entry, so no shrinkage beyond a 1e-6 ridge is needed). The scales (median, q99 of the
distance; median, q01 of the total variation) also come from training photos. The cutoff is the
``(1 - rate)`` order statistic of the scores of the *validation* photos, which the statistics never
saw, so the flagged share of new ordinary photos is ~``rate`` (2%). No unfamiliar photo, and no
label of a validation photo, chooses any number.
"""
from __future__ import annotations

import math

import torch

from returns_model.gate import GateError, LayerTap, UnfamiliarGate, min_mahalanobis, total_variation
from returns_model.meta import ArchConfig, PreprocessSpec
from returns_model.network import SEResNet, build_model
from returns_model.preprocess import normalize

DEFAULT_RATE = 0.02
RIDGE = 1e-6


def min_photos_per_class(dim: int) -> int:
    """Fewest training photos of every class that ``fit_statistics`` accepts: ``dim``, the width of the
    tapped embedding.

    Each class's residuals sum to zero, so the tied covariance of ``N`` photos in ``K`` classes has rank
    at most ``N - K``; it can be of full rank only from ``N = dim + K``. With ``dim`` photos in every
    class, ``N - K >= K (dim - 1) >= dim`` (for ``dim, K >= 2``), and every class mean rests on as many
    photos as it has coordinates. The ridge keeps the covariance invertible where the photos themselves
    are degenerate; it does not make fewer photos enough.
    """
    return dim


def flagged_count(rate: float, n: int) -> int:
    """How many of ``n`` held-out photos a cutoff chosen at ``rate`` flags: the ``floor(rate * n)``
    highest scores (fewer where scores tie)."""
    return math.floor(rate * n)


def min_cutoff_photos(rate: float) -> int:
    """Fewest held-out photos ``choose_cutoff`` can set a ``rate`` cutoff on: enough for one to be flagged."""
    if not 0 < rate < 1:
        raise GateError(f"flag rate must be in (0, 1), got {rate}")
    n = max(1, math.floor(1 / rate))
    while flagged_count(rate, n) < 1:
        n += 1
    return n


@torch.inference_mode()
def embedding_width(arch: ArchConfig, spec: PreprocessSpec, layer: str) -> int:
    """Width of the embedding the gate reads at ``layer`` of a network built from ``arch``.

    Measured by one forward pass of a freshly built network on a blank photo, so it follows the
    network's code for any layer. Raises GateError when the network has no such layer.
    """
    blank = torch.zeros(1, spec.channels, spec.size, spec.size, dtype=torch.uint8)
    return forward_with_tap(build_model(arch), blank, spec, layer)[1].shape[1]


def fit_statistics(emb: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor, layer: str,
                   num_classes: int) -> UnfamiliarGate:
    """Class means, tied precision and score scales from training-split embeddings (no cutoff yet)."""
    if len(emb) != len(labels) or len(emb) != len(pixels):
        raise GateError(f"{len(emb)} embeddings, {len(labels)} labels and {len(pixels)} images must match")
    emb = emb.double()
    counts = torch.bincount(labels, minlength=num_classes)
    need = min_photos_per_class(emb.shape[1])
    if (counts < need).any():
        raise GateError(f"every class needs at least {need} training photos (one per dimension of the "
                        f"{layer} embedding); counts {counts.tolist()}")
    means = torch.stack([emb[labels == k].mean(0) for k in range(num_classes)])
    resid = emb - means[labels]
    cov = resid.T @ resid / len(emb)
    cov += RIDGE * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    precision = torch.linalg.inv(cov)
    precision = (precision + precision.T) / 2
    d = min_mahalanobis(emb.float(), means.float(), precision.float())
    tv = total_variation(pixels)
    q = torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)
    dq, tq = torch.quantile(d.double(), q), torch.quantile(tv.double(), q)
    return UnfamiliarGate(layer=layer, means=means.float().tolist(), precision=precision.float().tolist(),
                          distance_median=float(dq[1]), distance_q99=float(dq[2]),
                          tv_median=float(tq[1]), tv_q01=float(tq[0]),
                          info={"fitted_on": f"training split, {len(emb)} photos"})


def choose_cutoff(gate: UnfamiliarGate, emb: torch.Tensor, pixels: torch.Tensor, rate: float = DEFAULT_RATE,
                  source: str = "validation split") -> UnfamiliarGate:
    """Set the cutoff so at most ``rate`` of these held-out ordinary photos score above it."""
    need = min_cutoff_photos(rate)
    if len(emb) < need:
        raise GateError(f"{len(emb)} held-out photos are too few to set a {rate:.1%} flag rate; "
                        f"it needs at least {need}")
    s = torch.sort(gate.score(emb, pixels=pixels).double(), descending=True).values
    gate.cutoff = float(s[flagged_count(rate, len(s))])
    flagged = float((s > gate.cutoff).double().mean())
    gate.info.update({"cutoff_chosen_on": f"{source}, {len(s)} photos", "target_flag_rate": rate,
                      "flagged_share_at_cutoff": flagged})
    return gate


@torch.inference_mode()
def forward_with_tap(model: SEResNet, images: torch.Tensor, spec: PreprocessSpec, layer: str,
                     batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the pooled, flip-averaged output of ``layer`` for uint8 images, in one forward pass
    per batch (the model's own forward, as served)."""
    device = next(model.parameters()).device
    tap = LayerTap(model, layer)
    logits, tapped = [], []
    try:
        model.eval()
        for i in range(0, len(images), batch_size):
            x = normalize(images[i:i + batch_size].to(device), spec).contiguous(memory_format=torch.channels_last)
            logits.append(model(x).float().cpu())
            tapped.append(tap.pooled(len(x)).cpu())
    finally:
        tap.close()
    return torch.cat(logits), torch.cat(tapped)


# --- reviewers' decisions (training/retrain.py) -------------------------------------------------
MIN_MODE_PHOTOS = 5  # decided photos of one class the gate still flags before they get a mode of their own


def add_modes(gate: UnfamiliarGate, emb: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor,
              num_classes: int, min_photos: int = MIN_MODE_PHOTOS) -> tuple[UnfamiliarGate, dict]:
    """Make photos that people decided are products familiar: one extra mean per class, from the
    decided photos of that class which the gate (with its cutoff) still flags.

    ``d(e)`` is a minimum over means, so an extra row only ever lowers a score; the tied precision and
    the scales stay those of the training split. A class with fewer than ``min_photos`` such photos
    gets no mode (one photo is not a setup). The cutoff must be chosen again afterwards.
    """
    flagged = gate.flag(gate.score(emb, pixels=pixels))
    rows, per_class = [], {}
    for k in range(num_classes):
        sel = flagged & (labels == k)
        if int(sel.sum()) >= min_photos:
            rows.append(emb[sel].double().mean(0).float().tolist())
            per_class[k] = int(sel.sum())
    if not rows:
        return gate, {"modes_added": 0}
    new = UnfamiliarGate(layer=gate.layer, means=gate.means + rows, precision=gate.precision,
                         distance_median=gate.distance_median, distance_q99=gate.distance_q99,
                         tv_median=gate.tv_median, tv_q01=gate.tv_q01, cutoff=gate.cutoff, info=dict(gate.info))
    info = {"modes_added": len(rows), "mode_classes": per_class, "flagged_decided_before": int(flagged.sum()),
            "decided_photos": len(labels)}
    new.info["decided_modes"] = info
    return new, info


def sharpen(gate: UnfamiliarGate, base_rows: int, emb: torch.Tensor, pixels: torch.Tensor) -> tuple[UnfamiliarGate, dict]:
    """Photos people decided are ``not_a_product`` must stay flagged: drop every added mode (rows from
    ``base_rows`` on) that is the nearest mean of such a photo the gate no longer flags."""
    if len(emb) == 0 or len(gate.means) == base_rows:
        return gate, {"not_a_product": len(emb), "modes_dropped": 0}
    dropped: set[int] = set()
    while True:
        keep = [i for i in range(len(gate.means)) if i < base_rows or i not in dropped]
        trial = UnfamiliarGate(layer=gate.layer, means=[gate.means[i] for i in keep], precision=gate.precision,
                               distance_median=gate.distance_median, distance_q99=gate.distance_q99,
                               tv_median=gate.tv_median, tv_q01=gate.tv_q01, cutoff=gate.cutoff, info=dict(gate.info))
        missed = ~trial.flag(trial.score(emb, pixels=pixels))
        if not missed.any():
            break
        mu = torch.tensor(trial.means)
        p = torch.tensor(trial.precision)
        diff = emb[missed].float()[:, None, :] - mu[None]  # [M, K, D]; M is small (decided photos)
        nearest = torch.einsum("mkd,de,mke->mk", diff, p, diff).argmin(1)
        culprits = {keep[i] for i in nearest.tolist() if keep[i] >= base_rows}
        if not culprits:  # missed by the original statistics: no added mode to blame
            break
        dropped |= culprits
    trial.info["not_a_product"] = {"photos": len(emb), "modes_dropped": len(dropped),
                                   "still_unflagged": int(missed.sum())}
    return trial, trial.info["not_a_product"]
