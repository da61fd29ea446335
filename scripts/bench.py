"""`make bench`: how close the served pipeline comes to the model's raw speed, side by side in one run.

Measures on this machine, in this order: the raw forward pass on decoded tensors; the same with PNG
decoding; `returns-submit` end to end against a local TorchServe on the real archive; a naive set-up
(TorchServe batch size 1, one photo per HTTP request); single-photo latency; memory. Then the same
served, naive and latency measurements against the KServe predictor (`returns-kserve`) on the same
archive, at the same photos per request and concurrency (`returns-submit --api v2`). Writes
bench/results.json, bench/throughput.png and prints a table.

    python -m scripts.bench --model-root dist/model            # full run (~10 minutes on 2 cores)
    python -m scripts.bench --tiny --output /tmp/r.json        # a few seconds of each, to check it works
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import requests
import torch

from handler.core import Classifier, available_cpus
from scripts.localserve import LocalTorchServe, free_port
from handler.serve_config import ServeConfig
from returns_model.names import MANIFEST_FILE, MAR_FILE, MODEL_NAME, MODEL_STORE
from training.archive import build_archive
from training.data import DEFAULT_FASHION_MNIST_DIR, read_idx
from returns_model.fileio import write_bytes, write_json

PRED = f"/predictions/{MODEL_NAME}"
KSERVE_PRED = f"/v1/models/{MODEL_NAME}:predict"  # KServe's v1 REST takes JSON: {"instances": [{"b64": ...}]}


class LocalPredictor:
    """`returns-kserve` on free loopback ports on a model root, for as long as the `with` block runs."""

    def __init__(self, model_root: Path, log: Path) -> None:
        self.model_root, self.log = Path(model_root), Path(log)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.inference_url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalPredictor":
        cmd = [sys.executable, "-m", "handler.kserve_predictor", "--model_dir", str(self.model_root),
               "--model_name", MODEL_NAME, "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        end = time.monotonic() + 180
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"returns-kserve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.inference_url}/v2/models/{MODEL_NAME}/ready", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise TimeoutError(f"returns-kserve not ready in 180 s: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class BenchConfig:
    model_root: str = "dist/model"
    model_dir: str = "models/release"  # for rebuilding the archive with other TorchServe batch settings
    n: int = 10000  # photos in the served / raw runs
    batch_size: int = 64  # photos per request sent by returns-submit
    concurrency: int = 4  # requests in flight from returns-submit
    naive_n: int = 2000
    naive_concurrency: int = 4
    latency_n: int = 300
    sweep_n: int = 2000
    sweep: bool = True
    output: str = "bench/results.json"

    @classmethod
    def tiny(cls, output: str) -> "BenchConfig":
        return cls(n=200, naive_n=100, latency_n=20, sweep=False, output=output)


def write_inbox(folder: Path, n: int) -> list[bytes]:
    """n Fashion-MNIST test images as PNG files (cycling past 10,000); returns their bytes (first 10,000)."""
    from PIL import Image
    import io

    images, _ = read_idx(DEFAULT_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i in range(min(n, len(images))):
        buf = io.BytesIO()
        Image.fromarray(images[i].numpy()).save(buf, "PNG")
        pngs.append(buf.getvalue())
        (folder / f"{i:06d}.png").write_bytes(pngs[-1])
    for i in range(len(images), n):  # more photos than the test set: links to the same bytes
        os.link(folder / f"{i % len(images):06d}.png", folder / f"{i:06d}.png")
    return pngs


def raw_rates(model_dir: Path, pngs: list[bytes], batch: int, threads: int) -> dict[str, float]:
    """Forward pass alone, and decode + forward, in-process with the worker's thread count."""
    clf = Classifier(model_dir, threads=threads)
    decoded = clf.decode(pngs).pixels
    out = {}
    for name, fn, items in (("raw_images_per_s", clf.probabilities, decoded),
                            ("raw_decode_images_per_s", clf.classify, pngs)):
        fn(items[:batch])  # warm
        t0 = time.perf_counter()
        for i in range(0, len(items), batch):
            fn(items[i:i + batch])
        out[name] = len(items) / (time.perf_counter() - t0)
    return out


