"""The classification core and the TorchServe adapter, with a small fake context."""
import base64
import json

import pytest
import torch

from handler import core
from handler.core import BatchStats, Classifier, available_cpus, bucket
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
                      "model_name", "model_version", "model_sha256", "rule", "runtime"}
    assert (r["rule"], r["runtime"]) == ("float", "torch")  # the default backend: eager
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


@pytest.mark.parametrize("env, yaml_workers, expected", [
    (None, 3, 3), ("4", 1, 4), ("0", 2, 2), ("two", 2, 2), (None, None, 1),
], ids=["archive", "chart-wins", "zero-ignored", "garbage-ignored", "none"])
def test_workers_per_model_prefers_the_charts_count(monkeypatch, env, yaml_workers, expected):
    from handler.torchserve_handler import WORKERS_ENV, workers_per_model

    if env is None:
        monkeypatch.delenv(WORKERS_ENV, raising=False)
    else:
        monkeypatch.setenv(WORKERS_ENV, env)
    assert workers_per_model({} if yaml_workers is None else {"minWorkers": yaml_workers}) == expected


def test_cpu_backend_is_a_model_config_knob(handler, release_model_dir):
    from handler.serve_config import HandlerKnobs, ServeConfig, model_config_yaml

    assert HandlerKnobs.from_model_yaml({}).cpu_backend == ServeConfig().cpu_backend == "onnx-int8"
    yaml_eager = model_config_yaml(ServeConfig(cpu_backend="eager"))
    assert yaml_eager["handler"]["cpu_backend"] == "eager"
    assert HandlerKnobs.from_model_yaml(yaml_eager).cpu_backend == "eager"
    assert handler.core.backend == "onnx-int8"  # the default knob, on a CPU with onnxruntime installed
    h = ReturnsClassifierHandler()
    ctx = FakeContext(release_model_dir)
    ctx.model_yaml_config["handler"]["cpu_backend"] = "eager"
    h.initialize(ctx)
    assert h.core.backend == "eager"


