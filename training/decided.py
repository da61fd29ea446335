"""Reviewers' decided photos for a retrain: checked, found by hash, loaded and split.

Every decided photo is found in the photo folders by the SHA-256 of its bytes (the same photo
archived twice is one photo). The decisions are validated (returns_feedback) against those folders,
the champion's class names and optionally the runs; any problem refuses the whole retrain, so a bad
decision file never changes a model. A seeded share of the photos, chosen by hash
(``returns_feedback.decisions.held_out``), is held out: never trained on, written to ``heldout.jsonl``
in the candidate, and read back by returns-compare to judge it. ``not_a_product`` photos are never a
class (they teach the unfamiliar gate); ``unsure`` ones are counted and left out.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from returns_feedback.decisions import NOT_A_PRODUCT, UNSURE, Decision, held_out
from returns_feedback.validate import print_report, read_runs, validate
from returns_model.names import HELDOUT_FILE, IMAGE_SUFFIXES
from returns_model.preprocess import PhotoError, PreprocessSpec, bytes_to_uint8
from training.data import Split



def index_photos(folders: list[str]) -> dict[str, Path]:
    """SHA-256 of every image file under the folders -> its first path (the same photo archived twice
    is one photo)."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.is_symlink():
                found.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
    return found


def decision_files(given: list[str]) -> list[Path]:
    """Files as given; a folder stands for every ``*.jsonl`` and ``*.csv`` in it (sorted)."""
    out: list[Path] = []
    for item in map(Path, given):
        out += sorted(p for p in item.iterdir() if p.suffix.lower() in (".jsonl", ".csv")) if item.is_dir() else [item]
    return out


def check_decisions(decisions: list[str], photos: list[str], runs: list[str],
                    class_names: list[str]) -> tuple[list[Decision], dict[str, Path]] | None:
    """Valid decisions and where their photos are, or None (after printing every problem to stderr)."""
    paths = index_photos(photos)
    files = decision_files(decisions)
    if not files:
        print(f"returns-retrain: no decision files in {decisions}", file=sys.stderr)
        return None
    report = validate(files, set(paths), class_names, where="the photo folders " + ", ".join(photos))
    problems = list(report.problems)
    if runs:
        known = set(read_runs([Path(r) for r in runs]).photos)
        problems += [p for p in validate(files, known, class_names,
                                         where="the given runs").problems if p.code == "unknown_hash"]
    unreadable = []
    for d in report.valid:
        try:
            bytes_to_uint8(paths[d.sha256].read_bytes(), PreprocessSpec())
        except (PhotoError, OSError) as exc:
            unreadable.append(f"{d.source}: photo {paths[d.sha256]} cannot be read: {exc}")
    if problems or unreadable:
        report.problems = problems
        print_report(report, sys.stderr)
        for line in unreadable:
            print(line, file=sys.stderr)
        print("returns-retrain: the decisions have problems; nothing was trained or written", file=sys.stderr)
        return None
    if not any(d.label not in (NOT_A_PRODUCT, UNSURE) for d in report.valid):
        print("returns-retrain: no decision names a product class; nothing to learn", file=sys.stderr)
        return None
    return report.valid, paths


@dataclass
class DecidedPhotos:
    """The decided photos, loaded and split: what trains, what judges, what sharpens the gate."""

    train: Split
    heldout: Split
    train_not_products: torch.Tensor
    heldout_not_products: torch.Tensor
    heldout_rows: list[dict[str, Any]]
    counts: dict[str, int]


def load_decided(decisions: list[Decision], paths: dict[str, Path], class_names: list[str], spec: PreprocessSpec,
                 share: float, seed: int) -> DecidedPhotos:
    index = {c: i for i, c in enumerate(class_names)}
    groups: dict[tuple[bool, bool], list] = {(h, n): [] for h in (False, True) for n in (False, True)}
    rows, unsure = [], 0
    for d in decisions:
        if d.label == UNSURE:
            unsure += 1
            continue
        img = bytes_to_uint8(paths[d.sha256].read_bytes(), spec)
        hold, nap = held_out(d.sha256, share, seed), d.label == NOT_A_PRODUCT
        groups[(hold, nap)].append((img, -1 if nap else index[d.label]))
        if hold:
            rows.append({"sha256": d.sha256, "label": d.label, "path": str(paths[d.sha256].resolve())})

    def stack(items: list, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not items:
            return torch.empty((0, spec.channels, size, size), dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return torch.stack([i for i, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)

    tr, ho = Split(*stack(groups[(False, False)], spec.size)), Split(*stack(groups[(True, False)], spec.size))
    counts = {"decided": len(decisions), "unsure_not_used": unsure, "train_products": len(tr),
              "heldout_products": len(ho), "train_not_a_product": len(groups[(False, True)]),
              "heldout_not_a_product": len(groups[(True, True)])}
    return DecidedPhotos(tr, ho, stack(groups[(False, True)], spec.size)[0], stack(groups[(True, True)], spec.size)[0],
                         sorted(rows, key=lambda r: r["sha256"]), counts)


def load_heldout(challenger: Path, photo_folders: list[str], class_names: list[str], spec) -> dict[str, tuple]:
    """The held-out decided photos recorded by the retrain, by hash (path first, else the folders)."""
    rows = [json.loads(x) for x in (challenger / HELDOUT_FILE).read_text().splitlines() if x.strip()] \
        if (challenger / HELDOUT_FILE).exists() else []
    index = index_photos(photo_folders) if photo_folders else {}
    products, labels, nap = [], [], []
    for r in rows:
        path = Path(r["path"])
        data = path.read_bytes() if path.exists() else None
        if data is None or hashlib.sha256(data).hexdigest() != r["sha256"]:
            if r["sha256"] not in index:
                raise FileNotFoundError(f"held-out photo {r['sha256'][:16]}... is neither at {path} nor in {photo_folders}")
            data = index[r["sha256"]].read_bytes()
        img = bytes_to_uint8(data, spec)
        if r["label"] == NOT_A_PRODUCT:
            nap.append(img)
        else:
            products.append(img)
            labels.append(class_names.index(r["label"]))
    empty = torch.empty((0, spec.channels, spec.size, spec.size), dtype=torch.uint8)
    out = {"heldout": (torch.stack(products) if products else empty, torch.tensor(labels, dtype=torch.long))}
    if nap:
        out["heldout_not_a_product"] = (torch.stack(nap), None)
    return out