def run_submitter(server: LocalTorchServe | LocalPredictor, inbox: Path, out: Path, batch: int, concurrency: int,
                  api: str = "predictions") -> dict[str, Any]:
    """returns-submit as its own process: wall time, its peak RSS and its run metadata."""
    cmd = [sys.executable, "-m", "returns_submit.cli", "--inbox", str(inbox), "--output", str(out), "--endpoint",
           server.inference_url, "--api", api, "--batch-size", str(batch), "--concurrency", str(concurrency),
           "--run-id", "bench", "--progress", "log", "--log-level", "WARNING"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # VmHWM belongs to the exec'd program's own address space; wait4's ru_maxrss would also count
    # the pages this (torch-loaded) process had when it forked the child.
    peak = 0.0
    stderr = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, peak_rss_mb(proc.pid))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    reader.join(5)
    if proc.returncode != 0:
        raise RuntimeError(f"returns-submit exited {proc.returncode}: {b''.join(stderr).decode()[-2000:]}")
    meta = json.loads((out / "run_bench" / "run_metadata.json").read_text())
    return {"wall_s": wall, "peak_rss_mb": peak, "metadata": meta}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmHWM for process {pid} (exited?)")


def one_photo_per_request(url: str, pngs: list[bytes], concurrency: int,
                          as_json: bool = False) -> tuple[float, list[float]]:
    """Send each photo as its own request (the raw body, or as_json: v1 JSON with one base64
    instance); returns photos/s and per-request latencies (ms)."""
    local = threading.local()
    latencies: list[float] = []

    def send(data: bytes) -> None:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        t0 = time.perf_counter()
        if as_json:
            r = session.post(url, json={"instances": [{"b64": base64.b64encode(data).decode()}]}, timeout=60)
        else:
            r = session.post(url, data=data, timeout=60)
        latencies.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, pngs))
    return len(pngs) / (time.perf_counter() - t0), latencies


def percentiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 2), "p95": round(q[94], 2), "p99": round(q[98], 2)}


def serve_with(model_dir: Path, root: Path, cfg: ServeConfig) -> Path:
    build_archive(model_dir, root, cfg)
    return root