@pytest.mark.parametrize("cpu_max, expected", [
    ("max 100000\n", 8), ("250000 100000\n", 2), ("150000 100000", 1), ("50000 100000", 1),
    ("1600000 100000", 8), ("", 8), ("garbage", 8), (None, 8),
], ids=["no-quota", "2.5-cpus", "1.5-cpus", "half-a-cpu", "16-cpus", "empty", "garbage", "no-file"])
def test_available_cpus_is_the_quota_rounded_down_within_the_affinity_mask(tmp_path, monkeypatch, cpu_max, expected):
    monkeypatch.setattr(core.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    assert available_cpus(path) == expected


@pytest.mark.parametrize("cpu_count, expected", [(6, 3), (None, 1)])
def test_available_cpus_without_an_affinity_mask(tmp_path, monkeypatch, cpu_count, expected):
    monkeypatch.delattr(core.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(core.os, "cpu_count", lambda: cpu_count)
    (tmp_path / "cpu.max").write_text("300000 100000")
    assert available_cpus(tmp_path / "cpu.max") == expected


def test_batch_stats_time_decoding_and_the_forward_pass_in_milliseconds(classifier, fmnist_png, monkeypatch):
    """A clock that ticks 0.25 s per reading: decoding and the forward pass each take one tick."""
    ticks = iter(100.0 + i * 0.25 for i in range(100))
    monkeypatch.setattr(core.time, "perf_counter", lambda: next(ticks))
    stats = BatchStats()
    results = classifier.classify([fmnist_png(0), b"not a photo", fmnist_png(1)], stats)
    assert stats.decode_ms == 250.0 and stats.forward_ms == 250.0
    assert stats.images == 3 and stats.rejected == 1 and len(results) == 3


@pytest.mark.parametrize("backend", ["eager", "onnx"])
def test_a_model_without_a_gate_reviews_on_confidence_alone(release_model_dir, tmp_path, oracle, fmnist_test, backend,
                                                            fmnist_png):
    """An older model.json has no `unfamiliar` section: the core serves it, flags nothing
    unfamiliar, reports no score, and its answers are model.json's calibrated confidences."""
    import shutil

    old = tmp_path / "old_model"
    shutil.copytree(release_model_dir, old)
    meta = json.loads((old / "model.json").read_text())
    del meta["unfamiliar"]
    (old / "model.json").write_text(json.dumps(meta))
    c = Classifier(old, warmup=False, cpu_backend=backend)
    images, _ = fmnist_test
    probs = oracle.probabilities(images[:64])
    got = c.describe(probs)
    assert len(got) == 64 and all(r["unfamiliar_score"] is None for r in got)
    for r, p in zip(got, probs):
        conf = float(p.max())
        assert r["review_reason"] == (["low_confidence"] if conf < oracle.threshold else [])
        assert r["needs_review"] is (conf < oracle.threshold) and r["confidence"] == round(conf, 6)
    served = c.classify([fmnist_png(i) for i in range(8)])
    assert all(r["unfamiliar_score"] is None and "unfamiliar" not in r["review_reason"] for r in served)


def test_describe_accepts_a_confidence_equal_to_the_threshold_and_rounds_as_documented(classifier):
    """docs/interfaces.md: a confidence equal to the threshold is accepted; confidence and top_k
    probabilities are rounded to 6 places, unfamiliar_score to 4; decisions use unrounded values."""
    t = classifier.meta.threshold
    k = len(classifier._labels)
    rows = torch.zeros(3, k, dtype=torch.float64)
    rows[0, 2], rows[0, 5] = t, 1 - t                      # exactly at the threshold: accepted
    rows[1, 2], rows[1, 5] = t - 1e-12, 1 - t + 1e-12      # a hair below: reviewed
    rows[2, 7], rows[2, 1] = 0.123456789, 0.876543211     # low: reviewed, rounded
    scores = torch.tensor([0.123456, -1.98766, 0.5], dtype=torch.float64)
    got = classifier.describe(rows, scores)
    assert got[0]["review_reason"] == [] and got[0]["needs_review"] is False
    assert got[1]["review_reason"] == ["low_confidence"]
    assert got[2]["confidence"] == 0.876543 and got[2]["top_k"][1]["probability"] == 0.123457
    assert [r["unfamiliar_score"] for r in got] == [0.1235, -1.9877, 0.5]


def test_batch_stats_count_what_was_answered(classifier, fmnist_png, monkeypatch):
    """The metrics' counts are the answers' own: photos answered low_confidence or unfamiliar, the
    average confidence of the classified ones; a call with no good photo averages 0."""
    t = classifier.meta.threshold
    k = len(classifier._labels)
    probs = torch.zeros(3, k)
    probs[0, 0], probs[0, 1] = t, 1 - t  # at the threshold (in float32): whatever describe says, stats say
    probs[1, 2], probs[1, 3] = 0.5, 0.5
    probs[2, 4] = 1.0
    scores = torch.tensor([0.0, 0.0, 50.0])  # the third is far past the gate's cutoff
    monkeypatch.setattr(classifier, "scores", lambda pixels: (probs[:len(pixels)], scores[:len(pixels)]))
    stats = BatchStats()
    results = classifier.classify([fmnist_png(i) for i in range(3)] + [b""], stats)
    answered = results[:3]
    assert stats.low_confidence == sum("low_confidence" in r["review_reason"] for r in answered) >= 1
    assert stats.unfamiliar == 1 and answered[2]["review_reason"] == ["unfamiliar"]
    assert stats.average_confidence == pytest.approx(float(probs.max(1).values.mean()))
    assert (stats.images, stats.rejected) == (4, 1)
    empty = BatchStats(average_confidence=9.0, low_confidence=9)
    assert classifier.classify([b"", b"junk"], empty)[0]["error"]["code"] == "empty"
    assert (empty.images, empty.rejected, empty.low_confidence, empty.unfamiliar, empty.average_confidence) == \
        (2, 2, 0, 0, 0.0)


def test_a_photo_refused_before_decoding_keeps_its_place(classifier, fmnist_png, oracle, fmnist_test):
    from returns_model.preprocess import PhotoError

    got = classifier.classify([PhotoError("bad_base64", "not base64"), fmnist_png(0), fmnist_png(1)])
    assert got[0] == {"error": {"code": "bad_base64", "message": "not base64"}}
    expected = [oracle.expected(i, p) for i, p in enumerate(oracle.probabilities(fmnist_test[0][:2]))]
    assert [r["class_id"] for r in got[1:]] == [e.class_id for e in expected]


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 2, 3, 8, 9, 15, 16, 17, 32, 33)] == [1, 2, 4, 8, 16, 16, 16, 32, 32, 48]


