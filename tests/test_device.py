"""The one device choice (returns_model/device.py): what `--device` gives, the error that says what
was asked for and what the machine has, and each command's exit code for it (docs/exit-codes.md)."""
from __future__ import annotations

import pytest
import torch

from returns_model.device import DeviceError, available, resolve_device
from training.config import TrainConfig, pick_device

NO_GPU = "--device cuda was asked for, but CUDA sees no GPU (available: cpu)"


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_takes_the_gpu_where_there_is_one_and_the_cpu_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert available() == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda:0") == resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    assert available() == ["cpu", "cuda:0", "cuda:1"]


def test_a_device_the_machine_lacks_is_an_error_naming_what_it_has(no_gpu):
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda")
    assert str(e.value) == NO_GPU
    with pytest.raises(DeviceError, match="must be auto, cpu or cuda, not 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match="CUDA sees no GPU"):  # training asks the same question the same way
        pick_device(TrainConfig(device="cuda"))
    assert issubclass(DeviceError, ValueError)  # returns-kserve's refusal of a setting (exit 2) covers it


def test_report_and_train_exit_1_with_the_reason(no_gpu, release_model_dir, tmp_path, capsys, caplog):
    from training.report import main as report_main
    from training.train import main as train_main

    before = (release_model_dir / "metrics.json").read_bytes()
    assert report_main(["--model-dir", str(release_model_dir), "--device", "cuda"]) == 1
    assert f"returns-report: {NO_GPU}" in capsys.readouterr().err
    assert (release_model_dir / "metrics.json").read_bytes() == before
    assert train_main(["--device", "cuda", "--output", str(tmp_path / "out")]) == 1
    assert NO_GPU in caplog.text and not (tmp_path / "out").exists()


def test_retrain_exits_1_with_the_reason_before_writing_anything(no_gpu, release_model_dir, one_decision, tmp_path,
                                                                    capsys):
    from training.retrain import main as retrain_main

    out = tmp_path / "candidate"
    assert retrain_main(["--champion", str(release_model_dir), *one_decision, "--output", str(out),
                         "--device", "cuda"]) == 1
    assert f"returns-retrain: {NO_GPU}" in capsys.readouterr().err and not out.exists()
