"""Where the network runs: the one answer to ``--device auto|cpu|cuda``, for training, the report,
retraining and the KServe predictor (TorchServe hands each worker its GPU itself).

``auto`` takes the first GPU where CUDA sees one, else the CPU. ``cuda`` without a GPU is an error,
never a silent CPU run that someone believes is on their GPU. The error is an exception, not an
exit: each command turns it into its own exit code and message (docs/exit-codes.md).
"""
from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """The device asked for is not one this machine has, or not a device name at all."""


def available() -> list[str]:
    """What this machine offers: the CPU, and each GPU that CUDA sees."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu"] + [f"cuda:{i}" for i in range(gpus)]


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` -> the torch device; DeviceError saying what was asked for and
    what this machine has when it cannot be had."""
    if device not in DEVICES:
        raise DeviceError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device cuda was asked for, but CUDA sees no GPU (available: {', '.join(available())})")
    return torch.device("cuda:0" if device != "cpu" and torch.cuda.is_available() else "cpu")
