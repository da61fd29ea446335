"""Bad input on the inference API of a real TorchServe: a clear per-photo error or result,
the server healthy afterwards, and the other photos of the request and batch unaffected."""
import base64
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from tests.reliability.images import bad_inputs, odd_but_valid

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PRED = "/predictions/returns-classifier"
# The code docs/reliability.md promises for each bad input; only the 0x0 PNG may get any of three,
# depending on how far Pillow parses it (documented there).
PROMISED = {
    "empty": {"empty"},
    "random_bytes": {"not_an_image"},
    "text_file": {"not_an_image"},
    "truncated_png": {"corrupt"},
    "truncated_jpeg": {"corrupt"},
    "corrupt_chunk_png": {"corrupt"},
    "zero_size_png": {"zero_size", "corrupt", "not_an_image"},
    "decompression_bomb": {"too_large"},
}


def test_every_bad_input_has_a_promised_code(sample):
    assert set(bad_inputs(sample[0])) == set(PROMISED)


@pytest.fixture(scope="module")
def sample(fmnist_test):
    images, labels = fmnist_test
    return Image.fromarray(images[0].numpy()), int(labels[0])


def healthy(server, good_png, label):
    assert requests.get(server.inference_url + "/ping", timeout=10).json()["status"] == "Healthy"
    r = requests.post(server.inference_url + PRED, data=good_png, timeout=30)
    assert r.status_code == 200 and r.json()["class_id"] == label


def test_each_bad_photo_gets_its_own_error(torchserve, sample, fmnist_png):
    img, label = sample
    for name, data in bad_inputs(img).items():
        r = requests.post(torchserve.inference_url + PRED, data=data, timeout=60)
        assert r.status_code == 400, (name, r.status_code, r.text[:200])
        err = r.json()["error"]
        assert err["code"] in PROMISED[name] and err["message"], (name, err)
        healthy(torchserve, fmnist_png(0), label)


def test_bad_photos_next_to_good_ones_in_a_request(torchserve, sample, fmnist_png, fmnist_test):
    img, _ = sample
    _, labels = fmnist_test
    names, bad = zip(*bad_inputs(img).items())
    good = [fmnist_png(i) for i in range(1, 1 + len(bad))]
    mixed = [p for pair in zip(good, bad) for p in pair]
    body = {"instances": [base64.b64encode(p).decode() for p in mixed]}
    preds = requests.post(torchserve.inference_url + PRED, json=body, timeout=60).json()["predictions"]
    assert len(preds) == len(mixed)
    for name, p in zip(names, preds[1::2]):
        assert p["error"]["code"] in PROMISED[name], (name, p)
    assert sum(p["class_id"] == int(labels[i + 1]) for i, p in enumerate(preds[0::2])) >= len(good) - 1


def test_bad_requests_in_the_same_server_batch_do_not_disturb_good_ones(torchserve, sample, fmnist_png, fmnist_test):
    img, _ = sample
    _, labels = fmnist_test
    named = list(bad_inputs(img).items()) + [("bad_json", b'{"instances": ['), ("bad_request", b'{"instances": 7}')]
    names, bad = [n for n, _ in named], [b for _, b in named]
    promised = {**PROMISED, "bad_json": {"bad_json"}, "bad_request": {"bad_request"}}

    def send(job):
        kind, i, data = job
        return kind, i, requests.post(torchserve.inference_url + PRED, data=data, timeout=60)

    jobs = [("good", i, fmnist_png(200 + i)) for i in range(12)] + [("bad", i, b) for i, b in enumerate(bad)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(send, jobs))
    for kind, i, r in results:
        if kind == "good":
            assert r.status_code == 200
        else:
            assert r.status_code == 400 and r.json()["error"]["code"] in promised[names[i]], (names[i], r.text[:200])
    good_ok = sum(r.json()["class_id"] == int(labels[200 + i]) for kind, i, r in results if kind == "good")
    assert good_ok >= 10


@pytest.mark.parametrize("body,code,photo_code", [
    ({"instances": 7}, "bad_request", None),
    ({"inputs": ["x"]}, "bad_request", None),
    ({"instances": [{"b64": "@@@"}]}, None, "bad_base64"),
    ({"instances": [{"b64": 12}]}, None, "bad_instance"),
    ({"instances": [["nested"]]}, None, "bad_instance"),
])
def test_wrong_json_types(torchserve, body, code, photo_code):
    r = requests.post(torchserve.inference_url + PRED, json=body, timeout=30)
    assert r.status_code == 400
    if code:
        assert r.json()["error"]["code"] == code
    else:
        assert r.json()["predictions"][0]["error"]["code"] == photo_code


def test_too_many_instances_and_oversized_body(torchserve, sample, fmnist_png):
    img, label = sample
    r = requests.post(torchserve.inference_url + PRED, json={"instances": ["AAAA"] * 1000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_instances"
    r = requests.post(torchserve.inference_url + PRED, data=b"\xff" * (65 * 1024 * 1024), timeout=60)
    assert r.status_code == 413  # TorchServe's frontend refuses bodies over max_request_size
    healthy(torchserve, fmnist_png(0), label)


def test_unusual_but_valid_encodings_classify(torchserve, sample, fmnist_png):
    img, label = sample
    for name, data in odd_but_valid(img).items():
        r = requests.post(torchserve.inference_url + PRED, data=data, timeout=30)
        assert r.status_code == 200, (name, r.text[:200])
        assert r.json()["label"], name
        if name == "16_bit_png":  # the same photo 16 bits deep: the same answer, not a black image's
            assert r.json()["class_id"] == label, r.text[:200]
    healthy(torchserve, fmnist_png(0), label)
