"""The handler inside a real TorchServe on loopback, with real Fashion-MNIST images."""
import base64
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from training.data import FASHION_MNIST_CLASSES
from tests.conftest import encode
from tests.test_calibrated_answers import assert_answer

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PRED = "/predictions/returns-classifier"


def b64(data):
    return base64.b64encode(data).decode()


def test_raw_png_and_jpeg(torchserve, fmnist_test, classifier):
    """PNG is lossless, so the served label is the true one; a JPEG (quality 75) can blur a
    pullover into a coat, so its served answer must equal the in-process core's on the same bytes."""
    images, labels = fmnist_test
    for fmt in ("PNG", "JPEG"):
        data = encode(images[1], fmt)
        r = requests.post(torchserve.inference_url + PRED, data=data, timeout=30)
        assert r.status_code == 200, r.text
        body, local = r.json(), classifier.classify([data])[0]
        assert (body["label"], body["needs_review"]) == (local["label"], local["needs_review"])
        assert body["confidence"] == pytest.approx(local["confidence"], abs=1e-4)
        assert 0 < body["confidence"] <= 1 and len(body["model_sha256"]) == 64
        if fmt == "PNG":
            assert body["label"] == FASHION_MNIST_CLASSES[int(labels[1])]


def test_curl_data_binary_default_content_type_gets_a_clear_error(torchserve, fmnist_png):
    r = requests.post(torchserve.inference_url + PRED, data=fmnist_png(2), timeout=30,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type such as image/jpeg" in r.json()["error"]["message"]


def test_multipart_upload(torchserve, fmnist_png, fmnist_test):
    _, labels = fmnist_test
    r = requests.post(torchserve.inference_url + PRED, files={"data": ("x.png", fmnist_png(2), "image/png")}, timeout=30)
    assert r.status_code == 200 and r.json()["class_id"] == int(labels[2])


def test_64_image_json_request_in_order(torchserve, fmnist_png, fmnist_test):
    _, labels = fmnist_test
    body = {"instances": [{"b64": b64(fmnist_png(i))} for i in range(64)]}
    r = requests.post(torchserve.inference_url + PRED, json=body, timeout=60)
    preds = r.json()["predictions"]
    assert r.status_code == 200 and len(preds) == 64
    correct = sum(p["class_id"] == int(labels[i]) for i, p in enumerate(preds))
    assert correct >= 56  # the release model is ~94% accurate


def test_good_and_broken_images_in_one_request(torchserve, fmnist_png, fmnist_test):
    _, labels = fmnist_test
    photos = [fmnist_png(10), b"", b"GIF89a", fmnist_png(11)[:60], fmnist_png(12)]
    body = {"instances": [b64(p) for p in photos] + ["@@not base64@@"]}
    r = requests.post(torchserve.inference_url + PRED, json=body, timeout=30)
    preds = r.json()["predictions"]
    assert r.status_code == 200 and len(preds) == 6
    assert preds[0]["class_id"] == int(labels[10]) and preds[4]["class_id"] == int(labels[12])
    assert [p["error"]["code"] for p in preds[1:4]] == ["empty", "not_an_image", "corrupt"]
    assert preds[5]["error"]["code"] == "bad_base64"


def test_request_with_no_valid_photo_is_400(torchserve):
    r = requests.post(torchserve.inference_url + PRED, data=b"\x00" * 64, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_an_image"
    r = requests.post(torchserve.inference_url + PRED, data=b'{"instances": [', timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_json"


def test_concurrent_requests_are_batched_one_response_each(torchserve, fmnist_png, fmnist_test):
    _, labels = fmnist_test
    log = torchserve.log_dir / "ts_log.log"  # where the worker's metric lines land in Prometheus mode
    before = log.read_text() if log.exists() else ""

    def one(i):
        return i, requests.post(torchserve.inference_url + PRED, data=fmnist_png(100 + i), timeout=60)

    for _ in range(3):  # TorchServe batches concurrent requests; try a few rounds to see it happen
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(16)))
        assert all(r.status_code == 200 for _, r in results)
        assert sum(r.json()["class_id"] == int(labels[100 + i]) for i, r in results) >= 13
        new = log.read_text()[len(before):]
        sizes = [float(v) for v in re.findall(r"ImagesPerBatch\.Count:([\d.]+)", new)]
        if sizes and max(sizes) > 1:
            break
    assert sizes and max(sizes) > 1, f"no request was batched with another: {sizes}"


def test_kserve_v1_path(torchserve, spread_photos, oracle):
    """KServe's v1 path answers like /predictions: each instance shape, each photo its own answer."""
    photos = spread_photos[::4][:6]  # low, middle and high confidence
    shapes = [lambda s: {"image": {"b64": s}}, lambda s: {"b64": s}, lambda s: {"data": s}, lambda s: s]
    body = {"instances": [shapes[i % 4](b64(png)) for i, (_, png) in enumerate(photos)]}
    r = requests.post(torchserve.inference_url + "/v1/models/returns-classifier:predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(photos)
    for result, (want, _) in zip(preds, photos):
        assert_answer(result, want, oracle.class_names, tol=1e-4)


def test_served_answers_equal_model_json_calibration(torchserve, spread_photos, oracle):
    """The real TorchServe's confidences and needs_review equal softmax(logits / T) and the stored
    threshold of model.json, computed without the handler, over the whole confidence range."""
    body = {"instances": [b64(png) for _, png in spread_photos]}
    r = requests.post(torchserve.inference_url + PRED, json=body, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(spread_photos)
    for result, (want, _) in zip(preds, spread_photos):
        assert_answer(result, want, oracle.class_names, tol=1e-4)
    near = sorted(spread_photos, key=lambda p: abs(p[0].confidence - oracle.threshold))[:4]
    assert {want.needs_review for want, _ in near} == {True, False}  # both sides of the threshold
    for want, png in near:  # one photo per request, as raw bytes
        r = requests.post(torchserve.inference_url + PRED, data=png, timeout=30)
        assert r.status_code == 200, r.text
        assert_answer(r.json(), want, oracle.class_names, tol=1e-4)


def metric_values(torchserve) -> dict[str, float]:
    text = requests.get(torchserve.metrics_url + "/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^(\w+)\{ModelName="returns-classifier"[^}]*\}\s+(\S+)$', text, re.M)}


def test_custom_metrics_are_exported_with_the_batchs_values(torchserve, spread_photos, oracle):
    """The gauges describe the last batch and the counters grow by it: checked against a request
    whose photos, rejections and low-confidence count are known from model.json."""
    names = ("ImagesPerBatch", "AverageConfidence", "LowConfidencePerBatch", "RejectedImagesPerBatch",
             "DecodeTimeMs", "ForwardTimeMs", "ImagesTotal", "RejectedImagesTotal", "LowConfidenceTotal",
             "Int8RuleServed", "Int8RuleFallback")
    requests.post(torchserve.inference_url + PRED, data=spread_photos[0][1], timeout=30)  # counters exist
    time.sleep(1.5)
    before = metric_values(torchserve)
    assert set(names) <= set(before), sorted(set(names) - set(before))
    photos = spread_photos[::3][:10]
    body = {"instances": [b64(png) for _, png in photos] + [b64(b"not an image")]}
    answer = requests.post(torchserve.inference_url + PRED, json=body, timeout=30)
    assert answer.status_code == 200
    int8 = answer.json()["predictions"][0]["rule"] == "int8"
    serve_config = json.loads((Path(torchserve.model_root) / "artifact_manifest.json").read_text())["serve_config"]
    asked = serve_config["cpu_backend"] == "onnx-int8"  # this server's archive asks for the float graph
    assert int8 <= asked
    low = sum(want.needs_review for want, _ in photos)
    assert 0 < low < len(photos)
    want = {"ImagesPerBatch": 11, "RejectedImagesPerBatch": 1, "LowConfidencePerBatch": low,
            "ImagesTotal": before["ImagesTotal"] + 11, "RejectedImagesTotal": before["RejectedImagesTotal"] + 1,
            "LowConfidenceTotal": before["LowConfidenceTotal"] + low,
            "Int8RuleServed": float(int8), "Int8RuleFallback": float(asked and not int8)}
    mean_conf = sum(w.confidence for w, _ in photos) / len(photos)
    deadline = time.monotonic() + 20  # the frontend reads the worker's metric lines asynchronously
    while True:
        now = metric_values(torchserve)
        got = {k: now.get(k) for k in want}
        if got == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == want
    assert now["AverageConfidence"] == pytest.approx(mean_conf, abs=2e-4)
    assert now["DecodeTimeMs"] > 0 and now["ForwardTimeMs"] > 0


def test_request_while_model_is_loading(model_root, tmp_path, fmnist_png):
    from scripts.localserve import LocalTorchServe

    server = LocalTorchServe(model_root, workdir=tmp_path)
    try:
        server.start(wait=False)
        early = None
        for _ in range(200):  # the first answer the frontend gives, before the worker is ready
            try:
                early = requests.post(server.inference_url + PRED, data=fmnist_png(0), timeout=30)
                break
            except requests.ConnectionError:
                import time

                time.sleep(0.05)
        assert early is not None and early.status_code in (200, 404, 503), early.text
        server.wait_ready(240)
        r = requests.post(server.inference_url + PRED, data=fmnist_png(0), timeout=30)
        assert r.status_code == 200 and "label" in r.json()
    finally:
        server.stop()
    assert not server.worker_pids()


@pytest.mark.gpu
def test_gpu_answers_match_the_cpu_answers_the_certificate_was_computed_on(release_model_dir, fmnist_png):
    """On a GPU the network runs under fp16 autocast; its answers on real photos must stay those of
    the CPU's fp32 path (labels, confidences within 2e-2, review decisions) and come back on the CPU."""
    from handler.core import Classifier

    photos = [fmnist_png(i) for i in range(512)]
    gpu, cpu = Classifier(release_model_dir, device="cuda:0"), Classifier(release_model_dir, device="cpu")
    # the start-up probe kept fp16 (or, where fp16 missed it, said so and serves in fp32); answers name it
    assert gpu.rule.name == "float" and gpu.rule.runtime in ("torch-cuda-fp16", "torch-cuda")
    g, c = gpu.classify(photos), cpu.classify(photos)
    assert {(r["rule"], r["runtime"]) for r in g} == {("float", gpu.rule.runtime)}
    assert [r["label"] for r in g] == [r["label"] for r in c]
    # measured on an H200: at most 0.0124 over 5,000 test photos (fp16 autocast against fp32)
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(g, c)) < 2e-2
    assert max(abs(a["unfamiliar_score"] - b["unfamiliar_score"]) for a, b in zip(g, c)) < 0.05
    same = sum(a["needs_review"] == b["needs_review"] for a, b in zip(g, c))
    assert same >= len(photos) - 2  # only photos within a hair of the threshold may differ
    assert gpu.probabilities([torch.zeros(1, 28, 28, dtype=torch.uint8)]).device.type == "cpu"


def side_by_side(clf, photos: list[bytes], lanes: int = 8) -> list[dict]:
    """``clf.classify`` on chunks of 16 photos from ``lanes`` threads at once, results in photo order."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [photos[i:i + 16] for i in range(0, len(photos), 16)]
    with ThreadPoolExecutor(lanes) as pool:
        return [r for part in pool.map(clf.classify, chunks) for r in part]


def test_eager_passes_from_several_threads_take_turns(release_model_dir, fmnist_png):
    """The eager path reads the gate's layer through a hook that holds one pass's output: threads
    classifying at once with one core must each get their own photos' answers."""
    from handler.core import Classifier

    photos = [fmnist_png(i) for i in range(256)]
    clf = Classifier(release_model_dir, device="cpu", cpu_backend="eager", threads=1)
    one_at_a_time = [r for i in range(0, len(photos), 16) for r in clf.classify(photos[i:i + 16])]
    assert side_by_side(clf, photos) == one_at_a_time
