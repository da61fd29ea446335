"""The served decision's one owner (returns_model/rule.py): which rule serves where, what it decides,
and the float rule's probe that a server checks at start-up on its own device and runtime."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import pytest
import torch

from handler.core import Classifier
from returns_model.meta import ArtifactError, read_meta
from returns_model.results import FLOAT, INT8, LOW_CONFIDENCE, UNFAMILIAR
from returns_model.rule import FLOAT_PROBE_TOLERANCE, ServedRule, accepted, choose_rule


def test_the_rule_chosen_for_each_device_and_backend(release_model_dir):
    meta = read_meta(release_model_dir)
    assert choose_rule(meta, "cpu", "onnx-int8") == INT8
    assert choose_rule(meta, "cpu", "onnx-int8", int8_reproduced=False) == FLOAT
    assert {choose_rule(meta, "cpu", b) for b in ("onnx", "eager")} == {FLOAT}
    assert choose_rule(meta, "cuda", "onnx-int8") == FLOAT  # a GPU serves the float network
    assert choose_rule(replace(meta, int8=None), "cpu", "onnx-int8") == FLOAT


def test_decide_accepts_at_the_threshold_and_never_a_flagged_photo(release_model_dir):
    rule = ServedRule.of(read_meta(release_model_dir), FLOAT, "torch")
    t = rule.threshold
    probs = torch.tensor([[t, 1 - t], [t - 1e-6, 1 - t + 1e-6], [0.999, 0.001], [0.2, 0.8]])
    probs = probs[:, :1].expand(-1, 10).clone() * 0 + torch.cat([probs, torch.zeros(4, 8)], 1)
    far = torch.tensor([0.0, 0.0, 1e9, 0.0])  # the third is far beyond the gate's cutoff
    ok, why = rule.decide(probs, far)
    assert ok.tolist() == [True, False, False, False]
    assert why == [[], [LOW_CONFIDENCE], [UNFAMILIAR], [LOW_CONFIDENCE]]
    assert accepted(torch.tensor([t]), t).tolist() == [True]
    assert rule.decide(probs)[0].tolist() == [True, False, True, False]  # no scores: nothing flagged


def test_each_rule_has_its_own_settings(release_model_dir):
    meta = json.loads((release_model_dir / "model.json").read_text())
    f, i = (ServedRule.of(read_meta(release_model_dir), name, "x") for name in (FLOAT, INT8))
    assert (f.threshold, f.temperature) == (meta["calibration"]["threshold"], meta["calibration"]["temperature"])
    assert (i.threshold, i.temperature) == (meta["int8"]["calibration"]["threshold"],
                                            meta["int8"]["calibration"]["temperature"])
    assert f.reference == meta["reference"] and i.reference == meta["int8"]["reference"]
    assert f.probe == meta["probe"] and i.probe == meta["int8"]["probe"]
    with pytest.raises(ArtifactError, match="unknown rule 'fp8'"):
        ServedRule.of(read_meta(release_model_dir), "fp8", "x")


def test_the_float_probe_is_reproduced_by_every_float_runtime_here(release_model_dir):
    for backend in ("eager", "onnx"):
        clf = Classifier(release_model_dir, warmup=False, cpu_backend=backend)
        worst, tolerance = clf.rule.probe_difference(clf._logits(list(clf.rule.probe_pixels())))
        assert clf.backend == backend and worst <= tolerance == FLOAT_PROBE_TOLERANCE, (backend, worst)
        assert worst < 1e-3  # the CPU's fp32 answers, within rounding


def _with_float_probe(release_model_dir, folder, shift: float):
    shutil.copytree(release_model_dir, folder)
    meta = json.loads((folder / "model.json").read_text())
    for row in meta["probe"]["logits"]:
        row[0] += shift
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def test_a_device_that_does_not_answer_the_float_probe_as_certified_is_refused(release_model_dir, tmp_path):
    folder = _with_float_probe(release_model_dir, tmp_path / "m", 3.0)
    with pytest.raises(ArtifactError, match="cannot serve the float rule as certified"):
        Classifier(folder, warmup=False, cpu_backend="eager")


def test_a_float_graph_that_does_not_answer_the_probe_gives_way_to_the_eager_model(release_model_dir, monkeypatch,
                                                                                  caplog):
    """A graph runtime whose answers moved (here: ONNX Runtime's logits shifted by 3) is not trusted with the
    float rule: the server serves the eager model, says so once, and names it in every answer."""
    from handler import onnx_runner

    real = onnx_runner.OnnxRunner.__call__
    monkeypatch.setattr(onnx_runner.OnnxRunner, "__call__", lambda self, x: (real(self, x)[0] + torch.tensor(
        [3.0] + [0.0] * 9), real(self, x)[1]))
    with caplog.at_level(logging.WARNING):
        clf = Classifier(release_model_dir, warmup=False, cpu_backend="onnx")
    assert (clf.backend, clf.rule.name, clf.rule.runtime) == ("eager", FLOAT, "torch")
    assert sum("probe photos' calibrated probabilities differ" in r.getMessage() for r in caplog.records) == 1
    answer = clf.classify([(release_model_dir / "confusion_matrix.png").read_bytes()])[0]
    assert (answer["rule"], answer["runtime"]) == (FLOAT, "torch")


def test_a_folder_without_a_float_probe_still_serves(release_model_dir, tmp_path, caplog):
    folder = tmp_path / "m"
    shutil.copytree(release_model_dir, folder)
    meta = json.loads((folder / "model.json").read_text())
    del meta["probe"]
    (folder / "model.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO):
        clf = Classifier(folder, warmup=False, cpu_backend="eager")
    assert clf.rule.probe is None and "no float probe" in caplog.text
