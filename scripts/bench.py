"""`make bench`: how close the served pipeline comes to the model's raw speed, side by side in one run.

Measures on this machine, in this order: the raw forward pass on decoded tensors and the same with PNG
decoding, in one process with every core, each on the eager model and on the optimised CPU paths
(ONNX Runtime on the float graph, the int8 graph in its own runtime); what the wire format
costs (base64 JSON against raw bytes); what a 12-megapixel phone JPEG costs to decode; `returns-submit` end to end against a local TorchServe on the
real archive; a naive set-up (TorchServe batch size 1, one photo per HTTP request, timed after a
warm-up of ``warmup_n`` requests); single-photo
latency; memory; a sweep of TorchServe batch size x photos per request. Every figure is measured
``runs`` times (3 by default) and reported as the median, with min and max beside it: the machine is
shared, so one number alone says little. Then the served, naive and latency measurements
against the KServe predictor (`returns-kserve`, once each) on the same archive, at the same photos per request
and concurrency (`returns-submit --api v2`). Writes bench/results.json, bench/throughput.png and a table.

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
from scripts.machine import machine
from scripts.localserve import LocalTorchServe, free_port
from handler.serve_config import ServeConfig
from returns_model.names import (MANIFEST_FILE, MAR_FILE, MODEL_NAME, MODEL_STORE, RUN_METADATA_FILE, WEIGHTS_FILE,
                                 run_folder)
from returns_submit.config import SubmitConfig
from training.archive import build_archive
from training.data import DEFAULT_FASHION_MNIST_DIR, read_idx
from returns_model.fileio import write_bytes, write_json

PRED = f"/predictions/{MODEL_NAME}"
KSERVE_PRED = f"/v1/models/{MODEL_NAME}:predict"  # KServe's v1 REST takes JSON: {"instances": [{"b64": ...}]}
BENCH_RUN_ID = "bench"  # the submitter's run id in each benchmark run


class LocalPredictor:
    """`returns-kserve` on free loopback ports on a model root, for as long as the `with` block runs."""

    def __init__(self, model_root: Path, log: Path, extra_args: list[str] | None = None) -> None:
        self.model_root, self.log = Path(model_root), Path(log)
        self.extra_args = list(extra_args or [])
        self.http_port, self.grpc_port = free_port(), free_port()
        self.inference_url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalPredictor":
        cmd = [sys.executable, "-m", "handler.kserve_predictor", "--model_dir", str(self.model_root),
               "--model_name", MODEL_NAME, "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port),
               *self.extra_args]
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
    batch_size: int = SubmitConfig.batch_size  # photos per request sent by returns-submit (its default)
    concurrency: int = SubmitConfig.concurrency  # requests in flight from returns-submit
    raw_n: int = 2000  # photos per raw run (each of 4 raw figures x runs; the eager path is slow on a busy host)
    naive_n: int = 2000
    naive_concurrency: int = 4
    # requests sent to a fresh server before its one-photo-per-request figures are timed: TorchServe's
    # Java frontend compiles its hot paths over the first few thousand requests (measured on 2 cores:
    # 360, 443, 482, 506, 484, 501 photos/s in six back-to-back naive runs of 2,000 on one server)
    warmup_n: int = 4000
    latency_n: int = 300
    sweep_n: int = 2000
    sweep: bool = True
    sweep_ts_batches: tuple[int, ...] = (1, 4)
    sweep_per_request: tuple[int, ...] = (64, 128, 256)
    runs: int = 3  # repeats of every figure: median, min, max
    output: str = "bench/results.json"

    @classmethod
    def tiny(cls, output: str) -> "BenchConfig":
        return cls(n=200, raw_n=200, naive_n=100, latency_n=20, warmup_n=50, sweep=False, output=output)


def spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    """Median, min and max of repeated runs (and the runs themselves)."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


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


RAW_PREFIXES = {"eager": "raw", "onnx": "raw_onnx", "onnx-int8": "raw_int8"}


def serving_path(clf: Classifier) -> dict[str, Any]:
    """What a Classifier serves on this machine: its forward pass, rule and runtime, and why not the int8
    rule where that was asked for and does not serve here."""
    return {"backend": clf.backend, "rule": clf.rule.name, "runtime": clf.rule.runtime, "fallback": clf.fallback}


