"""The "unfamiliar photo" gate: flags photos unlike the training data, so they go to a person.

Torch only: it travels in the model contract (``model.json``) and the server imports it.

Math
----
Two scores, each put on a common scale by its own training-split quantiles, then combined by max:

* Feature distance. ``e`` is the global-average-pooled output of one inner block (``layer``,
  default ``blocks.3``, the last block of the middle stage; flip-averaged like the model's own
  features). With class means ``mu_k`` and a tied covariance ``S`` fitted on the training split,
  ``d(e) = min_k (e - mu_k)^T S^-1 (e - mu_k)`` (class-conditional Mahalanobis, Lee et al. 2018).
  A middle layer still sees texture and stroke statistics that the penultimate layer has
  abstracted away: on the tuning kinds it flagged noise 95% vs 56% for the penultimate embedding.
* Smoothness. ``tv`` is the mean absolute difference between neighbouring pixels (rows plus
  columns, 0..1 scale) of the 28x28 uint8 model input. Fashion-MNIST garments are shaded; flat
  synthetic regions (a large noise frame downscales to a flat grey box on the black letterbox, a
  blank frame is flat) have a total variation below almost any garment's.

``z_d = (d - median_d) / (q99_d - median_d)`` and ``z_tv = (median_tv - tv) / (median_tv - q01_tv)``,
``score = max(z_d, z_tv)``; a photo is flagged when ``score > cutoff``, the cutoff being set so that
a chosen share (2% by default) of held-out ordinary photos is flagged.

Cost: one forward hook on an existing layer, a [N, 48] x [48, 48] product and a few pixel sums
(0.12 ms for 32 photos against a 52 ms forward pass, one thread).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

GATE_FORMAT = 1


class GateError(ValueError):
    """The gate's statistics or inputs do not fit together."""


def total_variation(pixels: torch.Tensor) -> torch.Tensor:
    """Mean |neighbour difference| (rows + columns) of uint8 ``[N, C, H, W]`` images, on a 0..1 scale.

    Taken on the pixels *after* ``bytes_to_uint8`` (greyscale, letterboxed with black, 28x28), so it
    sees what the model sees; a different preprocessing spec (size, fill, colour) changes its scale
    and needs a refit.
    """
    if pixels.dim() != 4:
        raise GateError(f"pixels must be [N, C, H, W], got shape {tuple(pixels.shape)}")
    x = pixels.float().mean(1) / 255.0
    return (x[:, 1:] - x[:, :-1]).abs().mean((1, 2)) + (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2))


def min_mahalanobis(emb: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``min_k (e - mu_k)^T P (e - mu_k)`` for each row, by ``e'Pe - 2 e'P mu_k + mu_k'P mu_k`` (no [N,K,D])."""
    ep = emb @ precision
    d = (ep * emb).sum(1, keepdim=True) - 2 * ep @ means.T + ((means @ precision) * means).sum(1)
    return d.min(1).values.clamp_min(0)


class LayerTap:
    """Captures the global-average-pooled output of one module during the model's normal forward.

    With flip averaging the layer sees ``2N`` rows (each photo and its mirror); ``pooled(n)`` averages
    the two halves, matching how ``SEResNet.features`` averages its embedding.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise GateError(f"the model has no layer {layer!r} for the gate to read") from None
        self._out: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._out = output.float().mean((2, 3))

    def pooled(self, n: int) -> torch.Tensor:
        if self._out is None:
            raise GateError("no forward pass has run since the tap was attached")
        out, self._out = self._out, None
        if len(out) == 2 * n:
            return (out[:n] + out[n:]) / 2
        if len(out) < n:
            raise GateError(f"the tapped layer saw {len(out)} rows for a batch of {n}")
        return out[:n]

    def close(self) -> None:
        self._handle.remove()


@dataclass
class UnfamiliarGate:
    """Statistics of ordinary photos, and the cutoff above which a photo is called unfamiliar."""

    layer: str
    means: list[list[float]]  # [K, D] class means of the tapped embedding (training split)
    precision: list[list[float]]  # [D, D] inverse of the tied within-class covariance
    distance_median: float
    distance_q99: float
    tv_median: float
    tv_q01: float
    cutoff: float | None = None  # set by training/gate_fit.choose_cutoff; a gate without one refuses to flag
    info: dict[str, Any] = field(default_factory=dict)  # provenance: splits, flagged share on validation

    def __post_init__(self) -> None:
        k, d = len(self.means), len(self.means[0]) if self.means else 0
        if k < 2 or d < 1:
            raise GateError(f"need class means for at least 2 classes, got a {k}x{d} table")
        if len(self.precision) != d or any(len(row) != d for row in self.precision):
            raise GateError(f"precision must be {d}x{d} to match means of dimension {d}")
        if not self.distance_q99 > self.distance_median:
            raise GateError(f"distance q99 {self.distance_q99} must exceed its median {self.distance_median}")
        if not self.tv_median > self.tv_q01:
            raise GateError(f"smoothness median {self.tv_median} must exceed its 1% quantile {self.tv_q01}")
        self._mu = torch.tensor(self.means, dtype=torch.float32)
        self._p = torch.tensor(self.precision, dtype=torch.float32)

    @property
    def dim(self) -> int:
        return self._mu.shape[1]

    def score(self, features: torch.Tensor, *, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Unfamiliarity ``[N]`` (higher = stranger) from the tapped embedding and the uint8 pixels.

        ``features`` is the pooled output of ``self.layer`` (see ``LayerTap``), not the penultimate
        embedding; ``pixels`` are the uint8 ``[N, C, H, W]`` model inputs. Without pixels only the
        feature distance counts.
        """
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise GateError(f"features must be [N, {self.dim}] from layer {self.layer!r}, got {tuple(features.shape)}")
        d = min_mahalanobis(features.float(), self._mu.to(features.device), self._p.to(features.device))
        z = (d - self.distance_median) / (self.distance_q99 - self.distance_median)
        if pixels is not None:
            if len(pixels) != len(features):
                raise GateError(f"{len(pixels)} images for {len(features)} feature rows")
            tv = total_variation(pixels).to(z.device)
            z = torch.maximum(z, (self.tv_median - tv) / (self.tv_median - self.tv_q01))
        return z

    def flag(self, score: torch.Tensor) -> torch.Tensor:
        """True where a photo is unfamiliar and must go to review."""
        if self.cutoff is None:
            raise GateError("the gate has no cutoff; run training/gate_fit.choose_cutoff on held-out ordinary photos")
        return score > self.cutoff

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items()}
        d["format"] = GATE_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnfamiliarGate":
        if d.get("format") != GATE_FORMAT:
            raise GateError(f"gate format {d.get('format')!r}; this code reads {GATE_FORMAT}")
        try:
            return cls(layer=str(d["layer"]), means=d["means"], precision=d["precision"],
                       distance_median=float(d["distance_median"]), distance_q99=float(d["distance_q99"]),
                       tv_median=float(d["tv_median"]), tv_q01=float(d["tv_q01"]),
                       cutoff=None if d.get("cutoff") is None else float(d["cutoff"]), info=dict(d.get("info", {})))
        except KeyError as exc:
            raise GateError(f"gate statistics are missing {exc.args[0]!r}") from None
