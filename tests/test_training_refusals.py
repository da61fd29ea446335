"""The training commands refuse what cannot work before doing any: every problem of a config named
with its flag, value and what is allowed, and data or folders they cannot use as one line and a
documented exit code (docs/exit-codes.md), never a traceback."""
from __future__ import annotations

import pytest

from training.config import TrainConfig
from training.errors import SettingError, TrainConfigFileError


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


def test_a_missing_or_broken_train_config_names_the_file(tmp_path):
    with pytest.raises(TrainConfigFileError, match=r"train_config.json: not found; is .* a model folder"):
        TrainConfig.of_folder(tmp_path)
    (tmp_path / "train_config.json").write_text("{")
    with pytest.raises(TrainConfigFileError, match="cannot be read as JSON"):
        TrainConfig.of_folder(tmp_path)
    (tmp_path / "train_config.json").write_text('{"epochs": 1, "colour": "red"}')
    with pytest.raises(ValueError, match=r"unknown training settings \['colour'\]"):
        TrainConfig.of_folder(tmp_path)


