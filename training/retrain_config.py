"""The retrain's one configuration object (``returns-retrain``'s flags read their defaults from it);
``validate()`` lists every setting that cannot work and what is allowed."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from returns_model.device import DEVICES
from returns_model.names import META_FILE
from training.errors import SettingError


@dataclass
class RetrainConfig:
    champion: str = ""
    decisions: list[str] = field(default_factory=list)
    photos: list[str] = field(default_factory=list)
    output: str = ""
    runs: list[str] = field(default_factory=list)  # optional: decisions must also name photos of these runs
    holdout_share: float = 0.2  # of the decided photos, by hash: never trained on
    seed: int = 0
    epochs: int = 4
    replay: int = 30000  # training-split photos per epoch (a fresh draw each epoch), so nothing is forgotten
    decided_repeat: int = 6  # each decided photo appears this many times per epoch
    lr: float = 0.01  # peak of a one-cycle schedule annealed to 0: a nudge, not a new training run
    distill: float = 3.0  # weight of keeping the champion's answers on replayed photos (0 = plain fine-tuning)
    distill_temperature: float = 2.0
    batch_size: int = 128
    gate_photos: int = 20000  # training photos the gate's statistics are fitted on (0 = all 55,000)
    trust_photos: int = 200
    data_dir: str | None = None  # override the champion's data folder
    device: str = "auto"
    threads: int = 0
    progress: bool = True
    model_version: str = ""  # default: the champion's, with the last number raised by one
    int8: bool = True  # also the int8 CPU graph, its rule fitted on its own outputs with the same decisions
    # of replayed photos shown on a new setup's backdrop (training/backdrop.py); 0 = off. Needs a
    # training split with a plain backdrop; without one it is off, with a warning.
    backdrop_share: float = 0.3
    # candidate = interpolate * fine-tuned + (1 - interpolate) * champion, weight by weight (WiSE-FT)
    interpolate: float = 1.0

    def validate(self) -> "RetrainConfig":
        """Raise SettingError listing every setting that cannot work, with its value and what is
        allowed. The decisions themselves are checked next (training/decided.py)."""
        errors = []
        if not self.champion or not (Path(self.champion) / META_FILE).exists():
            errors.append(f"--champion {self.champion!r}: not a model folder (no {META_FILE})")
        if not self.decisions:
            errors.append("--decisions: at least one file")
        if not self.photos:
            errors.append("--photos: at least one folder")
        if not self.output:
            errors.append("--output: a folder for the candidate")
        elif (Path(self.output) / META_FILE).exists():
            errors.append(f"--output {self.output}: already holds a model; versions are immutable, pick a new folder")
        elif Path(self.output).is_file():
            errors.append(f"--output {self.output}: a file; name a folder for the candidate")
        if not 0 <= self.holdout_share < 1:
            errors.append(f"--holdout-share {self.holdout_share}: must be in [0, 1)")
        if not 0 <= self.backdrop_share <= 1:
            errors.append(f"--backdrop-share {self.backdrop_share}: must be in [0, 1]")
        if not 0 < self.interpolate <= 1:
            errors.append(f"--interpolate {self.interpolate}: must be in (0, 1] (1 = the fine-tuned weights as they are)")
        for flag, value in (("epochs", self.epochs), ("decided-repeat", self.decided_repeat),
                            ("batch-size", self.batch_size), ("trust-photos", self.trust_photos)):
            if value < 1:
                errors.append(f"--{flag} {value}: must be at least 1")
        for flag, value in (("replay", self.replay), ("gate-photos", self.gate_photos), ("threads", self.threads),
                            ("distill", self.distill)):
            if value < 0:
                errors.append(f"--{flag} {value}: must be 0 or more")
        for flag, value in (("lr", self.lr), ("distill-temperature", self.distill_temperature)):
            if not value > 0:
                errors.append(f"--{flag} {value}: must be above 0")
        if self.device not in DEVICES:
            errors.append(f"--device {self.device!r}: must be one of {', '.join(DEVICES)}")
        if errors:
            raise SettingError(errors)
        return self


def next_version(version: str) -> str:
    """'1.0' -> '1.1', '1.0.0' -> '1.0.1', 'v3' -> 'v3.1'."""
    head, _, last = version.rpartition(".")
    return f"{head}.{int(last) + 1}" if head and last.isdigit() else f"{version}.1"
