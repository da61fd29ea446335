"""The int8 CPU path (training/quantize.py): a quantised graph with a review rule fitted on its own
outputs. It must keep the promise by itself, and agree with the float path photo by photo.

Where this machine's CPU does not reproduce the int8 rule's probe, the tests that need the int8 rule
served skip and say why, and test_this_cpu_serves_the_int8_rule_or_the_float_one_says_why checks the
documented fallback instead (the float rule served, named, answering as the float path does).
tests/test_int8_portable.py checks an AVX2-only CPU's kernels under QEMU."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from handler.core import Classifier
from handler.onnx_runner import Int8GraphError
from returns_model.names import INT8_FILE
from training import unfamiliar


@pytest.fixture(scope="session")
def int8_classifier(release_model_dir) -> Classifier:
    clf = Classifier(release_model_dir, warmup=False, cpu_backend="onnx-int8")
    if clf.backend != "onnx-int8":
        pytest.skip(f"this CPU does not serve the int8 rule ({clf.fallback}); the fallback is checked by "
                    "test_this_cpu_serves_the_int8_rule_or_the_float_one_says_why")
    return clf


def test_this_cpu_serves_the_int8_rule_or_the_float_one_says_why(release_model_dir, fmnist_test):
    clf = Classifier(release_model_dir, warmup=False, cpu_backend="onnx-int8")
    first = answers(clf, fmnist_test[0][:200])
    if clf.backend == "onnx-int8":
        assert clf.fallback is None and {(r["rule"], r["runtime"]) for r in first} == {("int8", "onnxruntime")}
        return
    float_path = Classifier(release_model_dir, warmup=False, cpu_backend="onnx")
    assert clf.rule.name == "float" and "probe" in clf.fallback
    assert {r["rule"] for r in first} == {"float"}
    assert first == answers(float_path, fmnist_test[0][:200])


@pytest.fixture(scope="session")
def float_classifier(release_model_dir) -> Classifier:
    return Classifier(release_model_dir, warmup=False, cpu_backend="onnx")


def answers(clf: Classifier, images: torch.Tensor) -> list[dict]:
    pixels = list(images.unsqueeze(1))
    out = []
    for i in range(0, len(pixels), 500):
        out += clf.describe(*clf.scores(pixels[i:i + 500]))
    return out


def test_the_int8_path_serves_with_its_own_rule(int8_classifier, release_model_dir):
    section = json.loads((release_model_dir / "model.json").read_text())["int8"]
    cal = section["calibration"]
    assert int8_classifier.meta.threshold == cal["threshold"] and int8_classifier.meta.temperature == cal["temperature"]
    assert int8_classifier.gate.cutoff == section["unfamiliar"]["cutoff"]
    cert = int8_classifier.meta.certificate
    assert cert == cal["certificate"] and not cert["accept_nothing"] and cert["precision_lower_bound"] >= 0.99


def test_its_certified_promise_holds_on_the_test_split(int8_classifier, release_model_dir, fmnist_test):
    images, labels = fmnist_test
    results = answers(int8_classifier, images)
    accepted = torch.tensor([not r["needs_review"] for r in results])
    correct = torch.tensor([r["class_id"] for r in results]) == labels
    precision, coverage = float(correct[accepted].float().mean()), float(accepted.float().mean())
    assert precision >= 0.99 and coverage >= 0.8, (precision, coverage)  # 99.24% at 80.4% measured
    recorded = json.loads((release_model_dir / "model.json").read_text())["int8"]["test"]
    assert coverage == pytest.approx(recorded["auto_accepted"], abs=1e-4)  # model.json says what the server does
    assert precision == pytest.approx(recorded["precision"], abs=1e-4)
    assert float(correct.float().mean()) >= 0.94


def test_it_agrees_with_the_float_path_photo_by_photo(int8_classifier, float_classifier, fmnist_test):
    images, _ = fmnist_test
    a, b = answers(int8_classifier, images[:3000]), answers(float_classifier, images[:3000])
    same_label = sum(x["class_id"] == y["class_id"] for x, y in zip(a, b)) / len(a)
    same_decision = sum(x["needs_review"] == y["needs_review"] for x, y in zip(a, b)) / len(a)
    # each path certifies its own threshold (float 0.9354, int8 0.9365), so photos between the two are
    # decided differently by design; model.json records the figures on all 10,000
    assert same_label >= 0.995 and same_decision >= 0.985, (same_label, same_decision)
    recorded = int8_classifier.meta.int8["agreement_with_float_path"]["max_abs_probability_difference"]
    assert max(abs(x["confidence"] - y["confidence"]) for x, y in zip(a, b)) <= recorded + 1e-5


@pytest.mark.parametrize("kind", ["inverted", "noise", "scene_crops", "shapes_text", "blank", "patterns"])
def test_unfamiliar_photos_go_to_review_on_the_int8_path(int8_classifier, fmnist_test, kind):
    results = int8_classifier.classify(unfamiliar.make(kind, 40, seed=3, images=fmnist_test[0].numpy()))
    routed = sum(r.get("needs_review", True) for r in results) / len(results)
    assert routed >= 0.9, f"{kind}: only {routed:.0%} sent to review"
    assert any("unfamiliar" in r.get("review_reason", []) for r in results)


def test_a_graph_that_is_not_the_one_fitted_is_refused(release_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(release_model_dir, folder)
    graph = bytearray((folder / INT8_FILE).read_bytes())
    graph[-1] ^= 0xFF
    (folder / INT8_FILE).write_bytes(bytes(graph))
    with pytest.raises(Int8GraphError, match="SHA-256"):
        Classifier(folder, warmup=False, cpu_backend="onnx-int8")


def test_a_folder_without_an_int8_graph_serves_the_float_graph_and_rule(release_model_dir, tmp_path, caplog):
    folder = tmp_path / "model"
    shutil.copytree(release_model_dir, folder, ignore=shutil.ignore_patterns(INT8_FILE))
    clf = Classifier(folder, warmup=False, cpu_backend="onnx-int8")
    meta = json.loads((folder / "model.json").read_text())
    assert clf.backend == "onnx" and clf.meta.threshold == meta["calibration"]["threshold"]
    assert "no int8 graph" in caplog.text


def _hide(monkeypatch, *packages: str) -> None:
    """As if ``packages`` were not installed (the server checks with importlib.util.find_spec)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in packages else real(name, *a))