def test_the_classifier_uses_every_available_cpu_and_channels_last(release_model_dir, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(core, "available_cpus", lambda: 3)
    try:
        torch.set_num_threads(1)
        c = Classifier(release_model_dir, warmup=False)
        assert torch.get_num_threads() == 3
        Classifier(release_model_dir, warmup=False, threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    conv = next(m for m in c.model.modules() if isinstance(m, torch.nn.Conv2d)
                and m.weight.shape[1] > 1 and m.weight.shape[2] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    from returns_model.manifest import content_digest, tree_hashes

    assert c.model_sha256 == content_digest(tree_hashes(release_model_dir)) and len(c.model_sha256) == 64


def test_warm_up_runs_one_and_eight_blank_photos_unless_turned_off(release_model_dir, monkeypatch):
    seen: list[list[torch.Tensor]] = []
    monkeypatch.setattr(Classifier, "probabilities", lambda self, pixels: seen.append(pixels))
    c = Classifier(release_model_dir, warmup=False)
    assert seen == []
    Classifier(release_model_dir)
    assert [len(p) for p in seen] == [1, 8]
    shape = (c.spec.channels, c.spec.size, c.spec.size)
    assert all(x.shape == shape and x.dtype == torch.uint8 and not x.any() for batch in seen for x in batch)


def test_a_folder_served_from_memory_answers_as_the_folder_does(release_model_dir, fmnist_test):
    """ModelParts (how training measures a folder it is still writing): the same rule, runtime and
    probabilities as the folder on every CPU path, no model_sha256, and the parts' weights untouched."""
    from returns_model.artifact import ModelParts, load_weights, read_int8_graph
    from returns_model.meta import read_meta

    meta = read_meta(release_model_dir)
    weights = load_weights(release_model_dir)
    parts = ModelParts(meta, weights, int8_graph=read_int8_graph(release_model_dir, meta))
    pixels = list(fmnist_test[0][:40].unsqueeze(1))
    for backend in ("eager", "onnx", "onnx-int8"):
        disk = Classifier(release_model_dir, warmup=False, threads=1, cpu_backend=backend)
        memory = Classifier(parts, warmup=False, threads=1, cpu_backend=backend)
        assert (memory.backend, memory.rule.name, memory.rule.runtime) == (disk.backend, disk.rule.name,
                                                                           disk.rule.runtime), backend
        (p_disk, u_disk), (p_mem, u_mem) = disk.scores(pixels), memory.scores(pixels)
        assert torch.equal(p_disk, p_mem) and torch.equal(u_disk, u_mem), backend
        assert memory.model_sha256 is None and memory.model is not disk.model
    assert all(torch.equal(v, load_weights(release_model_dir)[k]) and v.is_contiguous() for k, v in weights.items())
    without_int8 = Classifier(ModelParts(meta, weights), warmup=False, threads=1, cpu_backend="onnx-int8")
    assert without_int8.rule.name == "float" and "the model in memory has no int8 graph" in without_int8.fallback


def test_an_unknown_cpu_backend_is_refused_by_name(release_model_dir):
    with pytest.raises(ValueError) as e:
        Classifier(release_model_dir, warmup=False, cpu_backend="tensorrt")
    assert str(e.value) == "cpu_backend must be one of onnx, onnx-int8, eager, not 'tensorrt'"


def test_max_image_pixels_overrides_the_models_limit(release_model_dir, fmnist_png):
    c = Classifier(release_model_dir, warmup=False, max_image_pixels=28 * 28 - 1)
    (r,) = c.classify([fmnist_png(0)])
    assert r["error"]["code"] == "too_large" and "the limit is 783" in r["error"]["message"]


# ---- request parsing: each instance's error names the instance, data URLs, JSON detection ----------

def _errors(parsed):
    return [(p.code, p.message) if not isinstance(p, bytes) else p for p in parsed.photos]


def test_each_bad_instance_gets_its_own_coded_error_naming_its_index():
    good = base64.b64encode(b"\x89PNG photo").decode()
    got = _errors(parse_request({"body": {"instances": [good, {"b64": 12}, {"b64": "@@"}, {"data": None},
                                                        {"image": {"b64": 3.5}}, {"nothing": 1}]}}, 8))
    assert got[0] == b"\x89PNG photo"
    assert got[1] == ("bad_instance", "instance 1: base64 data must be a string, got int")
    assert got[2][0] == "bad_base64" and got[2][1].startswith("instance 2: not valid base64 (")
    assert got[3] == ("bad_instance", "instance 3: base64 data must be a string, got NoneType")
    assert got[4] == ("bad_instance", "instance 4: base64 data must be a string, got float")
    assert got[5][0] == "bad_instance" and got[5][1].startswith("instance 5: expected a base64 string")


def test_a_data_url_is_read_after_its_first_comma_and_only_a_data_url_is():
    b64 = base64.b64encode(b"\x89PNG photo").decode()
    got = _errors(parse_request({"body": {"instances": [f"data:image/png;base64,{b64}", f"{b64},{b64}",
                                                        f"data:image/png;base64,{b64},{b64}", "data:nothing"]}}, 8))
    assert got[0] == b"\x89PNG photo"
    assert [g[0] for g in got[1:]] == ["bad_base64"] * 3  # commas are no base64; "data:" without one is no URL


@pytest.mark.parametrize("body", [b'  \n\t{"instances": ["aGk="]}', b'\n["aGk="]', b"[1, 2]"],
                         ids=["object-after-whitespace", "list-after-newline", "list"])
def test_a_body_that_starts_like_json_after_whitespace_is_parsed_as_json(body):
    if body.lstrip().startswith(b"{"):
        assert parse_request({"body": body}, 8).photos == [b"hi"]
    else:  # a JSON list is JSON, but not a request object
        with pytest.raises(RequestError) as e:
            parse_request({"body": body}, 8)
        assert e.value.code == "bad_request" and "'instances' list" in e.value.message


@pytest.mark.parametrize("row, code, message", [
    ({"body": {"foo": 1}}, "bad_request", "a JSON request must be an object with an 'instances' list"),
    ({"body": {"instances": "x"}}, "bad_request", "'instances' must be a list, got str"),
    ({"body": {"instances": []}}, "bad_request", "'instances' is empty"),
    ({}, "bad_request", "the request has no body"),
    ({"a": b"x", "b": b"y"}, "bad_request",
     "a multipart form must carry exactly one image, got 2 fields; several photos go in JSON instances"),
    ({"body": 12}, "bad_request", "unsupported request body of type int"),
], ids=["no-instances", "instances-not-a-list", "instances-empty", "no-body", "two-files", "a-number"])
def test_a_malformed_request_is_refused_with_its_code_and_message(row, code, message):
    with pytest.raises(RequestError) as e:
        parse_request(row, 8)
    assert (e.value.code, e.value.message) == (code, message)


def test_the_body_is_taken_from_body_then_data_and_a_raw_photo_is_a_single_answer():
    assert parse_request({"data": b"\x89PNG photo", "other": b"x"}, 8).photos == [b"\x89PNG photo"]
    raw = parse_request({"body": bytearray(b"\x89PNG photo")}, 8)
    assert raw.photos == [b"\x89PNG photo"] and raw.batch is False
    assert parse_request({"body": {"instances": ["aGk="]}}, 8).batch is True
    bare = parse_request({"body": {"instances": ["aGk=", "aGk=", "aGk=", "@@"]}}, 8).photos[3]
    assert bare.code == "bad_base64" and bare.message.startswith("instance 3: not valid base64")
