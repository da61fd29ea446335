"""Answers of the handler, in process, against model.json computed independently (tests/oracle.py):
the calibrated confidence is softmax(logits / temperature), needs_review is confidence < the stored
threshold, and every photo of a call gets its own answer, in order. The photos span the whole
confidence range, including both sides of the threshold."""
import base64
import json

import pytest

from tests.oracle import Expected


def assert_answer(result: dict, want: Expected, names: list[str], tol: float = 1e-5) -> None:
    where = f"test image {want.index}"
    assert result["class_id"] == want.class_id and result["label"] == names[want.class_id], where
    assert result["confidence"] == pytest.approx(want.confidence, abs=tol), where
    assert result["needs_review"] is want.needs_review, (where, want.confidence)
    assert result["review_reason"] == want.review_reason, where
    if want.unfamiliar_score is not None:  # the gate's score, computed by the oracle's own arithmetic
        assert result["unfamiliar_score"] == pytest.approx(want.unfamiliar_score, abs=2e-3), where
    assert [t["class_id"] for t in result["top_k"]] == [c for c, _ in want.top_k], where
    assert [t["probability"] for t in result["top_k"]] == pytest.approx([p for _, p in want.top_k], abs=tol), where


def test_the_sample_spans_the_confidence_range_and_the_threshold(spread_photos, oracle):
    conf = [e.confidence for e, _ in spread_photos]
    assert min(conf) < 0.5 and max(conf) > 0.999
    assert len({int(c * 10) for c in conf}) >= 6  # at least six of the ten 0.1-wide bands
    assert any(e.needs_review for e, _ in spread_photos) and not all(e.needs_review for e, _ in spread_photos)
    near = [c for c in conf if abs(c - oracle.threshold) < 0.01]
    assert len(near) >= 4, "no photo near the threshold"
    assert any(e.unfamiliar for e, _ in spread_photos), "no photo the gate flags"
    # Where the temperature matters: T != 1 moves these confidences by more than the tolerance.
    assert abs(oracle.temperature - 1) > 0.01


def test_core_answers_equal_model_json_calibration(classifier, spread_photos, oracle):
    results = classifier.classify([png for _, png in spread_photos])
    assert len(results) == len(spread_photos)
    for result, (want, _) in zip(results, spread_photos):
        assert_answer(result, want, oracle.class_names)


def test_every_photo_of_a_call_gets_its_own_answer_in_order(classifier, spread_photos, oracle):
    """Distinct answers side by side, with bad photos between them: a swap or shift of results in a
    call (the first two, or around an error) gives some photo another photo's answer."""
    photos = spread_photos[:12]
    assert photos[0][0].class_id != photos[1][0].class_id or \
        abs(photos[0][0].confidence - photos[1][0].confidence) > 1e-3
    call = [photos[0][1], photos[1][1], b"not an image", *[png for _, png in photos[2:]], b""]
    results = classifier.classify(call)
    assert len(results) == len(call)
    assert results[2]["error"]["code"] == "not_an_image" and results[-1]["error"]["code"] == "empty"
    for result, (want, _) in zip(results[:2] + results[3:-1], photos):
        assert_answer(result, want, oracle.class_names)
    for n in (1, 2, 3):  # short calls too: the first two of every call
        for result, (want, _) in zip(classifier.classify([png for _, png in photos[:n]]), photos[:n]):
            assert_answer(result, want, oracle.class_names)


def test_torchserve_adapter_answers_each_request_with_its_own_photos(release_model_dir, spread_photos, oracle):
    from tests.test_handler_unit import FakeContext
    from handler.torchserve_handler import ReturnsClassifierHandler

    h = ReturnsClassifierHandler()
    ctx = FakeContext(release_model_dir)
    ctx.model_yaml_config["handler"]["max_instances"] = 64
    ctx.model_yaml_config["handler"]["cpu_backend"] = "onnx"  # the float graph, which the float oracle describes
    h.initialize(ctx)
    h.context = ctx
    photos = spread_photos[:9]
    b64 = [base64.b64encode(png).decode() for _, png in photos]
    data = [{"body": bytearray(photos[0][1])},                               # request 0: one raw photo
            {"body": {"instances": [{"b64": s} for s in b64[1:5]]}},         # request 1: four photos
            {"body": bytearray(photos[5][1])},                               # request 2: one raw photo
            {"body": {"instances": b64[6:9]}}]                                # request 3: three photos
    out = [json.loads(o) for o in h.handle(data, ctx)]
    answers = [out[0], *out[1]["predictions"], out[2], *out[3]["predictions"]]
    assert len(answers) == len(photos)
    for result, (want, _) in zip(answers, photos):
        assert_answer(result, want, oracle.class_names)