def environment(threads: int, cfg: BenchConfig, serve: dict[str, Any]) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    from importlib import metadata

    return {"cpu": cpu, "cpus": available_cpus(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "worker_threads": threads, "submit_batch_size": cfg.batch_size,
            "submit_concurrency": cfg.concurrency, "torchserve_batch": serve, "python": platform.python_version(),
            "torch": torch.__version__, "torchserve": metadata.version("torchserve"),
            "kserve": metadata.version("kserve")}


def plot(sweep: list[dict[str, Any]], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for ts_batch in sorted({s["torchserve_batch_size"] for s in sweep}):
        rows = [s for s in sweep if s["torchserve_batch_size"] == ts_batch]
        ax.plot([r["photos_per_request"] for r in rows], [r["images_per_s"] for r in rows], "o-",
                label=f"TorchServe batch size {ts_batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("photos per request (returns-submit --batch-size)")
    ax.set_ylabel("photos / s, end to end")
    ax.set_title("Served throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def run(cfg: BenchConfig) -> dict[str, Any]:
    model_root = Path(cfg.model_root)
    serve_cfg = json.loads((model_root / MANIFEST_FILE).read_text())["serve_config"]
    threads = max(1, available_cpus() // serve_cfg["workers"])
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        pngs = write_inbox(tmp / "inbox", cfg.n)
        write_inbox(tmp / "inbox4", 4 * cfg.n)
        extracted = tmp / "extracted"
        with zipfile.ZipFile(model_root / MODEL_STORE / MAR_FILE) as z:
            z.extractall(extracted)
        forward_batch = cfg.batch_size * cfg.concurrency  # the largest forward the served path runs
        raw = raw_rates(extracted, pngs, forward_batch, threads)
        torch.set_num_threads(available_cpus())

        with LocalTorchServe(model_root, workdir=tmp / "ts") as server:
            served = run_submitter(server, tmp / "inbox", tmp / "out1", cfg.batch_size, cfg.concurrency)
            served4 = run_submitter(server, tmp / "inbox4", tmp / "out4", cfg.batch_size, cfg.concurrency)
            lat = {}
            for conc in (1, 8):
                _, ms = one_photo_per_request(server.inference_url + PRED, pngs[:cfg.latency_n], conc)
                lat[f"concurrency_{conc}"] = percentiles(ms)
            worker_rss = peak_rss_mb(server.worker_pids()[0])
            frontend_rss = peak_rss_mb(server.frontend_pid)

        naive_root = serve_with(Path(cfg.model_dir) if (Path(cfg.model_dir) / "model.pt").exists() else extracted,
                                tmp / "naive_root", ServeConfig(batch_size=1, max_batch_delay_ms=0))
        with LocalTorchServe(naive_root, workdir=tmp / "ts_naive") as server:
            naive_rate, _ = one_photo_per_request(server.inference_url + PRED, pngs[:cfg.naive_n],
                                                  cfg.naive_concurrency)

        predictor = bench_predictor(model_root, tmp, pngs, cfg)

        sweep = []
        if cfg.sweep:
            write_inbox(tmp / "sweep_inbox", cfg.sweep_n)
            for ts_batch in (1, 8):
                root = serve_with(Path(cfg.model_dir), tmp / f"sweep_{ts_batch}",
                                  ServeConfig(batch_size=ts_batch, max_batch_delay_ms=serve_cfg["max_batch_delay_ms"]))
                with LocalTorchServe(root, workdir=tmp / f"ts_sweep_{ts_batch}") as server:
                    for per_request in (1, 8, 32, 64, 128):
                        r = run_submitter(server, tmp / "sweep_inbox", tmp / f"sweep_{ts_batch}_{per_request}",
                                          per_request, cfg.concurrency)
                        sweep.append({"torchserve_batch_size": ts_batch, "photos_per_request": per_request,
                                      "images_per_s": round(cfg.sweep_n / r["wall_s"], 1)})

    served_rate = cfg.n / served["wall_s"]
    results = {
        "n": cfg.n,
        "raw_images_per_s": round(raw["raw_images_per_s"], 1),
        "raw_decode_images_per_s": round(raw["raw_decode_images_per_s"], 1),
        "served_images_per_s": round(served_rate, 1),
        "naive_images_per_s": round(naive_rate, 1),
        "latency_ms": lat,
        "peak_rss_mb": {"torchserve_worker": round(worker_rss, 1), "torchserve_frontend": round(frontend_rss, 1),
                        "submitter_n": round(served["peak_rss_mb"], 1),
                        "submitter_4n": round(served4["peak_rss_mb"], 1)},
        "served_over_raw": round(served_rate / raw["raw_images_per_s"], 3),
        "served_over_raw_decode": round(served_rate / raw["raw_decode_images_per_s"], 3),
        "served_over_naive": round(served_rate / naive_rate, 2),
        "submitter_reported_images_per_s": served["metadata"].get("throughput", {}).get("images_per_second"),
        "predictor": {**predictor,
                      "served_over_raw": round(predictor["served_images_per_s"] / raw["raw_images_per_s"], 3),
                      "served_over_raw_decode": round(predictor["served_images_per_s"] / raw["raw_decode_images_per_s"], 3),
                      "served_over_naive": round(predictor["served_images_per_s"] / predictor["naive_images_per_s"], 2),
                      "served_over_torchserve": round(predictor["served_images_per_s"] / served_rate, 2)},
        "sweep": sweep,
        "environment": environment(threads, cfg, {k: serve_cfg[k] for k in ("batch_size", "max_batch_delay_ms",
                                                                          "workers")}),
        "config": asdict(cfg),
    }
    out = Path(cfg.output)
    write_json(out, results)
    if sweep:
        plot(sweep, out.with_name("throughput.png"))
    return results


def bench_predictor(model_root: Path, tmp: Path, pngs: list[bytes], cfg: BenchConfig) -> dict[str, Any]:
    """returns-kserve on the same archive: served (returns-submit --api v2 at the same photos per request
    and concurrency as against TorchServe), naive (one photo per request), latency and peak RSS."""
    with LocalPredictor(model_root, tmp / "predictor.log") as server:
        served = run_submitter(server, tmp / "inbox", tmp / "out_kserve", cfg.batch_size, cfg.concurrency, api="v2")
        url = server.inference_url + KSERVE_PRED
        naive_rate, _ = one_photo_per_request(url, pngs[:cfg.naive_n], cfg.naive_concurrency, as_json=True)
        lat = {}
        for conc in (1, 8):
            _, ms = one_photo_per_request(url, pngs[:cfg.latency_n], conc, as_json=True)
            lat[f"concurrency_{conc}"] = percentiles(ms)
        rss = peak_rss_mb(server.proc.pid)
    return {"served_images_per_s": round(cfg.n / served["wall_s"], 1), "naive_images_per_s": round(naive_rate, 1),
            "latency_ms": lat, "peak_rss_mb": round(rss, 1), "api": "v2",
            "single_photo_request": "v1 JSON, one base64 instance"}


def table(r: dict[str, Any]) -> str:
    rows = [("raw forward (decoded tensors)", f"{r['raw_images_per_s']:.0f} photos/s"),
            ("raw decode + forward", f"{r['raw_decode_images_per_s']:.0f} photos/s"),
            ("served: returns-submit -> TorchServe", f"{r['served_images_per_s']:.0f} photos/s"),
            ("naive: batch 1, one photo per request", f"{r['naive_images_per_s']:.0f} photos/s"),
            ("served / raw", f"{r['served_over_raw']:.2f}"),
            ("served / raw+decode", f"{r['served_over_raw_decode']:.2f}"),
            ("served / naive", f"{r['served_over_naive']:.1f}x"),
            ("latency c=1 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**r["latency_ms"]["concurrency_1"])),
            ("latency c=8 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**r["latency_ms"]["concurrency_8"])),
            ("peak RSS worker / frontend", "{torchserve_worker:.0f} / {torchserve_frontend:.0f} MB".format(
                **r["peak_rss_mb"])),
            ("peak RSS submitter N / 4N", "{submitter_n:.0f} / {submitter_4n:.0f} MB".format(**r["peak_rss_mb"]))]
    k = r["predictor"]
    rows += [("served: returns-submit -> returns-kserve (v2)", f"{k['served_images_per_s']:.0f} photos/s"),
             ("naive: returns-kserve, one photo per request", f"{k['naive_images_per_s']:.0f} photos/s"),
             ("returns-kserve served / raw, / naive, / TorchServe",
              f"{k['served_over_raw']:.2f}, {k['served_over_naive']:.1f}x, {k['served_over_torchserve']:.2f}"),
             ("returns-kserve latency c=1 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**k["latency_ms"]["concurrency_1"])),
             ("returns-kserve latency c=8 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**k["latency_ms"]["concurrency_8"])),
             ("peak RSS returns-kserve", f"{k['peak_rss_mb']:.0f} MB")]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(description="Benchmark served vs raw vs naive throughput, latency and memory.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-root", default=d.model_root)
    p.add_argument("--model-dir", default=d.model_dir, help="trained model, to build archives with other batch settings")
    p.add_argument("--n", type=int, default=d.n, help="photos in the served and raw runs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="photos per request from returns-submit")
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the throughput sweep and its plot")
    p.add_argument("--tiny", action="store_true", help="a few photos of each, to check that the benchmark works")
    p.add_argument("--output", default=d.output)
    args = p.parse_args(argv)
    if args.tiny:
        cfg = BenchConfig.tiny(args.output)
        cfg.model_root, cfg.model_dir = args.model_root, args.model_dir
    else:
        cfg = BenchConfig(model_root=args.model_root, model_dir=args.model_dir, n=args.n, batch_size=args.batch_size,
                          concurrency=args.concurrency, sweep=args.sweep, output=args.output)
    results = run(cfg)
    print(table(results))
    print(f"\nwritten: {cfg.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
