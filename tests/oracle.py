"""An independent oracle for the served answers: what model.json says a photo's answer must be.

It rebuilds the raw network from ``model.json``'s ``arch`` with ``returns_model.network`` and
``torch.load`` (not ``returns_model.artifact.load_model``, not ``handler.core``), normalises the
pixels itself from ``model.json``'s ``preprocess`` numbers, and applies the calibration written
there: ``confidence = max softmax(logits / temperature)``; ``unfamiliar`` from the gate's numbers in
``model.json`` (its own implementation here: a hook on the named block, the direct ``[N, K, D]``
Mahalanobis form, total variation of the pixels); ``needs_review = confidence < threshold or
unfamiliar``. A handler that forgets the temperature, hard-codes another threshold, ignores the
gate or mixes up the order of a batch disagrees with it.

``Oracle(model_dir, path="int8")`` answers for the int8 CPU path instead: logits and the tapped
embedding from ``model.int8.onnx`` in its own session of the runtime the ``int8`` section names
(OpenVINO; ONNX Runtime for older folders), then the same arithmetic with that section's
temperature, threshold and gate.

Fashion-MNIST test images are 28x28 and PNG is lossless, so no resize is involved: the decoded
pixels are the dataset's own bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from returns_model.fileio import write_bytes
from returns_model.meta import ArchConfig
from returns_model.network import build_model


@dataclass(frozen=True)
class Expected:
    index: int  # Fashion-MNIST test index
    class_id: int
    confidence: float
    needs_review: bool
    top_k: list[tuple[int, float]]
    unfamiliar: bool = False
    unfamiliar_score: float | None = None

    @property
    def review_reason(self) -> list[str]:
        return [r for r, on in (("low_confidence", self.confidence < self.threshold), ("unfamiliar", self.unfamiliar))
                if on]

    threshold: float = 0.0


class Oracle:
    def __init__(self, model_dir: Path, path: str = "float"):
        self.model_dir = Path(model_dir)
        meta = json.loads((Path(model_dir) / "model.json").read_text())
        rule = meta["int8"] if path == "int8" else meta
        self.temperature = float(rule["calibration"]["temperature"])
        self.threshold = float(rule["calibration"]["threshold"])
        self.session = None  # the int8 graph, in the runtime its rule was fitted on: numpy x -> (logits, tapped)
        if path == "int8":
            graph = str(self.model_dir / meta["int8"]["file"])
            if (meta["int8"].get("runtime") or {}).get("name", "onnxruntime") == "openvino":
                import openvino as ov

                request = ov.Core().compile_model(graph, "CPU").create_infer_request()

                def run(x):
                    request.infer({"pixels": x})
                    return request.get_tensor("logits").data.copy(), request.get_tensor("tapped").data.copy()

                self.session = run
            else:
                import onnxruntime as ort

                ort_session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
                self.session = lambda x: tuple(ort_session.run(None, {"pixels": x}))
        self.top_k = int(meta.get("top_k", 3))
        self.class_names = list(meta["class_names"])
        pre = meta["preprocess"]
        self.mean = torch.tensor(pre["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(pre["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.net = build_model(ArchConfig.from_dict(meta["arch"]))
        self.net.load_state_dict(torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True))
        self.net.eval()
        self.gate = rule.get("unfamiliar")
        self._tapped: list[torch.Tensor] = []
        if self.gate:
            self.net.get_submodule(self.gate["layer"]).register_forward_hook(
                lambda _m, _a, out: self._tapped.append(out.double().mean((2, 3))))

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 28, 28]`` -> calibrated probabilities ``[N, K]`` (float64)."""
        return self.answers(images)[0]

    @torch.inference_mode()
    def answers(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 ``[N, 28, 28]`` -> calibrated probabilities ``[N, K]`` and unfamiliarity ``[N]`` (None without a gate)."""
        x = (images.unsqueeze(1).float() / 255.0 - self.mean) / self.std
        logits, scores = [], []
        for i in range(0, len(x), 256):
            self._tapped.clear()
            if self.session is not None:  # the int8 graph answers the logits and the pooled tap itself
                out, tapped = self.session(x[i:i + 256].numpy())
                logits.append(torch.from_numpy(out))
                self._tapped.append(torch.from_numpy(tapped).double())
            else:
                logits.append(self.net(x[i:i + 256]))
            if self.gate:
                scores.append(self._score(self._tapped[-1], images[i:i + 256]))
        probs = torch.softmax(torch.cat(logits).double() / self.temperature, dim=1)
        return probs, (torch.cat(scores) if self.gate else None)

    def cached_answers(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``answers``, kept on disk under a key made of everything they depend on (model.json,
        model.pt, this file, the pixels), so that each of mutmut's forked test runs does not redo
        thousands of forward passes. Nothing of the code under test enters the answers."""
        h = hashlib.sha256()
        parts = [self.model_dir / "model.json", self.model_dir / "model.pt", Path(__file__)]
        if self.session is not None:
            h.update(b"int8")
            parts.append(self.model_dir / "model.int8.onnx")
        for part in parts:
            h.update(part.read_bytes())
        h.update(images.contiguous().numpy().tobytes())
        path = Path(tempfile.gettempdir()) / "returns-classifier-oracle" / f"{h.hexdigest()}.pt"
        if path.exists():
            try:
                cached = torch.load(path, weights_only=True)
                return cached["probs"], cached.get("scores")
            except Exception:  # a cut or foreign file: recompute and overwrite it
                pass
        probs, scores = self.answers(images)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"probs": probs, **({"scores": scores} if scores is not None else {})}, buf)
        write_bytes(path, buf.getvalue())  # atomic: a forked run never reads half a cache file
        return probs, scores

    def _score(self, tapped: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        g = self.gate
        n = len(images)
        emb = (tapped[:n] + tapped[n:]) / 2 if len(tapped) == 2 * n else tapped  # flip-averaged halves
        diff = emb[:, None, :] - torch.tensor(g["means"], dtype=torch.float64)[None]  # [N, K, D]
        d = torch.einsum("nkd,de,nke->nk", diff, torch.tensor(g["precision"], dtype=torch.float64), diff).min(1).values
        z_d = (d - g["distance_median"]) / (g["distance_q99"] - g["distance_median"])
        px = images.double() / 255.0
        tv = (px[:, 1:] - px[:, :-1]).abs().mean((1, 2)) + (px[:, :, 1:] - px[:, :, :-1]).abs().mean((1, 2))
        z_tv = (g["tv_median"] - tv) / (g["tv_median"] - g["tv_q01"])
        return torch.maximum(z_d, z_tv)

    def expected(self, index: int, probs: torch.Tensor, score: float | None = None) -> Expected:
        top_p, top_i = probs.topk(self.top_k)
        conf = float(top_p[0])
        unfamiliar = score is not None and score > self.gate["cutoff"]
        return Expected(index, int(top_i[0]), conf, conf < self.threshold or unfamiliar,
                        [(int(i), float(p)) for p, i in zip(top_p, top_i)], unfamiliar, score, self.threshold)


def spread_sample(oracle: Oracle, images: torch.Tensor, pool: int = 2000, margin: float = 2e-4) -> list[Expected]:
    """Test photos over the whole confidence range: two from each 0.1-wide confidence band that has
    any, one at each decile of the pool's confidences, and the two nearest the threshold on each side
    (kept at least ``margin`` away, so float rounding cannot decide the expected flag)."""
    probs, scores = oracle.cached_answers(images[:pool])
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
    if scores is not None:  # and photos the gate flags, kept clear of its cutoff
        gap_u = scores - oracle.gate["cutoff"]
        chosen += [i for i in torch.argsort(-gap_u).tolist() if gap_u[i] > 0.01][:4]
        chosen = [i for i in chosen if abs(float(gap_u[i])) > 1e-3]
    unique = list(dict.fromkeys(chosen))
    return [oracle.expected(i, probs[i], None if scores is None else float(scores[i])) for i in unique]
