"""The training run's one configuration object; argparse defaults are read from it, and
``validate()`` says, before any work, every setting that cannot work and what is allowed."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from returns_model.device import DEVICES, resolve_device
from returns_model.fileio import write_json
from returns_model.meta import ArchConfig, PreprocessSpec
from returns_model.names import META_FILE, TRAIN_CONFIG_FILE
from training.errors import SettingError, TrainConfigFileError

MIN_IMAGE_SIZE = 8  # PreprocessSpec's smallest side


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

    def validate(self) -> "TrainConfig":
        """Raise SettingError listing every setting that cannot work, with its value and what is
        allowed. What only the data can tell (too few photos, a missing folder) is checked when it is
        loaded (training/data.py, training/requirements.py)."""
        problems = []

        def need(ok: bool, flag: str, value: Any, allowed: str) -> None:
            if not ok:
                problems.append(f"--{flag} {value}: {allowed}")

        for flag, value in (("val-size", self.val_size), ("epochs", self.epochs), ("batch-size", self.batch_size),
                            ("se-reduction", self.se_reduction), ("trust-photos", self.trust_photos),
                            ("top-k", self.top_k)):
            need(value >= 1, flag, value, "must be at least 1")
        for flag, value in (("train-subset", self.train_subset), ("crop-padding", self.crop_padding),
                            ("threads", self.threads), ("tsne-samples", self.tsne_samples)):
            need(value >= 0, flag, value, "must be 0 or more")
        widths, depths = " ".join(map(str, self.widths)), " ".join(map(str, self.depths))
        if not self.widths or len(self.widths) != len(self.depths):
            problems.append(f"--widths {widths} and --depths {depths}: one value each per stage, as many of "
                            "one as of the other")
        need(all(w >= 1 for w in self.widths), "widths", widths, "every width must be at least 1")
        need(all(d >= 1 for d in self.depths), "depths", depths, "every depth must be at least 1")
        need(0 <= self.dropout < 1, "dropout", self.dropout, "must be in [0, 1)")
        need(self.image_size >= MIN_IMAGE_SIZE, "image-size", self.image_size,
             f"must be at least {MIN_IMAGE_SIZE} (pixels a side)")
        need(self.channels in (1, 3), "channels", self.channels, "must be 1 (grey) or 3 (colour)")
        need(self.lr > 0, "lr", self.lr, "must be above 0")
        need(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight-decay", self.weight_decay, "must be 0 or more")
        need(0 <= self.label_smoothing < 1, "label-smoothing", self.label_smoothing, "must be in [0, 1)")
        need(0 <= self.erasing_p <= 1, "erasing-p", self.erasing_p, "must be in [0, 1]")
        need(self.composite_weight >= 0, "composite-weight", self.composite_weight, "must be 0 (off) or more")
        if self.composite_weight > 0:
            need(0 < self.composite_share <= 1, "composite-share", self.composite_share,
                 "must be above 0 and at most 1 (or --composite-weight 0)")
            need(self.batch_size >= 2, "batch-size", self.batch_size,
                 "composites pair a batch's garments: use 2 or more, or --composite-weight 0")
        need(0 <= self.drawn_share <= 1, "drawn-share", self.drawn_share, "must be in [0, 1]")
        need(not self.init_from or (Path(self.init_from) / META_FILE).is_file(), "init-from", self.init_from,
             f"not a model folder ({META_FILE} not found)")
        for flag, value in (("target-precision", self.target_precision), ("delta", self.delta),
                            ("unfamiliar-rate", self.unfamiliar_rate)):
            need(0 < value < 1, flag, value, "must be in (0, 1)")
        blocks = sum(self.depths)
        need(not self.gate_layer or self.gate_layer in {f"blocks.{i}" for i in range(blocks)}, "gate-layer",
             repr(self.gate_layer), f"must be blocks.0 to blocks.{blocks - 1} (the network has {blocks} blocks), "
             "or '' for the middle one")
        need(self.device in DEVICES, "device", repr(self.device), f"must be one of {', '.join(DEVICES)}")
        need(bool(self.output) and not Path(self.output).is_file(), "output", repr(self.output),
             "must name a folder (not a file)")
        need(bool(self.model_version.strip()), "model-version", repr(self.model_version), "must not be empty")
        if problems:
            raise SettingError(problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        """The settings a ``train_config.json`` records; TrainConfigFileError naming the file when it
        is missing, not JSON, or has settings this code does not know."""
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise TrainConfigFileError(f"{path}: not found; is {Path(path).parent} a model folder "
                                       "written by returns-train?") from None
        except (OSError, ValueError) as exc:
            raise TrainConfigFileError(f"{path}: cannot be read as JSON ({exc})") from None
        if not isinstance(d, dict):
            raise TrainConfigFileError(f"{path}: not a JSON object of training settings")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise TrainConfigFileError(f"{path}: unknown training settings {sorted(unknown)}")
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
