"""The training commands refuse what cannot work before doing any: every problem of a config named
with its flag, value and what is allowed, and data or folders they cannot use as one line and a
documented exit code (docs/exit-codes.md), never a traceback."""
from __future__ import annotations

import json
import shutil

import pytest

from training.config import TrainConfig
from training.errors import SettingError, TrainConfigFileError
from training.retrain_config import RetrainConfig


def test_the_defaults_are_a_valid_training_config():
    cfg = TrainConfig()
    assert cfg.validate() is cfg


def test_validate_lists_every_problem_with_its_value_and_what_is_allowed(tmp_path):
    (tmp_path / "a-file").write_text("")
    cfg = TrainConfig(val_size=0, epochs=0, lr=0.0, image_size=4, channels=2, widths=(16, 32), depths=(1,),
                      dropout=1.0, target_precision=1.0, delta=0.0, unfamiliar_rate=1.5, composite_share=0.0,
                      drawn_share=-0.1, gate_layer="blocks.9", device="tpu", trust_photos=0, top_k=0,
                      init_from=str(tmp_path / "nothing"), output=str(tmp_path / "a-file"), model_version=" ")
    with pytest.raises(SettingError) as e:
        cfg.validate()
    expected = ["--val-size 0: must be at least 1", "--epochs 0: must be at least 1",
                "--trust-photos 0: must be at least 1", "--top-k 0: must be at least 1",
                "--widths 16 32 and --depths 1: one value each per stage", "--dropout 1.0: must be in [0, 1)",
                "--image-size 4: must be at least 8", "--channels 2: must be 1 (grey) or 3 (colour)",
                "--lr 0.0: must be above 0", "--composite-share 0.0: must be above 0 and at most 1",
                "--drawn-share -0.1: must be in [0, 1]", f"--init-from {tmp_path / 'nothing'}: not a model folder",
                "--target-precision 1.0: must be in (0, 1)", "--delta 0.0: must be in (0, 1)",
                "--unfamiliar-rate 1.5: must be in (0, 1)", "--gate-layer 'blocks.9': must be blocks.0 to blocks.0",
                "--device 'tpu': must be one of auto, cpu, cuda", f"--output '{tmp_path / 'a-file'}': must name a folder",
                "--model-version ' ': must not be empty"]
    assert len(e.value.problems) == len(expected)
    for says in expected:
        assert any(problem.startswith(says) for problem in e.value.problems), says
    assert str(e.value) == "; ".join(e.value.problems)


def test_composite_rules_apply_only_with_composites():
    TrainConfig(composite_weight=0.0, composite_share=0.0, batch_size=1).validate()
    with pytest.raises(SettingError, match="--batch-size 1: composites pair a batch's garments"):
        TrainConfig(batch_size=1).validate()


