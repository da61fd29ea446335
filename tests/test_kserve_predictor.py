"""The KServe predictor (`returns-kserve`) as a real process on loopback, called with KServe's own
clients (v1 and v2 REST, v2 gRPC) and the nightly submitter, on real Fashion-MNIST photos.

Uses the session fixtures of tests/conftest.py: `model_root` (the archive `make archive` builds),
`classifier` (the same core in this process: the reference answers) and `fmnist_png`.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import requests
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

from tests.submit_fixtures import assert_exactly_once, read_jsonl, run_submit, write_photos

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL = "returns-classifier"
N = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Predictor:
    """A `returns-kserve` process on free loopback ports; always stopped by `stop()`."""

    def __init__(self, model_root: Path, log: Path) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log = log
        cmd = [str(Path(sys.executable).parent / "returns-kserve"), "--model_dir", str(model_root),
               "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port),
               "--metrics_port", str(self.metrics_port)]
        self.proc = subprocess.Popen(cmd, cwd=log.parent, env=os.environ,
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"returns-kserve exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/v2/models/{MODEL}/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"returns-kserve not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def healthy(self) -> bool:
        return (self.proc.poll() is None
                and requests.get(f"{self.url}/v2/health/live", timeout=5).status_code == 200
                and requests.get(f"{self.url}/v1/models/{MODEL}", timeout=5).json()["ready"] is True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def predictor(model_root, tmp_path_factory):
    server = Predictor(model_root, tmp_path_factory.mktemp("kserve") / "predictor.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def photos(fmnist_png) -> list[bytes]:
    return [fmnist_png(i) for i in range(N)]


@pytest.fixture(scope="module")
def expected(model_root, photos, tmp_path_factory) -> list[dict]:
    """The in-process core's answers on the same verified archive, with the same knobs (its CPU
    backend included), as the predictor builds it; model_sha256 aside (it names the folder)."""
    from handler.core import Classifier
    from handler.kserve_predictor import read_knobs, resolve_model_dir

    folder = resolve_model_dir(model_root, tmp_path_factory.mktemp("extracted"))
    core = Classifier(folder, warmup=False, cpu_backend=read_knobs(folder).cpu_backend)
    return [same(r) for r in core.classify(photos)]


@pytest.fixture(scope="module")
def archive_sha(model_root) -> str:
    return json.loads((model_root / "artifact_manifest.json").read_text())["archive_content_sha256"]


def same(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "model_sha256"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def rest_infer(url: str, protocol: str, data, timeout: float = 60):
    async def call():
        client = InferenceRESTClient(RESTConfig(protocol=protocol, retries=0, timeout=timeout))
        try:
            return await client.infer(url, data, model_name=MODEL)
        finally:
            await client.close()
    return asyncio.run(call())


def grpc_infer(url: str, request: InferRequest):
    async def call():
        client = InferenceGRPCClient(url, retries=0, timeout=60)
        try:
            return await client.infer(request)
        finally:
            await client.close()
    return asyncio.run(call())


def v2_request(items: list, shape: list[int] | None = None) -> InferRequest:
    return InferRequest(MODEL, [InferInput("photos", shape or [len(items)], "BYTES", items)])


def outputs(response) -> dict[str, list]:
    return {o.name: o.as_numpy().tolist() for o in response.outputs}


def test_v1_rest_equals_the_core(predictor, photos, expected, archive_sha):
    answer = rest_infer(predictor.url, "v1", {"instances": [{"b64": b64(p)} for p in photos]})
    assert [same(r) for r in answer["predictions"]] == expected  # labels, confidences, top-k, exactly
    assert {r["model_sha256"] for r in answer["predictions"]} == {archive_sha}  # the verified .mar's


def test_requests_classified_side_by_side_answer_as_one_at_a_time(predictor, photos, expected):
    """The lanes (classifications side by side on the graph path) change nothing in the answers:
    many requests in flight at once, each answered exactly as the core answers those photos."""
    from concurrent.futures import ThreadPoolExecutor

    from handler.core import available_cpus

    lanes = min(2, available_cpus())  # the archive's 2 workers
    assert f"(onnx-int8, {lanes} lanes of {max(1, available_cpus() // lanes)} threads)" in predictor.log.read_text()
    chunks = [list(range(i, min(i + 32, len(photos)))) for i in range(0, len(photos), 32)] * 3

    def send(idx: list[int]) -> list[dict]:
        body = {"instances": [{"b64": b64(photos[i])} for i in idx]}
        r = requests.post(f"{predictor.url}/v1/models/{MODEL}:predict", json=body, timeout=120)
        r.raise_for_status()
        return [same(x) for x in r.json()["predictions"]]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, chunks))
    for idx, got in zip(chunks, answers):
        assert got == [expected[i] for i in idx]


def test_lanes_are_chosen_by_path_and_checked(release_model_dir, monkeypatch):
    """On the graph path as many lanes as the archive has workers (a plain folder: 2), CPUs shared out,
    or as asked; one on the CPU eager path (one pass with every thread), whatever was asked; a negative
    count is refused."""
    import torch

    from handler import kserve_predictor as kp
    from handler.serve_config import HandlerKnobs

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the test process keeps its threads
    monkeypatch.setattr(kp, "available_cpus", lambda: 4)
    model = kp.ReturnsClassifierModel(None, release_model_dir, "cpu")
    assert model.lanes == 2 and model.core._onnx.threads == 2
    assert kp.ReturnsClassifierModel(None, release_model_dir, "cpu", lanes=4).lanes == 4
    monkeypatch.setattr(kp, "available_cpus", lambda: 1)
    assert kp.ReturnsClassifierModel(None, release_model_dir, "cpu").lanes == 1
    monkeypatch.setattr(kp, "read_knobs", lambda _: HandlerKnobs(cpu_backend="eager"))
    assert kp.ReturnsClassifierModel(None, release_model_dir, "cpu", lanes=3).lanes == 1
    with pytest.raises(ValueError, match="--lanes must be 0"):
        kp.ReturnsClassifierModel(None, release_model_dir, "cpu", lanes=-1)
    # the worker count comes from the archive's model-config.yaml
    assert HandlerKnobs.from_model_yaml({"minWorkers": 3}).workers == 3
    assert HandlerKnobs.from_model_yaml({"minWorkers": "x"}).workers == HandlerKnobs.from_model_yaml({}).workers == 2


def test_v2_rest_equals_the_core(predictor, photos, expected, archive_sha):
    response = rest_infer(predictor.url, "v2", v2_request([b64(p) for p in photos]))
    out = outputs(response)
    assert [same(json.loads(r)) for r in out["result"]] == expected
    assert {json.loads(r)["model_sha256"] for r in out["result"]} == {archive_sha}
    assert [x.decode() if isinstance(x, bytes) else x for x in out["label"]] == [e["label"] for e in expected]
    assert out["confidence"] == [float(np.float32(e["confidence"])) for e in expected]  # FP32 on the wire
    assert out["needs_review"] == [e["needs_review"] for e in expected]


@pytest.mark.parametrize("binary", [False, True], ids=["bytes_contents", "raw_input_contents"])
def test_v2_grpc_equals_the_core(predictor, photos, expected, binary):
    if binary:
        tensor = InferInput("photos", [N], "BYTES")
        tensor.set_data_from_numpy(np.array(photos, dtype=np.object_), binary_data=True)
        request = InferRequest(MODEL, [tensor])
    else:
        request = v2_request(list(photos))
    out = outputs(grpc_infer(predictor.grpc_url, request))
    assert [same(json.loads(r)) for r in out["result"]] == expected
    assert out["confidence"] == [float(np.float32(e["confidence"])) for e in expected]


def test_bad_photos_get_their_own_errors(predictor, photos):
    items = [b64(photos[0]), b64(b""), b64(b"GIF89a"), b64(photos[1][:60]), "@@not base64@@"]
    out = outputs(rest_infer(predictor.url, "v2", v2_request(items)))
    results = [json.loads(r) for r in out["result"]]
    assert "error" not in results[0]
    assert [r["error"]["code"] for r in results[1:]] == ["empty", "not_an_image", "corrupt", "bad_base64"]
    assert out["needs_review"][1:] == [True] * 4 and out["confidence"][1:] == [0.0] * 4
    grpc_out = outputs(grpc_infer(predictor.grpc_url, v2_request([photos[0], b"\x00" * 64])))
    assert json.loads(grpc_out["result"][1])["error"]["code"] == "not_an_image"


def test_no_valid_photo_is_400_and_invalid_argument(predictor):
    r = requests.post(f"{predictor.url}/v1/models/{MODEL}:predict", json={"instances": ["@@", {"x": 1}]}, timeout=30)
    assert r.status_code == 400
    assert [p["error"]["code"] for p in r.json()["predictions"]] == ["bad_base64", "bad_instance"]
    with pytest.raises(httpx.HTTPStatusError) as e:
        rest_infer(predictor.url, "v2", v2_request([b64(b"not a photo")]))
    assert e.value.response.status_code == 400
    assert e.value.response.json()["result"][0]["error"]["code"] == "not_an_image"
    with pytest.raises(grpc.RpcError) as g:
        grpc_infer(predictor.grpc_url, v2_request([b"", b"GIF89a"]))
    assert g.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no valid photo" in g.value.details()
    assert predictor.healthy()


def test_garbage_and_oversized_requests_are_4xx_and_the_server_stays_healthy(predictor, photos):
    v1, v2 = f"{predictor.url}/v1/models/{MODEL}:predict", f"{predictor.url}/v2/models/{MODEL}/infer"
    json_headers = {"Content-Type": "application/json"}
    cases = [
        requests.post(v1, data=b'{"instances": [', headers=json_headers, timeout=30),
        requests.post(v1, json={"instances": "x"}, timeout=30),
        requests.post(v1, json={"instances": [b64(photos[0])] * 257}, timeout=60),
        requests.post(v1, data=photos[0], headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30),
        requests.post(v2, data=b"\xff\xfe garbage", headers=json_headers, timeout=30),
        requests.post(v2, json={"inputs": "x"}, timeout=30),
        requests.post(v2, json={"inputs": [{"name": "p", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, timeout=30),
        requests.post(v2, json={"inputs": [{"name": "p", "shape": [257], "datatype": "BYTES",
                                            "data": [b64(photos[0])] * 257}]}, timeout=60),
        requests.post(v2, json={"inputs": [{"name": "p", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}, timeout=30),
        requests.post(v2, json={"inputs": [{"name": "p", "shape": [0], "datatype": "BYTES", "data": []}]}, timeout=30),
    ]
    assert [r.status_code // 100 for r in cases] == [4] * len(cases), [(r.status_code, r.text[:200]) for r in cases]
    assert cases[2].json()["error"]["code"] == "too_many_instances"
    assert "too_many_instances: 257 photos in one request; the limit is 256" in cases[7].json()["error"]
    assert "has shape [0]; a request carries at least one photo" in cases[9].json()["error"]
    with pytest.raises(grpc.RpcError) as g:
        grpc_infer(predictor.grpc_url, v2_request([photos[0]] * 257))
    assert g.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert predictor.healthy()
    assert "error" not in rest_infer(predictor.url, "v1", {"instances": [b64(photos[0])]})["predictions"][0]


def test_metadata_health_and_metrics(predictor, photos):
    meta = requests.get(f"{predictor.url}/v2/models/{MODEL}", timeout=10).json()
    assert meta["name"] == MODEL and [i["datatype"] for i in meta["inputs"]] == ["BYTES"]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == \
        {"label": "BYTES", "confidence": "FP32", "needs_review": "BOOL", "result": "BYTES"}
    assert requests.get(f"{predictor.url}/v2/health/ready", timeout=10).json()["ready"] is True
    # one photo and one bad instance, so every gauge has a value even when this test runs alone
    requests.post(f"{predictor.url}/v1/models/{MODEL}:predict", json={"instances": [b64(photos[0]), "@@"]}, timeout=30)
    text = requests.get(f"{predictor.url}/metrics", timeout=10).text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("returns_") and f'model_name="{MODEL}"' in line}
    assert values["returns_images_total"] >= 1 and values["returns_rejected_images_total"] >= 1
    assert "returns_low_confidence_total" in values and 0 < values["returns_average_confidence"] <= 1
    assert "request_predict_seconds_count" in text  # KServe's own metrics are there too
    # which rule answers: the one the answers name, and whether the int8 rule asked for fell back here
    answer = requests.post(f"{predictor.url}/v1/models/{MODEL}:predict", json={"instances": [b64(photos[0])]},
                           timeout=30).json()["predictions"][0]
    rule_lines = [line for line in text.splitlines() if line.startswith("returns_served_rule{")
                  and f'model_name="{MODEL}"' in line]
    assert len(rule_lines) == 1 and rule_lines[0].endswith(" 1.0")
    assert f'rule="{answer["rule"]}"' in rule_lines[0] and f'runtime="{answer["runtime"]}"' in rule_lines[0]
    # The chart scrapes the separate metrics port (a NetworkPolicy cannot tell /metrics from inference).
    separate = requests.get(f"http://127.0.0.1:{predictor.metrics_port}/metrics", timeout=10).text
    assert "request_predict_seconds_count" in separate and "returns_images_total" in separate


def test_nightly_run_with_api_v2_is_exactly_once(predictor, tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox / "a", 40)
    write_photos(inbox / "b", 40, start=40)
    (inbox / "broken").mkdir()
    (inbox / "broken" / "text.jpg").write_text("a shipping label, not a photo")
    (inbox / "broken" / "empty.png").write_bytes(b"")
    expected_paths = {str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    r = run_submit("--inbox", str(inbox), "--output", str(out), "--endpoint", predictor.url, "--api", "v2",
                   "--run-id", "v2", "--batch-size", "16", "--concurrency", "2", "--progress", "log",
                   "--connect-deadline", "30", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "run_v2"
    assert_exactly_once(run, expected_paths)
    preds, rejected = read_jsonl(run / "predictions.jsonl"), read_jsonl(run / "rejected.jsonl")
    assert len(preds) == 80 and len(rejected) == 2
    assert {x["code"] for x in rejected} <= {"empty", "not_an_image"}
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["counts"]["classified"] == 80 and (run / "_SUCCESS").exists()


def test_device_choice_is_checked_before_the_model_loads(release_model_dir, monkeypatch, caplog):
    """`--device cuda` without a GPU is a clear refusal (exit 2), never a silent CPU server that the
    platform team believes is on its GPU (the choice itself: tests/test_device.py)."""
    import torch
    from handler.kserve_predictor import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--model_dir", str(release_model_dir), "--device", "cuda"]) == 2
    assert "--device cuda was asked for, but CUDA sees no GPU (available: cpu)" in caplog.text


def test_a_predictor_with_a_lower_photo_limit_gets_smaller_requests_from_the_submitter(model_root, tmp_path):
    """A predictor built with `max_instances: 5`: the submitter's batches of 16 are refused with the
    limit stated in the same words on both ("the limit is 5"), and both nights finish with requests of 5."""
    import yaml
    from handler.kserve_predictor import resolve_model_dir
    from returns_model.names import MODEL_CONFIG_FILE as MODEL_CONFIG

    folder = resolve_model_dir(model_root, tmp_path / "model")
    knobs = yaml.safe_load((folder / MODEL_CONFIG).read_text())
    knobs["handler"]["max_instances"] = 5
    (folder / MODEL_CONFIG).write_text(yaml.safe_dump(knobs))
    server = Predictor(folder, tmp_path / "predictor.log")
    try:
        server.wait_ready()
        for api in ("v2", "v1"):
            inbox = tmp_path / f"inbox_{api}"
            write_photos(inbox, 23)
            r = run_submit("--inbox", str(inbox), "--output", str(tmp_path / "out"), "--endpoint", server.url,
                           "--api", api, "--run-id", api, "--batch-size", "16", "--concurrency", "2",
                           "--progress", "log", "--connect-deadline", "30", timeout=240)
            assert r.returncode == 0, r.stderr[-3000:]
            run = tmp_path / "out" / f"run_{api}"
            assert len(read_jsonl(run / "predictions.jsonl")) == 23 and not read_jsonl(run / "rejected.jsonl")
            assert json.loads((run / "run_metadata.json").read_text())["invocation"]["batch_size_used"] == 5
            assert "the limit is 5" in r.stderr and "sending smaller requests" in r.stderr
    finally:
        server.stop()


def test_the_start_up_line_names_the_device_and_the_model(predictor):
    """The pod's log says where the network runs and which model it serves (it was never printed:
    the line was logged before any handler existed)."""
    lines = [line for line in predictor.log.read_text().splitlines() if " ready on " in line]
    assert len(lines) == 1, predictor.log.read_text()[:2000]
    assert "returns-classifier ready on cpu (onnx-int8, " in lines[0] and " INFO " in lines[0]
    assert re.search(r"sha256 [0-9a-f]{64}", lines[0])
