"""A short real training run learns, writes a complete model folder, resumes, and stops on NaN."""
import hashlib
import json

import pytest

from training.train import main as train_main

pytestmark = pytest.mark.slow
TINY = ["--train-subset", "3000", "--val-size", "1000", "--widths", "16", "32", "--depths", "1", "1",
        "--batch-size", "64", "--tsne-samples", "100", "--no-progress", "--no-compile", "--trust-photos", "40"]


def test_short_run_learns_and_writes_the_report(tmp_path, monkeypatch):
    from handler import core
    from training import pipeline

    def no_reload(*args, **kwargs):
        raise AssertionError("the pipeline read a model back from disk")

    writes, write_meta = [], pipeline.write_meta
    monkeypatch.setattr(core, "load_model", no_reload)  # the trust reports serve what the pipeline holds
    monkeypatch.setattr(pipeline, "write_meta", lambda meta, d: (writes.append(meta), write_meta(meta, d)))
    out = tmp_path / "m"
    assert train_main(TINY + ["--epochs", "2", "--output", str(out)]) == 0
    assert len(writes) == 1 and writes[0].int8  # model.json once, at the end, with every section
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.5  # chance is 0.1
    assert metrics["test_size"] == 10000
    assert metrics["nll_after_calibration"] <= metrics["nll_before_calibration"] + 1e-6
    for name in ("model.pt", "model.json", "train_config.json", "data_requirements.json", "history.jsonl",
                 "confusion_matrix.png", "reliability_diagram.png", "risk_coverage.png", "tsne_embeddings.png"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "history.jsonl").read_text().splitlines()) == 2
    needs = json.loads((out / "data_requirements.json").read_text())
    assert (sum(needs["train_counts"].values()), needs["validation"], needs["certifiable"]) == (3000, 1000, True)
    meta = json.loads((out / "model.json").read_text())
    assert sum(meta["reference"]["class_distribution"]) == pytest.approx(1.0, abs=1e-4)
    # the int8 CPU path comes with every trained model: its graph, and a rule fitted on its outputs
    int8 = meta["int8"]
    assert int8["sha256"] == hashlib.sha256((out / "model.int8.onnx").read_bytes()).hexdigest()
    assert int8["calibration"]["certificate"]["n_calibration"] == 1000 and "unfamiliar_kinds_routed" in int8["trust"]
    assert metrics["int8"]["agreement_with_float_path"]["n"] == 10000


def test_no_int8_skips_the_quantised_path(tmp_path):
    out = tmp_path / "m"
    assert train_main(TINY + ["--epochs", "1", "--no-int8", "--output", str(out)]) == 0
    assert "int8" not in json.loads((out / "model.json").read_text()) and not (out / "model.int8.onnx").exists()


def test_compiled_training_learns_and_saves_plain_weights(tmp_path):
    """The default path compiles the training forward; the saved weights must load without it."""
    import torch

    from returns_model.artifact import load_model

    out = tmp_path / "m"
    args = [a for a in TINY if a != "--no-compile"]
    assert train_main(args + ["--epochs", "2", "--output", str(out), "--tsne-samples", "0"]) == 0
    assert json.loads((out / "train_config.json").read_text())["compile"] is True
    assert json.loads((out / "metrics.json").read_text())["accuracy"] > 0.5
    state = torch.load(out / "model.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state)  # no torch.compile wrapper in the artifact
    load_model(out)


def test_resume_continues_after_the_last_checkpoint(tmp_path, caplog):
    out = tmp_path / "m"
    args = TINY + ["--epochs", "1", "--output", str(out), "--tsne-samples", "0"]
    assert train_main(args) == 0
    caplog.clear()
    with caplog.at_level("INFO", logger="training"):
        assert train_main(args) == 0
    assert "resuming after epoch 1" in caplog.text
    assert len((out / "history.jsonl").read_text().splitlines()) == 1


def test_nan_loss_stops_with_a_clear_code(tmp_path, caplog):
    code = train_main(TINY + ["--epochs", "1", "--lr", "1e12", "--output", str(tmp_path / "m")])
    assert code == 3
    assert "lower --lr" in caplog.text


def test_without_a_compiler_training_falls_back_to_eager(monkeypatch, caplog):
    import torch

    from training import train as train_mod
    from training.config import TrainConfig
    from returns_model.meta import ArchConfig
    from returns_model.network import build_model

    model = build_model(ArchConfig(widths=(8,), depths=(1,)))
    monkeypatch.setattr(train_mod.shutil, "which", lambda name: None)
    with caplog.at_level("WARNING", logger="training"):
        assert train_mod.compiled_forward(model, TrainConfig(), torch.device("cpu")) is model
    assert "eager mode" in caplog.text
    assert train_mod.compiled_forward(model, TrainConfig(compile=False), torch.device("cpu")) is model
