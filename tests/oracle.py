"""An independent oracle for the served answers: what model.json says a photo's answer must be.

It rebuilds the raw network from ``model.json``'s ``arch`` with ``returns_model.network`` and
``torch.load`` (not ``returns_model.artifact.load_model``, not ``handler.core``), normalises the
pixels itself from ``model.json``'s ``preprocess`` numbers, and applies the calibration written
there: ``confidence = max softmax(logits / temperature)``, ``needs_review = confidence < threshold``.
A handler that forgets the temperature, hard-codes another threshold or mixes up the order of a
batch disagrees with it.

Fashion-MNIST test images are 28x28 and PNG is lossless, so no resize is involved: the decoded
pixels are the dataset's own bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from returns_model.network import ArchConfig, build_model


@dataclass(frozen=True)
class Expected:
    index: int  # Fashion-MNIST test index
    class_id: int
    confidence: float
    needs_review: bool
    top_k: list[tuple[int, float]]


class Oracle:
    def __init__(self, model_dir: Path):
        meta = json.loads((Path(model_dir) / "model.json").read_text())
        self.temperature = float(meta["calibration"]["temperature"])
        self.threshold = float(meta["calibration"]["threshold"])
        self.top_k = int(meta.get("top_k", 3))
        self.class_names = list(meta["class_names"])
        pre = meta["preprocess"]
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.net = build_model(ArchConfig.from_dict(meta["arch"]))
        self.net.load_state_dict(torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True))
        self.net.eval()

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 28, 28]`` -> calibrated probabilities ``[N, K]`` (float64)."""
        x = (images.unsqueeze(1).float() / 255.0 - self.mean) / self.std
        logits = torch.cat([self.net(x[i:i + 256]) for i in range(0, len(x), 256)])
        return torch.softmax(logits.double() / self.temperature, dim=1)

    def expected(self, index: int, probs: torch.Tensor) -> Expected:
        top_p, top_i = probs.topk(self.top_k)
        conf = float(top_p[0])
        return Expected(index, int(top_i[0]), conf, conf < self.threshold,
                        [(int(i), float(p)) for p, i in zip(top_p, top_i)])


def spread_sample(oracle: Oracle, images: torch.Tensor, pool: int = 2000, margin: float = 2e-4) -> list[Expected]:
    """Test photos over the whole confidence range: two from each 0.1-wide confidence band that has
    any, one at each decile of the pool's confidences, and the two nearest the threshold on each side
    (kept at least ``margin`` away, so float rounding cannot decide the expected flag)."""
    probs = oracle.probabilities(images[:pool])
    conf = probs.max(1).values
    chosen: list[int] = []
    for band in range(10):
        lo, hi = band / 10, (band + 1) / 10
        idx = torch.nonzero((conf >= lo) & (conf < hi if band < 9 else conf <= 1.0)).flatten().tolist()
        chosen += idx[:2]
    order = torch.argsort(conf).tolist()
    chosen += [order[min(len(order) - 1, round(q * (len(order) - 1) / 10))] for q in range(11)]
    gap = conf.double() - oracle.threshold
    below = [i for i in torch.argsort(-gap).tolist() if gap[i] < -margin][:2]  # just under: review
    above = [i for i in torch.argsort(gap).tolist() if gap[i] > margin][:2]   # just over: accepted
    chosen += below + above
    unique = list(dict.fromkeys(chosen))
    return [oracle.expected(i, probs[i]) for i in unique]
