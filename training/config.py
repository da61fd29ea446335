"""The training run's one configuration object; argparse defaults are read from it."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from returns_model.device import resolve_device
from returns_model.fileio import write_json
from returns_model.meta import ArchConfig, PreprocessSpec
from returns_model.names import TRAIN_CONFIG_FILE


@dataclass
class TrainConfig:
    # data
    data_dir: str | None = None  # Fashion-MNIST IDX folder; None = Debian's, else torchvision download into data/
    image_folder: str | None = None  # a shop's own photos: train/<class>/* (+ optional val/, test/)
    val_size: int = 5000
    train_subset: int = 0  # >0: train on this many images only (smoke tests)
    # model
    widths: tuple[int, ...] = (24, 48, 96)
    depths: tuple[int, ...] = (2, 2, 2)
    se_reduction: int = 8
    # Light regularisation (no dropout): in an 18-epoch run the network still underfit (train accuracy
    # under augmentation ended near validation's), and this setting scored higher on validation.
    dropout: float = 0.0
    flip_average: bool = True  # serve the mean of each photo and its mirror image (needs hflip training)
    image_size: int = 28
    channels: int = 1
    # optimisation
    epochs: int = 35  # ~6 s each on an H100; ~2.5 min each on 2 CPU cores without composites
    batch_size: int = 128
    lr: float = 0.2  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0  # hurts confidence ranking (AURC), which review routing relies on
    crop_padding: int = 2
    hflip: bool = True
    erasing_p: float = 0.1
    # Outlier exposure on composites of the batch's garments (training/composite.py): blends and tiles,
    # trained towards a uniform answer with this weight (0 = off) and this many per batch image.
    composite_weight: float = 0.5  # Hendrycks et al.'s weight; the release is trained with it
    composite_share: float = 0.25
    # Of those uniform-answer slots, this share goes to drawn outliers (training/drawn.py: pen strokes,
    # lines of print).
    drawn_share: float = 0.5
    init_from: str = ""  # a model folder whose weights the run starts from (same architecture); "" = random
    # calibration and routing
    target_precision: float = 0.99
    delta: float = 0.05  # the certified threshold fails its precision with probability at most delta
    unfamiliar_rate: float = 0.02  # share of ordinary validation photos the unfamiliar gate may flag
    gate_layer: str = ""  # block whose pooled output the gate reads; "" = the middle block (blocks.3 of 6)
    trust_photos: int = 1000  # photos of each unfamiliar kind in the trust report
    int8: bool = True  # also build the int8 CPU graph and fit its own review rule (training/quantize.py)
    top_k: int = 3
    # run
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads; 0 = all cores
    compile: bool = True  # torch.compile the training forward (~14% faster per epoch on a 2-core CPU)
    output: str = "models/release"
    resume: bool = True
    progress: bool = True
    tsne_samples: int = 2000
    model_version: str = "1.2"  # the version model.json and the archive give the model this run writes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        d = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{path}: unknown training settings {sorted(unknown)}")
        for key in ("widths", "depths"):
            if key in d:
                d[key] = tuple(d[key])
        # a train_config.json without these settings comes from a run that had no composites or drawn outliers
        d.setdefault("composite_weight", 0.0)
        d.setdefault("drawn_share", 0.0)
        return cls(**d)

    @classmethod
    def of_folder(cls, model_dir: Path, data_dir: str | None = None) -> "TrainConfig":
        """What a model folder's ``train_config.json`` records, its data folder overridden where given."""
        cfg = cls.from_json(Path(model_dir) / TRAIN_CONFIG_FILE)
        if data_dir:
            cfg.data_dir = data_dir
        return cfg


def make_arch(cfg: TrainConfig, spec: PreprocessSpec, num_classes: int) -> ArchConfig:
    return ArchConfig(in_channels=spec.channels, num_classes=num_classes, widths=cfg.widths,
                      depths=cfg.depths, se_reduction=cfg.se_reduction, dropout=cfg.dropout,
                      flip_average=cfg.flip_average and cfg.hflip)  # mirror views only if trained on them


def gate_layer(cfg: TrainConfig, arch: ArchConfig) -> str:
    """The block the gate reads: the configured one, else the middle block of the network."""
    return cfg.gate_layer or f"blocks.{sum(arch.depths) // 2}"


def pick_device(cfg: TrainConfig) -> torch.device:
    """The config's device (returns_model.device.resolve_device: DeviceError where this machine has
    no such device), with the CPU's thread count set."""
    dev = resolve_device(cfg.device)
    if dev.type == "cpu":
        torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    return dev
