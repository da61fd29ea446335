"""The optimised CPU path (ONNX Runtime on the exported graph) answers what the eager model answers."""
from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from handler.core import Classifier
from handler.serve_config import HandlerKnobs, ServeConfig, model_config_yaml
from returns_model.artifact import load_model
from returns_model.export import export_onnx
from returns_model.names import INT8_FILE, ONNX_FILE

PROB_TOL = 1e-3  # the bound on calibrated probabilities
SCORE_TOL = 1e-3  # unfamiliar scores: the flag is a cutoff on them


@pytest.fixture(scope="session")
def gated_model_dir(release_model_dir, fmnist_test, tmp_path_factory) -> Path:
    """The release model with an unfamiliar-photo gate: its own, or one fitted here on blocks.3 of the
    test split (the statistics only need to be plausible for comparing two forward passes)."""
    meta = json.loads((release_model_dir / "model.json").read_text())
    if meta.get("unfamiliar"):
        return release_model_dir
    from training.gate_fit import choose_cutoff, fit_statistics, forward_with_tap

    model, m = load_model(release_model_dir)
    images, labels = fmnist_test
    pixels = images[:3000].unsqueeze(1)
    _, tapped = forward_with_tap(model, pixels, m.preprocess, "blocks.3")
    gate = fit_statistics(tapped[:2000], labels[:2000], pixels[:2000], "blocks.3", m.arch.num_classes)
    gate = choose_cutoff(gate, tapped[2000:], pixels[2000:], rate=0.02)
    folder = tmp_path_factory.mktemp("gated_model")
    shutil.copy2(release_model_dir / "model.pt", folder / "model.pt")
    (folder / "model.json").write_text(json.dumps({**meta, "unfamiliar": gate.to_dict()}))
    return folder


@pytest.fixture(scope="session")
def both_paths(gated_model_dir) -> tuple[Classifier, Classifier]:
    eager = Classifier(gated_model_dir, warmup=False, cpu_backend="eager")
    fast = Classifier(gated_model_dir, warmup=False, cpu_backend="onnx")
    assert (eager.backend, fast.backend) == ("eager", "onnx")
    return eager, fast


def compare(both_paths, images: torch.Tensor) -> tuple[float, float]:
    """Max |difference| of probabilities and of unfamiliar scores over these uint8 images."""
    eager, fast = both_paths
    pixels = list(images.unsqueeze(1))
    p_e, u_e = eager.scores(pixels)
    p_f, u_f = fast.scores(pixels)
    assert p_e.shape == p_f.shape and u_e.shape == u_f.shape
    return float((p_e - p_f).abs().max()), float((u_e - u_f).abs().max())


def test_onnx_matches_eager_on_real_test_images(both_paths, fmnist_test):
    images, _ = fmnist_test
    dp, du = compare(both_paths, images[:600])  # 600: full passes of 32 and a padded last one
    assert dp < PROB_TOL and du < SCORE_TOL, (dp, du)


@pytest.mark.slow
def test_onnx_matches_eager_on_the_whole_test_split(both_paths, fmnist_test):
    images, _ = fmnist_test
    dp, du = compare(both_paths, images)
    assert len(images) == 10000 and dp < PROB_TOL and du < SCORE_TOL, (dp, du)


def test_results_agree_photo_by_photo(both_paths, fmnist_png):
    eager, fast = both_paths
    photos = [fmnist_png(i) for i in range(40)] + [b"not an image"]
    for a, b in zip(eager.classify(photos), fast.classify(photos)):
        if "error" in a:
            assert a == b
            continue
        assert (a["label"], a["needs_review"], a["review_reason"]) == (b["label"], b["needs_review"], b["review_reason"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=PROB_TOL)


def test_export_is_reproducible_and_two_outputs(release_model_dir):
    model, meta = load_model(release_model_dir)
    a = export_onnx(model, "blocks.3", meta.preprocess.channels, meta.preprocess.size)
    assert a == export_onnx(model, "blocks.3", meta.preprocess.channels, meta.preprocess.size)
    import onnxruntime as ort

    outs = [o.name for o in ort.InferenceSession(a, providers=["CPUExecutionProvider"]).get_outputs()]
    assert outs == ["logits", "tapped"]


def test_the_archive_ships_both_graphs_and_the_worker_uses_the_int8_one(model_root, tmp_path, fmnist_png, fmnist_test):
    with zipfile.ZipFile(model_root / "model-store" / "returns-classifier.mar") as z:
        z.extractall(tmp_path)
    assert (tmp_path / ONNX_FILE).is_file() and (tmp_path / INT8_FILE).is_file()
    knobs = HandlerKnobs.from_model_yaml(model_config_yaml(ServeConfig()))
    clf = Classifier(tmp_path, warmup=False, cpu_backend=knobs.cpu_backend)
    assert knobs.cpu_backend == "onnx-int8" and clf.backend == "onnx-int8"
    assert Classifier(tmp_path, warmup=False, cpu_backend="onnx").backend == "onnx"
    labels = [clf.meta.class_names[int(c)] for c in fmnist_test[1][:8]]
    assert sum(r["label"] == want for r, want in zip(clf.classify([fmnist_png(i) for i in range(8)]), labels)) >= 7


def test_the_session_threads_do_not_spin(both_paths):
    """ONNX Runtime's threads would busy-wait between operators, taking the cores the frontend and
    the submitter share with the worker (docs/history/2026-12-04-readme-round-two.md, performance: 706 against
    621 photos/s served)."""
    from handler.onnx_runner import SPIN_KEY

    opts = both_paths[1]._onnx.session.get_session_options()
    assert opts.get_session_config_entry(SPIN_KEY) == "0" and opts.intra_op_num_threads >= 1


def test_without_onnxruntime_the_core_serves_eager(release_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as on an image without it
    assert Classifier(release_model_dir, warmup=False, cpu_backend="onnx").backend == "eager"


def test_an_unknown_backend_is_refused(release_model_dir):
    with pytest.raises(ValueError, match="onnx, onnx-int8, eager"):
        Classifier(release_model_dir, warmup=False, cpu_backend="tensorrt")


def test_an_export_leaves_the_eager_model_as_it_was(release_model_dir):
    """A server that exports the float graph at start-up may still serve its eager model afterwards (when
    the graph does not answer the float probe): the export must not leave it in training mode."""
    from returns_model.artifact import load_model
    from returns_model.export import export_onnx

    model, meta = load_model(release_model_dir)
    x = torch.rand(4, 1, 28, 28)
    with torch.inference_mode():
        before = model(x)
    export_onnx(model, meta.unfamiliar["layer"], 1, 28)
    with torch.inference_mode():
        after = model(x)
    assert not model.training and torch.equal(before, after)