def _warnings(caplog) -> list[str]:
    import logging

    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_int8_rule_is_served_by_the_runtime_it_was_fitted_on(int8_classifier, release_model_dir, fmnist_test):
    from handler.onnx_runner import OnnxRunner, onnxruntime_version

    runtime = json.loads((release_model_dir / "model.json").read_text())["int8"]["runtime"]
    assert runtime == {"name": "onnxruntime", "version": onnxruntime_version()}
    assert isinstance(int8_classifier._onnx, OnnxRunner)
    assert (int8_classifier.rule.name, int8_classifier.rule.runtime) == ("int8", "onnxruntime")
    result = answers(int8_classifier, fmnist_test[0][:1])[0]
    assert (result["rule"], result["runtime"]) == ("int8", "onnxruntime")


def test_without_openvino_the_int8_rule_still_serves(int8_classifier, release_model_dir, monkeypatch, caplog):
    import logging

    _hide(monkeypatch, "openvino")
    with caplog.at_level(logging.WARNING):
        clf = Classifier(release_model_dir, warmup=False, cpu_backend="onnx-int8")
    assert clf.backend == "onnx-int8" and _warnings(caplog) == []


def test_without_onnxruntime_the_server_says_why_and_serves_eager_with_the_float_rule(
        release_model_dir, monkeypatch, caplog):
    import logging

    _hide(monkeypatch, "openvino", "onnxruntime")
    with caplog.at_level(logging.WARNING):
        clf = Classifier(release_model_dir, warmup=False, cpu_backend="onnx-int8")
    meta = json.loads((release_model_dir / "model.json").read_text())
    assert clf.backend == "eager" and clf.meta.threshold == meta["calibration"]["threshold"]
    assert (clf.rule.name, clf.rule.runtime) == ("float", "torch")
    assert _warnings(caplog) == [
        "cpu_backend onnx-int8: the int8 rule does not serve here: its rule was fitted on ONNX Runtime's outputs and "
        "onnxruntime is not installed; the float rule serves instead",
        "cpu_backend onnx: onnxruntime is not installed; serving on the eager path (float rule)"]
    answer = clf.classify([(release_model_dir / "confusion_matrix.png").read_bytes()])[0]  # it still answers
    assert (answer["rule"], answer["runtime"]) == ("float", "torch")


