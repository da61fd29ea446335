"""Whether a training set can keep the product's promise, worked out from its counts before training.

Two things fitted after training keep the promise, and each needs photos:

- The unfamiliar-photo gate (training/gate_fit.py) fits class means and a tied covariance of the
  tapped embedding on the *training* split: every class needs ``min_photos_per_class`` photos there,
  and the gate's cutoff needs ``min_cutoff_photos`` validation photos. Short of either the gate cannot
  be fitted and the run fails once training is over, so returns-train refuses such data before it.
- The certified threshold (training/certify.py) auto-accepts only where precision >= target is proven
  on *validation*. Even with no error that takes ``min_accepted(1 - target, delta)`` accepted photos,
  and the photos the gate flags are never accepted. With fewer validation photos than that plus the
  gate's flags nothing can be certified, and every photo goes to review.

``assess`` works this out from the counts and ``render`` says it in a few lines; ``for_run`` does it
for the data a training run loaded, ``plan_image_folder`` for a photo folder that does not exist yet.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from returns_model.meta import ArchConfig, PreprocessSpec
from returns_model.names import DATA_REQUIREMENTS_FILE
from training.certify import min_accepted, rejects_risk_above
from training.config import TrainConfig, gate_layer, make_arch
from training.data import Dataset, Split, held_out_test_size, held_out_val_size, hold_out, make_spec
from training.gate_fit import embedding_width, flagged_count, min_cutoff_photos, min_photos_per_class

REPORT_FILE = DATA_REQUIREMENTS_FILE  # the name training/train.py writes it under
MOST_ERRORS_SHOWN = 2  # the report also says how many accepted photos certify with 1..this many errors


@dataclass(frozen=True)
class Holdout:
    """Validation held out of the training photos because no val/ folder was given (training/data.py)."""

    val_size: int  # --val-size
    image_folder: bool  # True: a tenth of what train/ has left after the test hold-out, at most val_size
    test_held_out: bool = False  # the test split is held out of train/ as well (first)


@dataclass(frozen=True)
class DataRequirements:
    """What a training set allows: the gate's needs, the certificate's, and what to add where short."""

    train_counts: dict[str, int]  # class -> photos in the training split
    validation: int  # photos in the validation split
    target_precision: float
    delta: float
    unfamiliar_rate: float
    gate_layer: str
    gate_dim: int  # width of the embedding the gate reads
    gate_min_per_class: int  # training photos every class needs (gate_fit.min_photos_per_class)
    gate_short: dict[str, int]  # class -> training photos it lacks for the gate
    cutoff_min_validation: int  # validation photos the gate's cutoff needs (gate_fit.min_cutoff_photos)
    gate_flagged: int  # validation photos the gate flags at unfamiliar_rate (fewer only on tied scores)
    accepted_needed: list[int]  # [e]: accepted validation photos that certify with e of them wrong
    min_validation: int  # validation photos from which accepted_needed[0] can be accepted beside the flags
    accepted_share: float | None  # accepted_needed[0] / validation: what the model must accept without an error
    validation_to_add: int
    holdout: Holdout | None  # None: validation is a val/ folder
    train_folder_needed: int | None  # photos train/ needs for its own hold-out to give min_validation
    can_finish: bool  # the gate can be fitted; otherwise the run fails after training
    certifiable: bool  # the target can be certified at all on this validation split, beside the gate's flags

    @property
    def min_accepted(self) -> int:
        return self.accepted_needed[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accepted_needed(errors: int, alpha: float, delta: float) -> int:
    """Fewest accepted photos whose ``errors`` wrong ones still prove ``error rate <= alpha`` at ``delta``."""
    n = max(errors + 1, min_accepted(alpha, delta))
    while not rejects_risk_above(errors, n, alpha, delta):
        n += 1
    return n


def _min_validation(need_accepted: int, rate: float) -> int:
    """Fewest validation photos of which ``need_accepted`` remain once the gate has flagged its share."""
    n = max(need_accepted, min_cutoff_photos(rate))
    while n - flagged_count(rate, n) < need_accepted:
        n += 1
    return n


def _train_folder_needed(holdout: Holdout, need: int) -> int | None:
    """Fewest photos in train/ whose default hold-out gives ``need`` validation photos (with a --val-size
    of at least ``need``); None where validation is not a share of train/ (Fashion-MNIST)."""
    if not holdout.image_folder:
        return None
    n = need
    while True:
        left = n - (held_out_test_size(n) if holdout.test_held_out else 0)
        if held_out_val_size(left, need) >= need:
            return n
        n += 1


def _check(train_counts: Mapping[str, int], validation: int, target_precision: float, delta: float,
           unfamiliar_rate: float, gate_dim: int) -> None:
    problems = []
    if len(train_counts) < 2 or any(n < 0 for n in train_counts.values()):
        problems.append(f"train_counts must name at least 2 classes with counts >= 0, got {dict(train_counts)}")
    if validation < 0:
        problems.append(f"validation must be >= 0, got {validation}")
    for name, value in (("target_precision", target_precision), ("delta", delta),
                        ("unfamiliar_rate", unfamiliar_rate)):
        if not 0 < value < 1:
            problems.append(f"{name} must be in (0, 1), got {value}")
    if gate_dim < 1:
        problems.append(f"gate_dim must be >= 1, got {gate_dim}")
    if problems:
        raise ValueError("; ".join(problems))


def assess(train_counts: Mapping[str, int], validation: int, *, target_precision: float, delta: float,
           unfamiliar_rate: float, gate_layer: str, gate_dim: int,
           holdout: Holdout | None = None) -> DataRequirements:
    """What photos in these numbers allow.

    ``train_counts``: photos of each class in the training split (after any hold-out);
    ``validation``: photos in the validation split; ``gate_dim``: width of the embedding the gate reads
    at ``gate_layer`` (gate_fit.embedding_width); ``holdout``: how validation was held out of train/,
    or None for a val/ folder.
    """
    _check(train_counts, validation, target_precision, delta, unfamiliar_rate, gate_dim)
    alpha = 1 - target_precision
    per_class = min_photos_per_class(gate_dim)
    short = {name: per_class - n for name, n in train_counts.items() if n < per_class}
    cutoff_min = min_cutoff_photos(unfamiliar_rate)
    needed = [_accepted_needed(e, alpha, delta) for e in range(MOST_ERRORS_SHOWN + 1)]
    min_val = _min_validation(needed[0], unfamiliar_rate)
    can_finish = not short and validation >= cutoff_min
    return DataRequirements(
        train_counts=dict(train_counts), validation=validation, target_precision=target_precision, delta=delta,
        unfamiliar_rate=unfamiliar_rate, gate_layer=gate_layer, gate_dim=gate_dim, gate_min_per_class=per_class,
        gate_short=short, cutoff_min_validation=cutoff_min, gate_flagged=flagged_count(unfamiliar_rate, validation),
        accepted_needed=needed, min_validation=min_val,
        accepted_share=needed[0] / validation if validation else None,
        validation_to_add=max(0, min_val - validation), holdout=holdout,
        train_folder_needed=_train_folder_needed(holdout, min_val) if holdout else None,
        can_finish=can_finish, certifiable=can_finish and validation >= min_val)


def _assess_for(train_counts: Mapping[str, int], validation: int, holdout: Holdout | None, cfg: TrainConfig,
                arch: ArchConfig, spec: PreprocessSpec) -> DataRequirements:
    layer = gate_layer(cfg, arch)
    return assess(train_counts, validation, target_precision=cfg.target_precision, delta=cfg.delta,
                  unfamiliar_rate=cfg.unfamiliar_rate, gate_layer=layer,
                  gate_dim=embedding_width(arch, spec, layer), holdout=holdout)


def for_run(ds: Dataset, cfg: TrainConfig, arch: ArchConfig, spec: PreprocessSpec) -> DataRequirements:
    """The requirements of the data a training run loaded, for the network and settings it trains with."""
    counts = torch.bincount(ds.train.labels, minlength=len(ds.class_names)).tolist()
    holdout = (Holdout(cfg.val_size, image_folder=bool(cfg.image_folder), test_held_out="test" in ds.held_out)
               if "val" in ds.held_out else None)
    return _assess_for(dict(zip(ds.class_names, counts)), len(ds.val), holdout, cfg, arch, spec)


def _labels_only(counts: list[int]) -> Split:
    labels = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(counts)])
    return Split(torch.empty(len(labels), 0, dtype=torch.uint8), labels)


def plan_image_folder(per_class: Mapping[str, int], cfg: TrainConfig, val_photos: int = 0,
                      test_folder: bool = False) -> DataRequirements:
    """The requirements of a photo folder with ``per_class`` photos in each ``train/<class>/``, all
    readable, split as load_image_folder would split it with ``cfg``'s seed and --val-size.

    ``val_photos``: photos in a val/ folder (0: none, validation is held out of train/);
    ``test_folder``: whether a test/ folder exists (otherwise the test split is held out first).
    """
    names = sorted(per_class)  # load_image_folder numbers the classes in this order
    test_stand_in = _labels_only([1])  # a test/ folder's photos change no other split
    train, val, _ = hold_out(_labels_only([per_class[n] for n in names]), test_stand_in if test_folder else None,
                             _labels_only([val_photos]) if val_photos else None, cfg.val_size, cfg.seed)
    counts = torch.bincount(train.labels, minlength=len(names)).tolist()
    holdout = None if val_photos else Holdout(cfg.val_size, image_folder=True, test_held_out=not test_folder)
    spec = make_spec(cfg)
    return _assess_for(dict(zip(names, counts)), len(val), holdout, cfg, make_arch(cfg, spec, len(names)), spec)


def _gate_problem(req: DataRequirements) -> str | None:
    if req.gate_short:
        return (f"the unfamiliar-photo gate cannot be fitted: {len(req.gate_short)} of {len(req.train_counts)} "
                f"classes have fewer than {req.gate_min_per_class} training photos")
    if req.validation < req.cutoff_min_validation:
        return (f"the unfamiliar-photo gate cannot be fitted: its {req.unfamiliar_rate:.0%} cutoff needs "
                f"{req.cutoff_min_validation} validation photos, there are {req.validation}")
    return None


def _certificate(req: DataRequirements) -> str:
    target = f"precision {req.target_precision:g} at delta {req.delta:g}"
    if req.validation < req.min_validation:
        return (f"cannot certify {target}: {req.min_accepted:,} validation photos must be accepted without an "
                f"error, and of the {req.validation:,} at most {req.validation - req.gate_flagged:,} can be; "
                f"every photo would go to review")
    return (f"can certify {target}, if the model auto-accepts at least {req.min_accepted:,} of the "
            f"{req.validation:,} validation photos ({req.accepted_share:.0%}) without an error")


def verdict(req: DataRequirements) -> str:
    """One line: why a run on this data cannot finish, else whether it can certify, with the deciding numbers."""
    return _gate_problem(req) or _certificate(req)


def _validation_source(req: DataRequirements) -> str:
    if req.holdout is None:
        return "from val/"
    if req.holdout.image_folder:
        after = " after the test hold-out" if req.holdout.test_held_out else ""
        return f"held out of train/: a tenth of it{after}, at most --val-size {req.holdout.val_size}"
    return f"held out of the training set: --val-size {req.holdout.val_size}"


def _to_reach(req: DataRequirements) -> str:
    """Where validation photos would have to come from for the certificate to be reachable."""
    need, more = req.min_validation, req.validation_to_add
    if req.holdout is None:
        return f"add {more:,} photos to val/ (it needs {need:,})"
    if not req.holdout.image_folder:
        return f"hold out at least {need:,} (--val-size {need})"
    raise_size = f" with --val-size {need} or more" if req.holdout.val_size < need else ""
    per_class = math.ceil(req.train_folder_needed / len(req.train_counts))
    return (f"give a val/ folder of at least {need:,} photos kept out of train/, or put at least "
            f"{req.train_folder_needed:,} photos in train/ (about {per_class:,} a class){raise_size}, "
            f"so that its hold-out is {need:,}")


def render(req: DataRequirements) -> str:
    """The report as a few lines of text, each wrapped to 100 columns."""
    counts = sorted(req.train_counts.values())
    spread = f"{counts[0]:,}" if counts[0] == counts[-1] else f"{counts[0]:,} to {counts[-1]:,}"
    if req.gate_short:
        gate = f"{len(req.gate_short)} short: " + ", ".join(
            f"{name!r} has {req.train_counts[name]}" for name in req.gate_short)
    else:
        gate = "all have them"
    cutoff = "enough" if req.validation >= req.cutoff_min_validation else "too few"
    with_errors = ", ".join(f"{n:,} with {e} error{'s' if e > 1 else ''}"
                            for e, n in enumerate(req.accepted_needed) if e)
    lines = [
        f"Data: {len(counts)} classes; training split {sum(counts):,} photos ({spread} a class); "
        f"validation {req.validation:,} photos ({_validation_source(req)}).",
        f"Unfamiliar-photo gate ({req.gate_layer}, {req.gate_dim} dimensions): every class needs "
        f"{req.gate_min_per_class} training photos: {gate}. Its {req.unfamiliar_rate:.0%} cutoff needs "
        f"{req.cutoff_min_validation} validation photos: {cutoff}.",
        f"Certificate (precision >= {req.target_precision:g} with probability >= {1 - req.delta:g}): at least "
        f"{req.min_accepted:,} validation photos auto-accepted without an error ({with_errors}); the gate "
        f"flags {req.gate_flagged} of the {req.validation:,} (a photo it flags is never accepted).",
    ]
    problem, certificate = _gate_problem(req), _certificate(req)
    certificate = certificate[0].upper() + certificate[1:]
    if problem:
        lines.append(f"Cannot finish a run: {problem}.")
    if req.validation < req.min_validation:
        lines.append(f"{certificate}. To certify, {_to_reach(req)}.")
    elif not problem:
        lines.append(f"{certificate}.")
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="  ", break_on_hyphens=False) for line in lines)
