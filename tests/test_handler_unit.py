"""The classification core and the TorchServe adapter, with a small fake context."""
import base64
import json

import pytest
import torch

from handler.core import Classifier
from handler.errors import RequestError
from handler.payload import parse_request
from handler.torchserve_handler import ReturnsClassifierHandler


class FakeMetric:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def add_or_update(self, value, dims):
        self.log.append((self.name, value, dims))


class FakeMetrics:
    def __init__(self):
        self.log = []

    def get_metric(self, name, kind):
        return FakeMetric(self.log, name)

    def add_time(self, *a, **k):
        pass


class FakeContext:
    """What the handler reads from TorchServe's context, and what it sets on it."""

    def __init__(self, model_dir):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.model_yaml_config = {"minWorkers": 1, "handler": {"max_instances": 8, "cpu_threads": 1}}
        self.model_name = "returns-classifier"
        self.metrics = FakeMetrics()
        self.statuses, self.content_types = {}, {}

    def set_response_status(self, code, phrase, idx):
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx, value):
        self.content_types[idx] = value

    def get_request_header(self, idx, key):
        return None


@pytest.fixture(scope="module")
def handler(release_model_dir):
    h = ReturnsClassifierHandler()
    ctx = FakeContext(release_model_dir)
    h.initialize(ctx)
    h.context = ctx
    return h


def b64(data):
    return base64.b64encode(data).decode()


def test_parse_all_instance_shapes():
    png = b"\x89PNG fake"
    req = parse_request({"body": {"instances": [{"b64": b64(png)}, {"data": b64(png)}, {"image": {"b64": b64(png)}},
                                                b64(png), {"other": 1}, {"b64": "%%%"}]}}, 10)
    assert req.batch and req.photos[:4] == [png] * 4
    assert [p.code for p in req.photos[4:]] == ["bad_instance", "bad_base64"]
    assert parse_request({"body": bytearray(png)}, 10).photos == [png]
    assert parse_request({"file": png}, 10).photos == [png]  # multipart form field
    assert parse_request({"body": json.dumps({"instances": [b64(png)]}).encode()}, 10).batch


@pytest.mark.parametrize("row,code", [
    ({"body": b'{"instances": [1,'}, "bad_json"),
    ({"body": {"instances": "x"}}, "bad_request"),
    ({"body": {"inputs": []}}, "bad_request"),
    ({"body": {"instances": []}}, "bad_request"),
    ({"body": {"instances": ["a"] * 11}}, "too_many_instances"),
    ({"a": b"1", "b": b"2"}, "bad_request"),
])
def test_malformed_requests_raise_with_a_code(row, code):
    with pytest.raises(RequestError) as err:
        parse_request(row, 10)
    assert err.value.code == code and err.value.to_dict()["error"]["code"] == code


def test_form_urlencoded_photo_gets_a_hint():
    with pytest.raises(RequestError, match="Content-Type such as image/jpeg"):
        parse_request({"\x89PNG...": b""}, 10, "application/x-www-form-urlencoded")


def test_core_classifies_real_images_and_keeps_order(release_model_dir, fmnist_png, fmnist_test):
    clf = Classifier(release_model_dir, threads=1)
    _, labels = fmnist_test
    photos = [fmnist_png(i) for i in range(20)]
    out = clf.classify(photos[:10] + [b"junk"] + photos[10:])
    assert len(out) == 21 and out[10]["error"]["code"] == "not_an_image"
    good = out[:10] + out[11:]
    assert sum(r["class_id"] == int(labels[i]) for i, r in enumerate(good)) >= 15
    r = good[0]
    assert set(r) == {"label", "class_id", "confidence", "needs_review", "review_reason", "unfamiliar_score", "top_k",
                      "model_name", "model_version", "model_sha256"}
    for r in good:  # the served rule: low confidence, unfamiliar, or both
        low, unf = r["confidence"] < clf.meta.threshold, r["unfamiliar_score"] > clf.gate.cutoff
        assert r["review_reason"] == [x for x, on in (("low_confidence", low), ("unfamiliar", unf)) if on]
        assert r["needs_review"] == (low or unf)
    assert r["top_k"][0]["label"] == r["label"] and len(r["top_k"]) == clf.meta.top_k