def _with_int8(release_model_dir: Path, folder: Path, change) -> Path:
    """A copy of the release folder whose model.json ``int8`` section ``change`` has edited in place."""
    shutil.copytree(release_model_dir, folder)
    meta = json.loads((folder / "model.json").read_text())
    change(meta["int8"])
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def _with_int8_runtime(release_model_dir: Path, folder: Path, runtime: dict | None) -> Path:
    def name(section):
        if runtime is None:  # a folder fitted before runtimes were named: ONNX Runtime, no probe
            del section["runtime"], section["probe"]
        else:
            section["runtime"] = runtime

    return _with_int8(release_model_dir, folder, name)


def test_a_folder_fitted_before_runtimes_were_named_keeps_onnx_runtime(int8_classifier, release_model_dir, tmp_path):
    from handler.onnx_runner import OnnxRunner

    clf = Classifier(_with_int8_runtime(release_model_dir, tmp_path / "m", None), warmup=False, cpu_backend="onnx-int8")
    assert clf.backend == "onnx-int8" and isinstance(clf._onnx, OnnxRunner)


def test_another_runtime_version_or_an_unknown_runtime_is_said(int8_classifier, release_model_dir, tmp_path, caplog):
    """Another ONNX Runtime version is said and then judged by the probe; a rule that names OpenVINO for a
    graph whose probe OpenVINO does not reproduce falls back, saying both; an unknown runtime is refused."""
    import logging

    with caplog.at_level(logging.WARNING):
        older = Classifier(_with_int8_runtime(release_model_dir, tmp_path / "a", {"name": "onnxruntime", "version": "1.0"}),
                           warmup=False, cpu_backend="onnx-int8")
    assert older.backend == "onnx-int8" and "the int8 rule was fitted on 1.0" in caplog.text
    with caplog.at_level(logging.WARNING):
        other = Classifier(_with_int8_runtime(release_model_dir, tmp_path / "b", {"name": "openvino", "version": "2020.1"}),
                           warmup=False, cpu_backend="onnx-int8")
    assert "the int8 rule was fitted on 2020.1" in caplog.text
    assert other.backend == "onnx" and "differ from the ones its rule was certified on" in other.fallback
    unknown = Classifier(_with_int8_runtime(release_model_dir, tmp_path / "c", {"name": "tvm"}), warmup=False,
                         cpu_backend="onnx-int8")
    assert unknown.backend == "onnx" and "unknown runtime 'tvm'" in caplog.text


def _with_probe(release_model_dir: Path, folder: Path, change) -> Path:
    return _with_int8(release_model_dir, folder, lambda section: change(section["probe"]))


def test_a_cpu_that_does_not_reproduce_the_certified_logits_serves_the_float_rule(release_model_dir, tmp_path, caplog):
    """The int8 section records 32 photos and the logits its runtime gave them; a server whose CPU
    answers otherwise (here: recorded logits moved by 0.01) must not serve the rule certified on them."""
    import logging

    def nudge(probe):
        probe["logits"][5][3] += 0.01

    with caplog.at_level(logging.WARNING):
        clf = Classifier(_with_probe(release_model_dir, tmp_path / "m", nudge), warmup=False, cpu_backend="onnx-int8")
    meta = json.loads((release_model_dir / "model.json").read_text())
    assert clf.backend == "onnx" and clf.meta.threshold == meta["calibration"]["threshold"]
    assert "differ from the ones its rule was certified on by up to 0.01" in caplog.text
    assert clf.rule.name == "float" and "by up to 0.01" in clf.fallback