def test_train_the_library_raises_instead_of_exiting(tmp_path):
    from training.train import train

    with pytest.raises(SettingError, match=r"--drawn-share 2: must be in \[0, 1\]"):
        train(TrainConfig(drawn_share=2, output=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("layout", ["no fashion-mnist", "no train/"])
def test_returns_train_exits_2_naming_missing_data(tmp_path, caplog, layout):
    from training.train import EXIT_DATA, main

    (tmp_path / "empty").mkdir()
    flag = "--data-dir" if layout == "no fashion-mnist" else "--image-folder"
    assert main([flag, str(tmp_path / "empty"), "--output", str(tmp_path / "m"), "--no-compile"]) == EXIT_DATA == 2
    says = "Fashion-MNIST files" if layout == "no fashion-mnist" else "expected a 'train/<class>/' folder layout"
    assert f"training data: {tmp_path / 'empty'}" in caplog.text and says in caplog.text
    assert not (tmp_path / "m").exists()


def test_returns_train_refuses_a_batch_larger_than_the_training_split(tmp_path, caplog):
    from tests.test_requirements import photo_folder
    from training.train import EXIT_REFUSED, main

    photos = photo_folder(tmp_path / "photos", {"train": {"bags": 20, "belts": 20}})
    args = ["--image-folder", str(photos), "--image-size", "8", "--output", str(tmp_path / "m"), "--no-compile"]
    assert main(args) == EXIT_REFUSED == 1
    assert "--batch-size 128: must be at most 33, the number of training images" in caplog.text
    assert not (tmp_path / "m").exists()


def test_retrain_config_lists_every_problem(tmp_path):
    with pytest.raises(SettingError) as e:
        RetrainConfig(champion=str(tmp_path), lr=0.0, batch_size=0, distill=-1.0, device="tpu").validate()
    assert e.value.problems == [
        f"--champion {str(tmp_path)!r}: not a model folder (no model.json)", "--decisions: at least one file",
        "--photos: at least one folder", "--output: a folder for the candidate", "--batch-size 0: must be at least 1",
        "--distill -1.0: must be 0 or more", "--lr 0.0: must be above 0",
        "--device 'tpu': must be one of auto, cpu, cuda"]


def test_a_missing_or_broken_train_config_names_the_file(tmp_path):
    with pytest.raises(TrainConfigFileError, match=r"train_config.json: not found; is .* a model folder"):
        TrainConfig.of_folder(tmp_path)
    (tmp_path / "train_config.json").write_text("{")
    with pytest.raises(TrainConfigFileError, match="cannot be read as JSON"):
        TrainConfig.of_folder(tmp_path)
    (tmp_path / "train_config.json").write_text('{"epochs": 1, "colour": "red"}')
    with pytest.raises(ValueError, match=r"unknown training settings \['colour'\]"):
        TrainConfig.of_folder(tmp_path)


@pytest.fixture
def bare_copy(release_model_dir, tmp_path):
    """A copy of the release folder's model files, to break one at a time."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("model.pt", "model.json", "train_config.json"):
        shutil.copy(release_model_dir / name, folder / name)
    return folder


def test_returns_report_exits_2_on_a_folder_or_data_it_cannot_use(release_model_dir, bare_copy, tmp_path, capsys):
    from training.report import EXIT_REFUSED, main

    (tmp_path / "empty").mkdir()
    assert main(["--model-dir", str(tmp_path / "empty")]) == EXIT_REFUSED == 2
    assert "train_config.json: not found" in capsys.readouterr().err
    before = (release_model_dir / "metrics.json").read_bytes()
    assert main(["--model-dir", str(release_model_dir), "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"returns-report: {tmp_path / 'empty'}: Fashion-MNIST files") and "nothing was rewritten" in err
    assert (release_model_dir / "metrics.json").read_bytes() == before
    (bare_copy / "model.pt").unlink()
    assert main(["--model-dir", str(bare_copy)]) == 2 and "model.pt: weights not found" in capsys.readouterr().err


def test_quantize_exits_2_on_a_folder_or_data_it_cannot_use(release_model_dir, bare_copy, tmp_path, capsys):
    from training.quantize import EXIT_REFUSED, main

    (tmp_path / "empty").mkdir()
    assert main(["--model-dir", str(tmp_path / "empty")]) == EXIT_REFUSED == 2
    assert "model.json: not found" in capsys.readouterr().err
    assert main(["--model-dir", str(bare_copy), "--data-dir", str(tmp_path / "empty")]) == 2
    assert "Fashion-MNIST files" in capsys.readouterr().err and not (bare_copy / "model.int8.onnx").exists()
    meta = json.loads((bare_copy / "model.json").read_text())
    del meta["unfamiliar"]
    (bare_copy / "model.json").write_text(json.dumps(meta))
    assert main(["--model-dir", str(bare_copy)]) == 2
    assert "model.json has no unfamiliar-photo gate" in capsys.readouterr().err
    (bare_copy / "train_config.json").unlink()
    meta = json.loads((release_model_dir / "model.json").read_text())
    (bare_copy / "model.json").write_text(json.dumps(meta))
    assert main(["--model-dir", str(bare_copy)]) == 2 and "train_config.json: not found" in capsys.readouterr().err


def test_retrain_exits_2_on_runs_without_predictions_or_an_unusable_champion(release_model_dir, bare_copy,
                                                                              one_decision, tmp_path, capsys):
    from training.retrain import EXIT_REFUSED, main

    out = tmp_path / "candidate"
    (tmp_path / "run").mkdir()
    code = main(["--champion", str(release_model_dir), *one_decision, "--output", str(out),
                 "--runs", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == EXIT_REFUSED == 2 and not out.exists()
    assert f"returns-retrain: {tmp_path / 'run'}: no predictions.jsonl" in err and "nothing was trained or written" in err
    (bare_copy / "model.pt").unlink()
    assert main(["--champion", str(bare_copy), *one_decision, "--output", str(out)]) == 2 and not out.exists()
    assert "model.pt: weights not found" in capsys.readouterr().err


def test_retrain_lists_every_setting_problem_on_its_own_line(one_decision, tmp_path, capsys):
    from training.retrain import main

    code = main(["--champion", str(tmp_path), *one_decision, "--output", str(tmp_path / "c"), "--lr", "0",
                 "--epochs", "0"])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2
    assert lines == [f"returns-retrain: --champion {str(tmp_path)!r}: not a model folder (no model.json)",
                     "returns-retrain: --epochs 0: must be at least 1", "returns-retrain: --lr 0.0: must be above 0"]