def raw_rates(model_dir: Path, pngs: list[bytes], batch: int, threads: int,
              runs: int) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Forward pass alone, and decode + forward, in one process with ``threads`` threads, on the eager
    model and on the optimised CPU paths; runs are interleaved so all see the same host load. Also, per
    asked-for backend, what it serves here (``serving_path``): on a CPU where the int8 rule does not
    hold, ``raw_int8_*`` measure the float graph it falls back to, and the second dict says so."""
    clfs = {b: Classifier(model_dir, threads=threads, cpu_backend=b) for b in RAW_PREFIXES}
    decoded = clfs["eager"].decode(pngs).pixels
    rates: dict[str, list[float]] = {}
    for _ in range(runs):
        for backend, clf in clfs.items():
            prefix = RAW_PREFIXES[backend]
            for name, fn, items in ((f"{prefix}_images_per_s", clf.probabilities, decoded),
                                    (f"{prefix}_decode_images_per_s", clf.classify, pngs)):
                rates.setdefault(name, []).append(passes_per_second(fn, items, batch))
    return {k: spread(v) for k, v in rates.items()}, {b: serving_path(c) for b, c in clfs.items()}


def passes_per_second(fn, items: list, batch: int, sync=lambda: None) -> float:
    """Items per second of ``fn`` over ``items`` in passes of ``batch``, after one warm-up pass;
    ``sync`` waits for queued device work (a GPU) before each clock reading."""
    fn(items[:batch])
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        fn(items[i:i + batch])
    sync()
    return len(items) / (time.perf_counter() - t0)


def phone_photo_costs(runs: int, n: int = 10) -> dict[str, Any]:
    """Milliseconds to turn one 12-megapixel JPEG (4032x3024, a phone camera's size; scikit-learn's
    sample photo resized) into the model input, one core: as served (scaled decoding, see
    ``returns_model.preprocess.decode_image``) and with every pixel decoded first."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    from returns_model.meta import PreprocessSpec
    from returns_model.preprocess import bytes_to_uint8, decode_image, image_to_uint8

    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[1]).resize((4032, 3024)).save(buf, "JPEG", quality=90)
    data, spec = buf.getvalue(), PreprocessSpec()
    ways = {"served_ms": lambda one: bytes_to_uint8(one[0], spec),
            "full_decode_ms": lambda one: image_to_uint8(decode_image(one[0]), spec)}
    out: dict[str, Any] = {"photo": "4032x3024 JPEG", "bytes": len(data)}
    for name, fn in ways.items():  # passes of one photo, after a warm-up pass, as the raw figures
        out[name] = spread([1000 / passes_per_second(fn, [data] * n, 1) for _ in range(runs)], 2)
    return out


def wire_costs(pngs: list[bytes], per_request: int, runs: int) -> dict[str, Any]:
    """Microseconds per photo that the JSON format adds over raw bytes, both ends (one core, in-process):
    the submitter's base64 + json.dumps and the handler's json.loads + base64 decode."""
    import base64

    from handler.payload import parse_request

    per_request = min(per_request, len(pngs))
    batches = [pngs[i:i + per_request] for i in range(0, len(pngs) - per_request + 1, per_request)]
    encode, parse = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        bodies = [json.dumps({"instances": [{"b64": base64.b64encode(p).decode("ascii")} for p in b]}).encode()
                  for b in batches]
        t1 = time.perf_counter()
        for body in bodies:
            parse_request({"body": body}, 10_000)
        t2 = time.perf_counter()
        n = len(batches) * per_request
        encode.append((t1 - t0) / n * 1e6)
        parse.append((t2 - t1) / n * 1e6)
    raw_bytes = sum(len(p) for b in batches for p in b)
    return {"photos_per_request": per_request, "json_encode_us_per_photo": spread(encode, 2),
            "json_parse_us_per_photo": spread(parse, 2),
            "json_bytes_over_raw": round(sum(len(b) for b in bodies) / raw_bytes, 3)}


def run_submitter(server: LocalTorchServe | LocalPredictor, inbox: Path, out: Path, batch: int, concurrency: int,
                  api: str = "predictions") -> dict[str, Any]:
    """returns-submit as its own process: wall time, its peak RSS and its run metadata."""
    cmd = [sys.executable, "-m", "returns_submit.cli", "--inbox", str(inbox), "--output", str(out), "--endpoint",
           server.inference_url, "--api", api, "--batch-size", str(batch), "--concurrency", str(concurrency),
           "--run-id", BENCH_RUN_ID, "--progress", "log", "--log-level", "WARNING"]
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
    meta = json.loads((out / run_folder(BENCH_RUN_ID) / RUN_METADATA_FILE).read_text())
    return {"wall_s": wall, "peak_rss_mb": peak, "metadata": meta}