def test_the_release_probe_is_reproduced_here_and_a_malformed_one_is_refused(int8_classifier, release_model_dir, tmp_path):
    from handler.onnx_runner import probe_mismatch
    from returns_model.meta import ArtifactError

    assert int8_classifier.meta.int8["probe"]["shape"] == [32, 1, 28, 28]
    assert probe_mismatch(int8_classifier._onnx, int8_classifier.meta) == ""
    with pytest.raises(ArtifactError, match="int8 probe"):
        Classifier(_with_probe(release_model_dir, tmp_path / "m", lambda probe: probe["logits"].pop()), warmup=False,
                   cpu_backend="onnx-int8")


def test_threads_each_get_the_answers_of_one_thread(int8_classifier, fmnist_test):
    """returns-kserve's lanes call the runner from several threads, and each must get its own photos'
    answers (an OpenVINO runner compiles a model per thread for that)."""
    from concurrent.futures import ThreadPoolExecutor

    from returns_model.preprocess import normalize

    x = normalize(fmnist_test[0][:256].unsqueeze(1), int8_classifier.spec)
    chunks = [x[i:i + 32] for i in range(0, 256, 32)]
    alone = [int8_classifier._onnx(c)[0] for c in chunks]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c: int8_classifier._onnx(c)[0], chunks * 3))
    assert all(torch.equal(t, alone[i % len(chunks)]) for i, t in enumerate(together))


def test_quantize_fits_a_rule_on_its_own_outputs(release_model_dir, fmnist_test):
    """The tool on small real splits: the section describes the graph it returns."""
    import hashlib

    from returns_model.artifact import load_model
    from returns_model.export import export_onnx
    from training.config import TrainConfig
    from training.data import Dataset, Split
    from training.quantize import CalibrationPhotos, int8_section
    from training.rule import RuleSettings

    images, labels = fmnist_test
    split = lambda a, b: Split(images[a:b].unsqueeze(1), labels[a:b])  # noqa: E731
    model, meta = load_model(release_model_dir)
    ds = Dataset(split(0, 4000), split(4000, 7000), split(7000, 10000), meta.class_names, "test", "x")
    float_graph = export_onnx(model, meta.unfamiliar["layer"], meta.preprocess.channels, meta.preprocess.size)
    graph, section = int8_section(float_graph, meta, ds, RuleSettings.of(TrainConfig()), CalibrationPhotos.of(TrainConfig()))
    assert section["sha256"] == hashlib.sha256(graph).hexdigest() and section["file"] == INT8_FILE
    assert section["runtime"]["name"] == "onnxruntime" and section["runtime"]["version"]
    assert "7-bit" in section["quantization"]["weights"]
    assert section["probe"]["shape"] == [32, 1, 28, 28] and len(section["probe"]["logits"]) == 32
    assert section["calibration"]["certificate"]["n_calibration"] == 3000
    assert section["unfamiliar"]["info"]["fitted_on"] == "training split, 4000 photos"
    agree = section["agreement_with_float_path"]
    assert agree["same_label"] >= 0.99 and 0 < agree["max_abs_probability_difference"] < 0.2


def test_spatial_means_become_global_average_pools_with_the_same_answers(release_model_dir, fmnist_test):
    """The rewrite before quantising changes the graph, not its outputs; the shipped graph pools in int8."""
    import onnx
    import onnxruntime as ort

    from returns_model.artifact import load_model
    from returns_model.export import export_onnx
    from returns_model.preprocess import normalize
    from training.quantize import pools_as_global_average

    model, meta = load_model(release_model_dir)
    graph = export_onnx(model, meta.unfamiliar["layer"], meta.preprocess.channels, meta.preprocess.size)
    rewritten = pools_as_global_average(graph)
    ops = lambda g: [n.op_type for n in onnx.load_from_string(g).graph.node]  # noqa: E731
    assert "ReduceMean" in ops(graph) and "ReduceMean" not in ops(rewritten)
    assert ops(rewritten).count("GlobalAveragePool") == ops(graph).count("ReduceMean")
    x = normalize(fmnist_test[0][:256].unsqueeze(1), meta.preprocess).numpy()
    before, after = (ort.InferenceSession(g, providers=["CPUExecutionProvider"]).run(None, {"pixels": x})
                     for g in (graph, rewritten))
    for b, a in zip(before, after):  # logits and the gate's tapped embedding
        assert b.shape == a.shape and abs(b - a).max() < 1e-4
    shipped = ops((release_model_dir / INT8_FILE).read_bytes())
    assert "ReduceMean" not in shipped and "GlobalAveragePool" in shipped


