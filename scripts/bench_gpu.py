"""The bench on a GPU: served against raw with fp16 autocast, and what the GPU changes in the answers.

`make bench` measures the CPU path that the shop's cluster runs by default. Where a node has a GPU, the
handler runs the same network there with fp16 autocast; this measures, on one machine and one model
folder: the raw forward pass (decoded tensors, and decode + forward) with autocast and in fp32; the
served path, `returns-submit --api v2` against `returns-kserve --device cuda` (TorchServe needs Java,
which GPU images often lack; both servers share handler.core); one photo per request; single-photo
latency; and how far the GPU's answers are from the CPU's fp32 answers on the test split (the
certificate in model.json was computed on the CPU's).

    python -m scripts.bench_gpu --model-dir models/release --output bench/gpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from handler.core import Classifier
from returns_model.fileio import write_json
from returns_submit.config import SubmitConfig
from scripts.bench import (KSERVE_PRED, LocalPredictor, one_photo_per_request, passes_per_second, percentiles,
                           run_submitter, spread, write_inbox)


def raw_rates(clf: Classifier, pngs: list[bytes], batch: int, runs: int) -> dict[str, dict[str, Any]]:
    """Photos/s of the forward pass on decoded tensors and of decode + forward, with and without autocast."""
    decoded = clf.decode(pngs).pixels
    rates: dict[str, list[float]] = {}
    served_amp = clf.amp  # as the handler set it (on for a GPU); restored after
    for _ in range(runs):
        for amp in (True, False):
            clf.amp = amp
            tag = "amp" if amp else "fp32"
            for name, fn, items in ((f"raw_{tag}_images_per_s", clf.probabilities, decoded),
                                    (f"raw_{tag}_decode_images_per_s", clf.classify, pngs)):
                # the warm-up pass also lets cuDNN pick its kernels for this shape
                rates.setdefault(name, []).append(passes_per_second(fn, items, batch, torch.cuda.synchronize))
    clf.amp = served_amp
    return {k: spread(v) for k, v in rates.items()}


def agreement(gpu: Classifier, model_dir: Path, pngs: list[bytes]) -> dict[str, Any]:
    """The GPU's (autocast) answers against the CPU's fp32 answers for the same photos."""
    cpu = Classifier(model_dir, device="cpu")
    g, c = gpu.classify(pngs), cpu.classify(pngs)
    diff = max(abs(a["confidence"] - b["confidence"]) for a, b in zip(g, c))
    score_diff = max(abs(a["unfamiliar_score"] - b["unfamiliar_score"]) for a, b in zip(g, c))
    return {"photos": len(pngs), "max_confidence_difference": round(diff, 6),
            "max_unfamiliar_score_difference": round(score_diff, 4),
            "same_label": sum(a["label"] == b["label"] for a, b in zip(g, c)),
            "same_review_decision": sum(a["needs_review"] == b["needs_review"] for a, b in zip(g, c)),
            "same_review_reasons": sum(a["review_reason"] == b["review_reason"] for a, b in zip(g, c))}


def run(model_dir: Path, output: Path, n: int, runs: int) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: CUDA sees no GPU here")
    batch = SubmitConfig.batch_size
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        pngs = write_inbox(tmp / "inbox", n)
        clf = Classifier(model_dir, device="cuda:0")
        raw = raw_rates(clf, pngs, batch, runs)
        agree = agreement(clf, model_dir, pngs)
        del clf
        with LocalPredictor(model_dir, tmp / "predictor.log", extra_args=["--device", "cuda"]) as server:
            served = [n / run_submitter(server, tmp / "inbox", tmp / f"out{i}", batch, SubmitConfig.concurrency,
                                        api="v2")["wall_s"] for i in range(runs)]
            url = server.inference_url + KSERVE_PRED
            naive = [one_photo_per_request(url, pngs[:2000], 4, as_json=True)[0] for _ in range(runs)]
            lat = [percentiles(one_photo_per_request(url, pngs[:300], 1, as_json=True)[1]) for _ in range(runs)]
        ready = [line for line in (tmp / "predictor.log").read_text().splitlines() if " ready on " in line]
    s = statistics.median(served)
    results = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "n": n, "runs": runs,
        "photos_per_request": batch, "concurrency": SubmitConfig.concurrency,
        **{k: v["median"] for k, v in raw.items()},
        "served_images_per_s": round(s, 1), "naive_images_per_s": round(statistics.median(naive), 1),
        "served_over_raw_amp": round(s / raw["raw_amp_images_per_s"]["median"], 3),
        "served_over_raw_amp_decode": round(s / raw["raw_amp_decode_images_per_s"]["median"], 3),
        "served_over_naive": round(s / statistics.median(naive), 2),
        "latency_ms_concurrency_1": {q: statistics.median(r[q] for r in lat) for q in ("p50", "p95", "p99")},
        "spread": {**raw, "served_images_per_s": spread(served), "naive_images_per_s": spread(naive)},
        "gpu_vs_cpu_answers": agree,
        "predictor_ready": ready[-1].split(" ready on ", 1)[1] if ready else None,  # device and model, as logged
    }
    write_json(output, results)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Served against raw on a GPU (fp16 autocast), and GPU vs CPU answers.")
    p.add_argument("--model-dir", default="models/release", help="model folder (model.json + model.pt)")
    p.add_argument("--output", default="bench/gpu.json")
    p.add_argument("--n", type=int, default=10000, help="photos per served and raw run")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    r = run(Path(args.model_dir), Path(args.output), args.n, args.runs)
    print(json.dumps({k: v for k, v in r.items() if k != "spread"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
