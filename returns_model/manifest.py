"""The archive manifest (``artifact_manifest.json``) and the drift reference: hashes, the check
before serving, and the one reader of the references that the submitter compares a night against
(one per rule the archive can serve, and the single ``reference`` older readers know).

    returns-verify-archive /mnt/models      # exit 0 = verified, 1 = refused

Standard library only: it runs in the submitter image as an init container, and locally
before `make serve`, so a tampered or half-copied archive is never served.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from returns_model.meta import int8_reference
from returns_model.names import MANIFEST_FILE, META_FILE
from returns_model.results import FLOAT, INT8

# Confidence histogram edges of the drift reference: most mass sits near 1, so the top is finely cut.
REFERENCE_EDGES = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0]


class ArchiveRefused(RuntimeError):
    """The archive is missing, or differs from what its manifest records."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_digest(file_hashes: dict[str, str]) -> str:
    """SHA-256 over sorted "name  sha256" lines: an archive's identity, computable from its extracted files.

    ``make archive`` records it for the .mar's members; the handler computes it over its model
    folder, so every answer names the exact archive that produced it.
    """
    return hashlib.sha256("".join(f"{n}  {h}\n" for n, h in sorted(file_hashes.items())).encode()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (POSIX relative names), skipping Python byte-code caches."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            out[path.relative_to(root).as_posix()] = sha256_file(path)
    return out


def verify(model_root: Path) -> dict:
    """Return the manifest when the archive matches it; raise ArchiveRefused otherwise."""
    model_root = Path(model_root)
    manifest_path = model_root / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        mar = model_root / manifest["mar_file"]
        expected = manifest["mar_sha256"]
    except FileNotFoundError:
        raise ArchiveRefused(f"{manifest_path}: not found; build it with `make archive`") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveRefused(f"{manifest_path}: unreadable manifest ({exc!r})") from None
    if not mar.resolve().is_relative_to(model_root.resolve()):
        raise ArchiveRefused(f"{manifest_path}: mar_file {manifest['mar_file']!r} points outside {model_root}")
    if not mar.is_file():
        raise ArchiveRefused(f"{mar}: archive named by the manifest is missing")
    actual = sha256_file(mar)
    if actual != expected:
        raise ArchiveRefused(f"{mar}: SHA-256 {actual} does not match {MANIFEST_FILE} ({expected}); "
                             "the archive was changed or copied incompletely: refusing to serve it")
    return manifest


# --- the drift reference ------------------------------------------------------------------

def make_reference(class_names: list[str], class_distribution: list[float], confidence_counts: list[int],
                   n: int, source: str, unfamiliar_rate: float | None = None) -> dict[str, Any]:
    """The reference object stored in model.json (and copied into the manifest): what a normal
    night looks like, as predicted class mix, calibrated-confidence histogram and the share of
    photos the unfamiliar gate flags."""
    if len(confidence_counts) != len(REFERENCE_EDGES) - 1:
        raise ValueError(f"{len(confidence_counts)} histogram counts for {len(REFERENCE_EDGES) - 1} bins")
    ref = {"n": n, "source": source, "class_names": class_names,
           "class_distribution": [round(float(v), 6) for v in class_distribution],
           "confidence_histogram": {"edges": REFERENCE_EDGES, "counts": [int(c) for c in confidence_counts]}}
    if unfamiliar_rate is not None:
        ref["unfamiliar_rate"] = round(float(unfamiliar_rate), 6)
    return ref


@dataclass(frozen=True)
class RuleReference:
    """The reference body that one rule's answers are judged against, and where in the file it is."""

    body: dict[str, Any]
    at: str  # its place in the file: "references.int8", "int8.reference", or "reference"
    fallback: bool  # the file's single `reference`: it has none of the rule's own, or the answers name no rule


@dataclass(frozen=True)
class Reference:
    """A drift reference as read from a manifest or model.json, with where it came from and which
    archive it describes (so a run can say whether the server answered with that archive).

    ``body`` is the file's single reference (a manifest's is the rule its archive serves on a CPU);
    ``by_rule`` holds the references of each rule the file describes, empty in files that hold the
    single reference only, and ``by_rule_at`` where in the file each one is."""

    body: dict[str, Any]
    source: str
    archive_content_sha256: str | None = None
    mar_sha256: str | None = None
    by_rule: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_rule_at: dict[str, str] = field(default_factory=dict)

    def for_rule(self, rule: str | None) -> RuleReference:
        """The body to judge ``rule``'s answers against: that rule's own reference where the file has
        one, else (and for answers that name no rule, ``None``) the single ``reference``."""
        if rule is not None and rule in self.by_rule:
            return RuleReference(self.by_rule[rule], self.by_rule_at[rule], fallback=False)
        return RuleReference(self.body, "reference", fallback=True)


def _usable(body: object) -> bool:
    return isinstance(body, dict) and isinstance(body.get("class_distribution"), list)


def _rule_references(doc: dict[str, Any], path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """rule -> (body, place in the file): a manifest's ``references``, or a model.json's float
    reference (top-level ``reference``) and int8 one (``int8.reference``). A model.json is known by
    its ``arch``, which a manifest does not carry; its int8 section may lack a reference of its own."""
    if "references" in doc:
        refs = doc["references"]
        if not isinstance(refs, dict):
            raise ValueError(f"{path}: references must be an object mapping a rule ({FLOAT}, {INT8}) "
                             f"to its reference, not {type(refs).__name__}")
        found = {str(rule): (body, f"references.{rule}") for rule, body in refs.items()}
    elif "arch" in doc:
        found = {FLOAT: (doc.get("reference"), "reference")}
        if (int8 := int8_reference(doc.get("int8"))) is not None:  # else its answers fall back, as ModelMeta.on_int8 does
            found[INT8] = (int8, "int8.reference")
    else:
        return {}
    for rule, (body, at) in found.items():
        if not _usable(body):
            raise ValueError(f"{path} has no {at}.class_distribution (the reference of the {rule} rule)")
    return found


def read_reference(path: Path) -> Reference:
    """The references of an artifact_manifest.json or model.json, or of a folder holding one.

    Raises OSError when unreadable and ValueError when the file has no usable reference, or a
    per-rule reference that is not one.
    """
    path = Path(path)
    if path.is_dir():
        path = next((p for p in (path / MANIFEST_FILE, path / META_FILE) if p.exists()), path)
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a JSON object")
    body = doc.get("reference", doc)
    if not _usable(body):
        raise ValueError(f"{path} has no reference.class_distribution")
    rules = _rule_references(doc, path)
    return Reference(body=body, source=str(path), archive_content_sha256=doc.get("archive_content_sha256"),
                     mar_sha256=doc.get("mar_sha256"), by_rule={r: b for r, (b, _) in rules.items()},
                     by_rule_at={r: at for r, (_, at) in rules.items()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="returns-verify-archive",
                                description=f"Verify a model root's .mar against its {MANIFEST_FILE}.")
    p.add_argument("model_root", type=Path, help=f"folder with {MANIFEST_FILE} and model-store/")
    args = p.parse_args(argv)
    try:
        manifest = verify(args.model_root)
    except ArchiveRefused as exc:
        print(f"returns-verify-archive: REFUSED: {exc}", file=sys.stderr)
        return 1
    print(f"returns-verify-archive: ok {manifest['mar_file']} sha256 {manifest['mar_sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