@pytest.mark.integration
@pytest.mark.slow
def test_torchserve_serves_the_int8_rule_by_default(model_root, release_model_dir, fmnist_test, tmp_path):
    """The shipped archive (default knobs) in a real TorchServe: its answers are the int8 graph's logits
    under the int8 section's temperature, threshold and gate, computed without the handler
    (tests/oracle.py, ``path="int8"``), across the confidence range and on both sides of the threshold."""
    import base64

    import requests

    from scripts.localserve import LocalTorchServe
    from tests.conftest import encode
    from tests.oracle import Oracle, spread_sample
    from tests.test_calibrated_answers import assert_answer

    oracle = Oracle(release_model_dir, path="int8")
    images, _ = fmnist_test
    sample = spread_sample(oracle, images)
    near = sorted(sample, key=lambda e: abs(e.confidence - oracle.threshold))[:4]
    assert {e.needs_review for e in near} == {True, False}
    body = {"instances": [base64.b64encode(encode(images[e.index])).decode() for e in sample]}
    with LocalTorchServe(model_root, workdir=tmp_path / "ts") as server:
        r = requests.post(server.inference_url + "/predictions/returns-classifier", json=body, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == len(sample)
    for result, want in zip(preds, sample):
        assert_answer(result, want, oracle.class_names, tol=1e-4)


def test_the_int8_rule_has_its_own_drift_reference_and_the_manifest_describes_it(int8_classifier, release_model_dir,
                                                                                 model_root, tmp_path):
    """The submitter's drift check compares a night with the served rule's validation answers: the int8
    section carries its own, and the default archive's manifest names the int8 rule and copies it."""
    from handler.serve_config import ServeConfig
    from training.archive import build_archive

    meta = json.loads((release_model_dir / "model.json").read_text())
    ref = meta["int8"]["reference"]
    assert sum(ref["confidence_histogram"]["counts"]) == 5000 and ref["unfamiliar_rate"] == pytest.approx(0.02, abs=1e-3)
    assert int8_classifier.meta.reference == ref
    manifest = json.loads((model_root / "artifact_manifest.json").read_text())
    assert manifest["served_rule"] == "int8" and manifest["reference"] == ref
    assert manifest["references"] == {"float": meta["reference"], "int8": ref}  # whichever rule answers a night
    assert manifest["calibration"]["threshold"] == meta["int8"]["calibration"]["threshold"]
    float_root = tmp_path / "float_root"
    build_archive(release_model_dir, float_root, ServeConfig(cpu_backend="onnx"))
    float_manifest = json.loads((float_root / "artifact_manifest.json").read_text())
    assert float_manifest["served_rule"] == "float" and float_manifest["reference"] == meta["reference"]
    assert float_manifest["references"] == {"float": meta["reference"], "int8": ref}
    assert float_manifest["calibration"] == meta["calibration"]


def test_the_archive_refuses_a_graph_that_is_not_the_one_fitted(release_model_dir, tmp_path, capsys):
    from training.archive import main as archive_main

    folder = tmp_path / "model"
    shutil.copytree(release_model_dir, folder)
    graph = bytearray((folder / INT8_FILE).read_bytes())
    graph[-1] ^= 0xFF
    (folder / INT8_FILE).write_bytes(bytes(graph))
    assert archive_main(["--model-dir", str(folder), "--output", str(tmp_path / "root")]) == 1
    err = capsys.readouterr().err
    assert "returns-archive: " in err and "SHA-256 is not the one model.json's int8 rule was fitted on" in err
    assert not (tmp_path / "root" / "model-store" / "returns-classifier.mar").exists()