def test_adapter_flattens_a_batch_and_answers_each_request(handler, fmnist_png):
    ctx = handler.context
    ctx.statuses.clear()
    data = [
        {"body": bytearray(fmnist_png(0))},                                               # raw image
        {"body": {"instances": [{"b64": b64(fmnist_png(i))} for i in range(1, 6)]}},      # 5 photos
        {"body": {"instances": [{"b64": b64(b"bad")}, {"b64": b64(fmnist_png(7))}]}},     # mixed
        {"body": {"instances": [{"b64": "!!"}]}},                                        # nothing valid
        {"body": b"{broken"},                                                            # malformed
        {"body": {"instances": ["x"] * 9}},                                              # over the limit of 8
    ]
    out = [json.loads(o) for o in handler.handle(data, ctx)]
    assert len(out) == len(data)
    assert "label" in out[0] and len(out[1]["predictions"]) == 5
    assert "error" in out[2]["predictions"][0] and "label" in out[2]["predictions"][1]
    assert out[3]["predictions"][0]["error"]["code"] == "bad_base64"
    assert out[4]["error"]["code"] == "bad_json" and out[5]["error"]["code"] == "too_many_instances"
    assert {i: c for i, (c, _) in ctx.statuses.items()} == {3: 400, 4: 400, 5: 400}
    per_batch = {name: v for name, v, _ in ctx.metrics.log if name == "ImagesPerBatch"}
    assert per_batch["ImagesPerBatch"] == 9  # 1 + 5 + 2 + 1 photos (request-level errors carry none)
    assert any(name == "RejectedImagesPerBatch" and v == 2 for name, v, _ in ctx.metrics.log)


def test_padding_to_a_bucket_changes_no_result(release_model_dir, fmnist_png):
    from handler.core import bucket

    clf = Classifier(release_model_dir, threads=1, warmup=False)
    pixels = clf.decode([fmnist_png(i) for i in range(21)]).pixels
    assert [bucket(n) for n in (3, 5, 17, 21, 200)] == [4, 8, 32, 32, 208]
    alone = torch.cat([clf.probabilities([p]) for p in pixels[:5]])
    assert torch.allclose(clf.probabilities(pixels[:5]), alone, atol=1e-5)  # padded 5 -> 8
    assert torch.allclose(clf.probabilities(pixels)[:5], alone, atol=1e-5)  # padded 21 -> 32
    assert clf.probabilities(pixels).shape == (21, len(clf.meta.class_names))


def test_cpu_passes_of_a_chunk_change_no_result(release_model_dir, fmnist_png, monkeypatch):
    import handler.core

    clf = Classifier(release_model_dir, threads=1, warmup=False)
    pixels = clf.decode([fmnist_png(i) for i in range(21)]).pixels
    whole = clf.probabilities(pixels)  # 21 <= CPU_CHUNK: one pass
    monkeypatch.setattr(handler.core, "CPU_CHUNK", 8)  # passes of 8, 8 and 5 (padded to 8)
    assert torch.allclose(clf.probabilities(pixels), whole, atol=1e-5)


def test_cpu_backend_is_a_model_config_knob(handler, release_model_dir):
    from handler.serve_config import HandlerKnobs, ServeConfig, model_config_yaml

    assert HandlerKnobs.from_model_yaml({}).cpu_backend == ServeConfig().cpu_backend == "onnx"
    yaml_eager = model_config_yaml(ServeConfig(cpu_backend="eager"))
    assert yaml_eager["handler"]["cpu_backend"] == "eager"
    assert HandlerKnobs.from_model_yaml(yaml_eager).cpu_backend == "eager"
    assert handler.core.backend == "onnx"  # the default knob, on a CPU with onnxruntime installed
    h = ReturnsClassifierHandler()
    ctx = FakeContext(release_model_dir)
    ctx.model_yaml_config["handler"]["cpu_backend"] = "eager"
    h.initialize(ctx)
    assert h.core.backend == "eager"
