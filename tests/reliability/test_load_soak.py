"""A bounded soak on loopback: mixed single- and multi-photo requests at concurrency 32."""
import base64
import json
import os
import random
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SOAK_SECONDS = float(os.environ.get("RETURNS_SOAK_SECONDS", "45"))
CONCURRENCY = 32
SERVER_BATCH = 4
# `make soak` sets this to bench/soak.json: the figures of docs/reliability.md are generated from it.
RECORD = os.environ.get("RETURNS_SOAK_RECORD")


def record(path, report, url, photo):
    """The soak's figures as a self-describing artifact: the machine, the model and the rule that served."""
    from returns_model.fileio import write_json
    from scripts.machine import machine

    answer = requests.post(url, data=photo, timeout=60).json()
    run = {"date": time.strftime("%Y-%m-%d", time.gmtime()), **machine(), "model_version": answer["model_version"],
           "rule": answer["rule"], "runtime": answer["runtime"], "server_batch": SERVER_BATCH,
           "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    write_json(path, {"run": run, **report})


def rss_mb(pid):
    return psutil.Process(pid).memory_info().rss / 2**20


@pytest.fixture(scope="module")
def torchserve(release_model_dir, tmp_path_factory):
    """The shipped CPU path (default knobs: the int8 graph) with server batching on (up to 4 requests
    per handler call), so the soak runs what a cluster runs, on the handler's harder path."""
    from handler.serve_config import ServeConfig
    from scripts.localserve import LocalTorchServe
    from training.archive import build_archive

    root = tmp_path_factory.mktemp("model_root_soak")
    build_archive(release_model_dir, root, ServeConfig(batch_size=SERVER_BATCH))
    with LocalTorchServe(root, workdir=tmp_path_factory.mktemp("torchserve_soak")) as server:
        yield server


def test_soak_mixed_requests(torchserve, fmnist_png, capsys):
    photos = [fmnist_png(i) for i in range(300)]
    b64 = [base64.b64encode(p).decode() for p in photos]
    url = torchserve.inference_url + "/predictions/returns-classifier"
    workers_before = torchserve.worker_pids()
    frontend = torchserve.frontend_pid
    mem_before = {"frontend": rss_mb(frontend), "worker": rss_mb(workers_before[0])}
    stop_at = time.monotonic() + SOAK_SECONDS
    counts = {"requests": 0, "photos": 0, "2xx": 0, "4xx": 0, "5xx": 0, "errors": 0}
    lock = threading.Lock()

    def client(seed):
        rng = random.Random(seed)
        session = requests.Session()
        while time.monotonic() < stop_at:
            if rng.random() < 0.5:
                n, resp = 1, session.post(url, data=photos[rng.randrange(300)], timeout=60)
            else:
                n = rng.randint(2, 32)
                body = {"instances": [b64[rng.randrange(300)] for _ in range(n)]}
                resp = session.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"},
                                    timeout=60)
            with lock:
                counts["requests"] += 1
                counts["photos"] += n
                counts[f"{resp.status_code // 100}xx"] = counts.get(f"{resp.status_code // 100}xx", 0) + 1

    samples: list[tuple[float, float]] = []  # (seconds since start, worker RSS in MB), every tenth of the soak

    def sample():
        while time.monotonic() < stop_at:
            samples.append((round(time.monotonic() - t0, 1), round(rss_mb(workers_before[0]), 1)))
            time.sleep(SOAK_SECONDS / 10)

    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY + 1) as pool:
        futures = [pool.submit(client, s) for s in range(CONCURRENCY)] + [pool.submit(sample)]
        for f in futures:
            f.result()
    elapsed = time.monotonic() - t0
    # "flat": after the first tenth (warm-up: buffers and caches fill), the worker grows by less than
    # 64 MB over the rest of the soak
    settled = [mb for t, mb in samples if t >= SOAK_SECONDS / 10]
    growth = (max(settled) - settled[0]) if settled else 0.0
    workers_after = torchserve.worker_pids()
    mem_after = {"frontend": rss_mb(frontend), "worker": rss_mb(workers_after[0])}
    restarts = len(set(workers_after) - set(workers_before))
    report = {"seconds": round(elapsed, 1), "concurrency": CONCURRENCY, **counts, "worker_restarts": restarts, "requests_per_s": round(counts["requests"] / elapsed, 1),
              "photos_per_s": round(counts["photos"] / elapsed, 1),
              "rss_mb_before": {k: round(v) for k, v in mem_before.items()},
              "rss_mb_after": {k: round(v) for k, v in mem_after.items()},
              "worker_rss_mb_samples": samples, "worker_growth_after_warmup_mb": round(growth, 1)}
    with capsys.disabled():
        print("\nsoak:", json.dumps(report))
    if RECORD:
        record(Path(RECORD), report, url, photos[0])
    assert counts["5xx"] == 0 and counts["4xx"] == 0
    assert counts["requests"] > 100
    assert workers_after == workers_before  # no worker restarted
    assert mem_after["worker"] < mem_before["worker"] + 300 and mem_after["frontend"] < mem_before["frontend"] + 600
    assert len(samples) >= 5 and growth < 64