def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for process {pid} (exited?)")


def rss_mb(pid: int) -> float:
    return peak_rss_mb(pid, "VmRSS")


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


def warm_up(url: str, pngs: list[bytes], cfg: BenchConfig, as_json: bool = False) -> None:
    """``cfg.warmup_n`` single-photo requests, untimed, so a fresh server is measured in its steady state
    (as the raw figures are, after a warm-up pass) rather than while it is still warming up."""
    cycled = [pngs[i % len(pngs)] for i in range(cfg.warmup_n)]
    one_photo_per_request(url, cycled, cfg.naive_concurrency, as_json=as_json)


def percentiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 2), "p95": round(q[94], 2), "p99": round(q[98], 2)}


def serve_with(model_dir: Path, root: Path, cfg: ServeConfig) -> Path:
    build_archive(model_dir, root, cfg)
    return root


def environment(threads: int, cfg: BenchConfig, serve: dict[str, Any], backend: str) -> dict[str, Any]:
    from importlib import metadata

    return {**machine(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "worker_threads": threads, "submit_batch_size": cfg.batch_size,
            "submit_concurrency": cfg.concurrency, "naive_warmup_requests": cfg.warmup_n, "torchserve_batch": serve,
            "cpu_backend": backend, "python": platform.python_version(),
            "torch": torch.__version__, "torchserve": metadata.version("torchserve"),
            "onnxruntime": metadata.version("onnxruntime"), "openvino": metadata.version("openvino"),
            "kserve": metadata.version("kserve")}


def plot(r: dict[str, Any], path: Path) -> None:
    """Left: each throughput figure's median with its min-max range; right: the sweep, when run."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [("raw_images_per_s", "raw eager"), ("raw_decode_images_per_s", "raw eager\n+decode"),
             ("raw_onnx_images_per_s", "raw onnx"), ("raw_onnx_decode_images_per_s", "raw onnx\n+decode"),
             ("raw_int8_images_per_s", "raw int8"), ("raw_int8_decode_images_per_s", "raw int8\n+decode"),
             ("served_images_per_s", "served"), ("naive_images_per_s", "naive")]
    sp = r["spread"]
    med = [sp[k]["median"] for k, _ in names]
    err = [[m - sp[k]["min"] for m, (k, _) in zip(med, names)], [sp[k]["max"] - m for m, (k, _) in zip(med, names)]]
    ax.bar([label for _, label in names], med, yerr=err, capsize=4,
           color=["#888", "#888", "#4a7", "#4a7", "#a7a", "#a7a", "#37c", "#c63"])
    ax.tick_params(axis="x", labelsize=8, labelrotation=35)
    ax.set_ylabel("photos / s (median of %d runs, min-max)" % r["runs"])
    ax.set_title("Throughput, load average %s" % r["load_average"]["start"][0])
    ax.grid(alpha=0.3, axis="y")
    for ts_batch in sorted({s["torchserve_batch_size"] for s in r["sweep"]}):
        rows = [s for s in r["sweep"] if s["torchserve_batch_size"] == ts_batch]
        m = [x["images_per_s"]["median"] for x in rows]
        bx.errorbar([x["photos_per_request"] for x in rows], m, capsize=3, marker="o",
                    yerr=[[a - x["images_per_s"]["min"] for a, x in zip(m, rows)],
                          [x["images_per_s"]["max"] - a for a, x in zip(m, rows)]],
                    label=f"TorchServe batch size {ts_batch}")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("photos per request (returns-submit --batch-size)")
    bx.set_ylabel("photos / s, end to end")
    bx.set_title("Served throughput sweep" if r["sweep"] else "(no sweep in this run)")
    bx.grid(alpha=0.3)
    if r["sweep"]:
        bx.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def submitter_runs(server: LocalTorchServe, inbox: Path, out: Path, n: int, cfg: BenchConfig,
                batch: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """returns-submit ``cfg.runs`` times over the same inbox: photos/s spread, and each run's details."""
    done = [run_submitter(server, inbox, out / f"run{i}", batch or cfg.batch_size, cfg.concurrency)
            for i in range(cfg.runs)]
    return spread([n / r["wall_s"] for r in done]), done


def run(cfg: BenchConfig) -> dict[str, Any]:
    model_root = Path(cfg.model_root)
    serve_cfg = json.loads((model_root / MANIFEST_FILE).read_text())["serve_config"]
    threads = max(1, available_cpus() // serve_cfg["workers"])
    loads = {"start": load_average()}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmp = Path(tmp)
        pngs = write_inbox(tmp / "inbox", cfg.n)
        write_inbox(tmp / "inbox4", 4 * cfg.n)
        extracted = tmp / "extracted"
        with zipfile.ZipFile(model_root / MODEL_STORE / MAR_FILE) as z:
            z.extractall(extracted)
        # the largest forward the served path runs: TorchServe merges up to batch_size requests into one call
        forward_batch = cfg.batch_size * min(serve_cfg["batch_size"], cfg.concurrency)
        # raw: the model in one process with every core, as a nightly job without a server would run it
        # (not the worker's share: with several workers that would handicap the baseline)
        raw, paths = raw_rates(extracted, pngs[:cfg.raw_n], forward_batch, available_cpus(), cfg.runs)
        wire = wire_costs(pngs, cfg.batch_size, cfg.runs)
        phone = phone_photo_costs(cfg.runs)
        torch.set_num_threads(available_cpus())

        with LocalTorchServe(model_root, workdir=tmp / "ts") as server:
            worker_rss = []
            served, served_done = submitter_runs(server, tmp / "inbox", tmp / "out1", cfg.n, cfg)
            worker_rss.append(rss_mb(server.worker_pids()[0]))
            served4 = run_submitter(server, tmp / "inbox4", tmp / "out4", cfg.batch_size, cfg.concurrency)
            worker_rss.append(rss_mb(server.worker_pids()[0]))
            lat: dict[str, Any] = {}
            for conc in (1, 8):
                per_run = [percentiles(one_photo_per_request(server.inference_url + PRED, pngs[:cfg.latency_n],
                                                             conc)[1]) for _ in range(cfg.runs)]
                lat[f"concurrency_{conc}"] = {q: statistics.median(r[q] for r in per_run) for q in ("p50", "p95", "p99")}
                lat[f"concurrency_{conc}"]["p99_runs"] = [r["p99"] for r in per_run]
            raw_one = [one_photo_per_request(server.inference_url + PRED, pngs[:cfg.naive_n], cfg.naive_concurrency)[0]
                       for _ in range(cfg.runs)]
            worker_rss.append(rss_mb(server.worker_pids()[0]))
            worker_peak = peak_rss_mb(server.worker_pids()[0])
            frontend_rss = peak_rss_mb(server.frontend_pid)
        loads["after_served"] = load_average()

        naive_root = serve_with(Path(cfg.model_dir) if (Path(cfg.model_dir) / WEIGHTS_FILE).exists() else extracted,
                                tmp / "naive_root", ServeConfig(batch_size=1, max_batch_delay_ms=0))
        with LocalTorchServe(naive_root, workdir=tmp / "ts_naive") as server:
            warm_up(server.inference_url + PRED, pngs, cfg)
            naive = spread([one_photo_per_request(server.inference_url + PRED, pngs[:cfg.naive_n],
                                                  cfg.naive_concurrency)[0] for _ in range(cfg.runs)])

        predictor = bench_predictor(model_root, tmp, pngs, cfg)

        sweep = []
        if cfg.sweep:
            write_inbox(tmp / "sweep_inbox", cfg.sweep_n)
            for ts_batch in cfg.sweep_ts_batches:
                root = serve_with(Path(cfg.model_dir), tmp / f"sweep_{ts_batch}",
                                  ServeConfig(batch_size=ts_batch, max_batch_delay_ms=serve_cfg["max_batch_delay_ms"]))
                with LocalTorchServe(root, workdir=tmp / f"ts_sweep_{ts_batch}") as server:
                    for per_request in cfg.sweep_per_request:
                        rate, _ = submitter_runs(server, tmp / "sweep_inbox", tmp / f"sweep_{ts_batch}_{per_request}",
                                              cfg.sweep_n, cfg, per_request)
                        sweep.append({"torchserve_batch_size": ts_batch, "photos_per_request": per_request,
                                      "images_per_s": rate})
        loads["end"] = load_average()

    wire["served_raw_one_per_request_images_per_s"] = spread(raw_one)
    s_med = served["median"]
    served_backend = serve_cfg.get("cpu_backend", "eager")
    results = {
        "n": cfg.n,
        "runs": cfg.runs,
        **{k: v["median"] for k, v in raw.items()},
        "served_images_per_s": s_med,
        "naive_images_per_s": naive["median"],
        "spread": {**raw, "served_images_per_s": served, "naive_images_per_s": naive},
        "latency_ms": lat,
        "peak_rss_mb": {"torchserve_worker": round(worker_peak, 1), "torchserve_frontend": round(frontend_rss, 1),
                        "submitter_n": round(max(r["peak_rss_mb"] for r in served_done), 1),
                        "submitter_4n": round(served4["peak_rss_mb"], 1)},
        # The worker's resident memory after the served runs, the 4N run, and the latency/raw-bytes runs.
        "worker_rss_mb_over_time": [round(x, 1) for x in worker_rss],
        "served_over_raw": round(s_med / raw["raw_images_per_s"]["median"], 3),
        "served_over_raw_decode": round(s_med / raw["raw_decode_images_per_s"]["median"], 3),
        "served_over_naive": round(s_med / naive["median"], 2),
        "served_over_raw_onnx": round(s_med / raw["raw_onnx_images_per_s"]["median"], 3),
        "served_over_raw_int8": round(s_med / raw["raw_int8_images_per_s"]["median"], 3),
        # the archive's backend as this machine serves it, and served against that path's own raw figure
        "served_rule": paths[served_backend],
        "raw_paths": paths,
        "served_over_raw_served_path_decode": round(
            s_med / raw[f"{RAW_PREFIXES[served_backend]}_decode_images_per_s"]["median"], 3),
        "wire": wire,
        "phone_photo": phone,
        "predictor": {**predictor,
                      "served_over_raw": round(predictor["served_images_per_s"] / raw["raw_images_per_s"]["median"], 3),
                      "served_over_raw_decode": round(predictor["served_images_per_s"]
                                                      / raw["raw_decode_images_per_s"]["median"], 3),
                      "served_over_naive": round(predictor["served_images_per_s"] / predictor["naive_images_per_s"], 2),
                      "served_over_torchserve": round(predictor["served_images_per_s"] / s_med, 2)},
        "sweep": sweep,
        "load_average": loads,
        "environment": environment(threads, cfg, {k: serve_cfg[k] for k in ("batch_size", "max_batch_delay_ms",
                                                                          "workers")},
                                   serve_cfg.get("cpu_backend", "eager")),
        "config": asdict(cfg),
    }
    out = Path(cfg.output)
    write_json(out, results)
    plot(results, out.with_name("throughput.png"))
    return results


def rate_of(s: dict[str, Any]) -> str:
    return "{median:.0f} photos/s ({min:.0f}-{max:.0f})".format(**s)


def bench_predictor(model_root: Path, tmp: Path, pngs: list[bytes], cfg: BenchConfig) -> dict[str, Any]:
    """returns-kserve on the same archive: served (returns-submit --api v2 at the same photos per request
    and concurrency as against TorchServe), naive (one photo per request), latency and peak RSS."""
    with LocalPredictor(model_root, tmp / "predictor.log") as server:
        served = run_submitter(server, tmp / "inbox", tmp / "out_kserve", cfg.batch_size, cfg.concurrency, api="v2")
        url = server.inference_url + KSERVE_PRED
        warm_up(url, pngs, cfg, as_json=True)
        naive_rate, _ = one_photo_per_request(url, pngs[:cfg.naive_n], cfg.naive_concurrency, as_json=True)
        lat = {}
        for conc in (1, 8):
            _, ms = one_photo_per_request(url, pngs[:cfg.latency_n], conc, as_json=True)
            lat[f"concurrency_{conc}"] = percentiles(ms)
        rss = peak_rss_mb(server.proc.pid)
    return {"served_images_per_s": round(cfg.n / served["wall_s"], 1), "naive_images_per_s": round(naive_rate, 1),
            "latency_ms": lat, "peak_rss_mb": round(rss, 1), "api": "v2",
            "single_photo_request": "v1 JSON, one base64 instance"}


def rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """The results as (figure, value) rows: the printed table's and docs/performance.md's."""
    sp = r["spread"]

    def rate(key: str) -> str:
        return "{median:.0f} photos/s ({min:.0f}-{max:.0f})".format(**sp[key])

    rows = [("raw eager forward (decoded tensors)", rate("raw_images_per_s")),
            ("raw eager decode + forward", rate("raw_decode_images_per_s")),
            ("raw onnx forward", rate("raw_onnx_images_per_s")),
            ("raw onnx decode + forward", rate("raw_onnx_decode_images_per_s")),
            ("raw int8 forward (its own review rule)", rate("raw_int8_images_per_s")),
            ("raw int8 decode + forward", rate("raw_int8_decode_images_per_s")),
            ("served: returns-submit -> TorchServe", rate("served_images_per_s")),
            ("naive: batch 1, one photo per request", rate("naive_images_per_s")),
            ("served / raw onnx, / raw int8", f"{r['served_over_raw_onnx']:.2f}, {r['served_over_raw_int8']:.2f}"),
            ("served / raw", f"{r['served_over_raw']:.2f}"),
            ("served / raw+decode", f"{r['served_over_raw_decode']:.2f}"),
            ("served / naive", f"{r['served_over_naive']:.1f}x"),
            ("latency c=1 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**r["latency_ms"]["concurrency_1"])),
            ("latency c=8 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**r["latency_ms"]["concurrency_8"])),
            ("peak RSS worker / frontend", "{torchserve_worker:.0f} / {torchserve_frontend:.0f} MB".format(
                **r["peak_rss_mb"])),
            ("peak RSS submitter N / 4N", "{submitter_n:.0f} / {submitter_4n:.0f} MB".format(**r["peak_rss_mb"])),
            ("worker RSS over the run", " -> ".join(f"{x:.0f}" for x in r["worker_rss_mb_over_time"]) + " MB"),
            ("JSON encode / parse per photo", "{} / {} us".format(r["wire"]["json_encode_us_per_photo"]["median"],
                                                               r["wire"]["json_parse_us_per_photo"]["median"])),
            ("raw bytes, one photo per request", rate_of(r["wire"]["served_raw_one_per_request_images_per_s"])),
            ("12-MP JPEG to model input, as served / full decode", "{} / {} ms".format(
                r["phone_photo"]["served_ms"]["median"], r["phone_photo"]["full_decode_ms"]["median"])),
            ("load average start / end", f"{r['load_average']['start']} / {r['load_average']['end']}")]
    if "served_rule" in r:  # results written before the rule was recorded have neither
        rows[8:8] = [("served rule", "{rule} on {runtime}".format(**r["served_rule"])
                      + (f" ({r['served_rule']['fallback']})" if r["served_rule"]["fallback"] else "")),
                     ("served / the served path's raw decode + forward",
                      f"{r['served_over_raw_served_path_decode']:.2f}")]
    k = r["predictor"]
    rows += [("served: returns-submit -> returns-kserve (v2)", f"{k['served_images_per_s']:.0f} photos/s"),
             ("naive: returns-kserve, one photo per request", f"{k['naive_images_per_s']:.0f} photos/s"),
             ("returns-kserve served / raw, / naive, / TorchServe",
              f"{k['served_over_raw']:.2f}, {k['served_over_naive']:.1f}x, {k['served_over_torchserve']:.2f}"),
             ("returns-kserve latency c=1 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**k["latency_ms"]["concurrency_1"])),
             ("returns-kserve latency c=8 p50/p95/p99", "{p50}/{p95}/{p99} ms".format(**k["latency_ms"]["concurrency_8"])),
             ("peak RSS returns-kserve", f"{k['peak_rss_mb']:.0f} MB")]
    return rows


def table(r: dict[str, Any]) -> str:
    lines = rows(r)
    width = max(len(a) for a, _ in lines)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in lines)


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
    p.add_argument("--runs", type=int, default=d.runs, help="repeats of every figure (median, min, max)")
    p.add_argument("--sweep-n", type=int, default=d.sweep_n, help="photos per sweep point")
    p.add_argument("--raw-n", type=int, default=d.raw_n, help="photos per raw (in-process) run")
    p.add_argument("--naive-n", type=int, default=d.naive_n, help="photos per one-photo-per-request run")
    p.add_argument("--warmup-n", type=int, default=d.warmup_n,
                   help="untimed single-photo requests to a fresh server before its one-photo-per-request runs")
    p.add_argument("--tiny", action="store_true", help="a few photos of each, to check that the benchmark works")
    p.add_argument("--output", default=d.output)
    args = p.parse_args(argv)
    if args.tiny:
        cfg = BenchConfig.tiny(args.output)
        cfg.model_root, cfg.model_dir = args.model_root, args.model_dir
    else:
        cfg = BenchConfig(model_root=args.model_root, model_dir=args.model_dir, n=args.n, batch_size=args.batch_size,
                          concurrency=args.concurrency, sweep=args.sweep, output=args.output, runs=args.runs,
                          sweep_n=args.sweep_n, raw_n=args.raw_n, naive_n=args.naive_n,
                          warmup_n=args.warmup_n)
    results = run(cfg)
    print(table(results))
    print(f"\nwritten: {cfg.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
