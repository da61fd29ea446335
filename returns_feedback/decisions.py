"""The reviewers' decisions format (version 1), its parser, and the checks that need no run.

One record per decided photo, keyed by the SHA-256 of the photo's bytes (the ``sha256`` the
submitter records in predictions.jsonl and review_queue.jsonl). JSONL, one object a line::

    {"format_version": 1, "sha256": "<64 hex>", "label": "Coat", "reviewer": "ana",
     "decided_at": "2024-05-02T09:14:00Z"}

or CSV with the header ``format_version,sha256,label,reviewer,decided_at`` (optional columns
``run_id`` and ``note`` in both). ``label`` is one of the model's class names, ``not_a_product`` (the
photo shows none of the products: it must stay flagged, never become a class) or ``unsure`` (the
reviewer could not decide: recorded, never trained on).

Parsing never drops a line silently: every line that is not a valid record becomes a ``Problem``
with its file, line number and code; valid records keep where they came from.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

FORMAT_VERSION = 1
NOT_A_PRODUCT = "not_a_product"
UNSURE = "unsure"
SPECIAL_LABELS = (NOT_A_PRODUCT, UNSURE)
REQUIRED = ("format_version", "sha256", "label", "reviewer", "decided_at")
OPTIONAL = ("run_id", "note")
CSV_COLUMNS = REQUIRED + OPTIONAL
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Problem codes, in the order a report lists them; every one makes validation fail.
CODES = {
    "unreadable": "the file cannot be read",
    "truncated": "the last line is cut short (no newline and not a complete record)",
    "malformed": "not a JSON object / not a CSV row of the header's width",
    "bad_version": f"format_version is not {FORMAT_VERSION}",
    "missing_field": f"a required field is missing or empty ({', '.join(REQUIRED)})",
    "bad_field": "a field has the wrong form (sha256: 64 lowercase hex; decided_at: ISO 8601 with a time zone)",
    "unknown_label": "label is neither a class name nor not_a_product / unsure",
    "unknown_hash": "the photo is in none of the given runs (or photo folders)",
    "duplicate": "the same photo decided again with the same label",
    "conflict": "the same photo decided with different labels",
}


@dataclass(frozen=True)
class Decision:
    sha256: str
    label: str
    reviewer: str
    decided_at: str
    source: str  # "<file>:<line>"
    run_id: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Problem:
    code: str
    source: str  # "<file>:<line>" (or just the file)
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.code}: {self.message}"


@dataclass
class Parsed:
    """Everything read from decision files: the valid records and every problem, nothing else."""

    decisions: list[Decision] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    lines: int = 0  # non-blank lines (records) seen


def _check_record(rec: dict, source: str) -> Decision | Problem:
    missing = [k for k in REQUIRED if rec.get(k) in (None, "")]
    if missing:
        return Problem("missing_field", source, f"missing {', '.join(missing)}")
    try:
        version = int(rec["format_version"])
    except (TypeError, ValueError):
        version = None
    if version != FORMAT_VERSION:
        return Problem("bad_version", source, f"format_version {rec['format_version']!r}; this reader takes {FORMAT_VERSION}")
    sha = str(rec["sha256"])
    if not _SHA256.fullmatch(sha):
        return Problem("bad_field", source, f"sha256 {sha[:70]!r} is not 64 lowercase hex digits")
    when = str(rec["decided_at"])
    try:
        stamp = datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        stamp = None
    if stamp is None or stamp.tzinfo is None:
        return Problem("bad_field", source, f"decided_at {when[:40]!r} is not an ISO 8601 time with a time zone")
    extra = {k: str(rec[k]) for k in OPTIONAL if rec.get(k) not in (None, "")}
    return Decision(sha256=sha, label=str(rec["label"]), reviewer=str(rec["reviewer"]), decided_at=when,
                    source=source, **extra)


def _jsonl_records(text: str, name: str) -> Iterable[tuple[str, dict | Problem]]:
    lines = text.split("\n")
    last = len(lines) - 1  # text ending in "\n" leaves an empty last piece
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        source = f"{name}:{i}"
        try:
            rec = json.loads(line)
        except ValueError as exc:
            code = "truncated" if i - 1 == last else "malformed"
            yield source, Problem(code, source, f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(rec, dict):
            yield source, Problem("malformed", source, f"a JSON {type(rec).__name__}, not an object")
            continue
        yield source, rec


def _csv_records(text: str, name: str) -> Iterable[tuple[str, dict | Problem]]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return
    header = [h.strip() for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in CSV_COLUMNS]
    if missing or unknown:
        yield f"{name}:1", Problem("malformed", f"{name}:1", f"CSV header lacks {missing} / has unknown columns "
                                   f"{unknown}; expected {', '.join(REQUIRED)} (+ {', '.join(OPTIONAL)})")
        return
    truncated_tail = not text.endswith("\n")
    # csv.reader numbers physical lines; quoted newlines are not allowed in this format, so row i is line i.
    for i, row in enumerate(rows[1:], 2):
        if not any(c.strip() for c in row):
            continue
        source = f"{name}:{i}"
        if len(row) != len(header):
            code = "truncated" if truncated_tail and i == len(rows) else "malformed"
            yield source, Problem(code, source, f"{len(row)} fields for a header of {len(header)}")
            continue
        yield source, dict(zip(header, (c.strip() for c in row)))


def read_decisions(paths: Iterable[Path]) -> Parsed:
    """Parse decision files (``.csv`` by suffix, otherwise JSONL); no cross-record checks yet."""
    out = Parsed()
    for path in paths:
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            out.problems.append(Problem("unreadable", str(path), str(exc)))
            continue
        records = _csv_records(text, str(path)) if path.suffix.lower() == ".csv" else _jsonl_records(text, str(path))
        for source, rec in records:
            out.lines += 1
            item = rec if isinstance(rec, Problem) else _check_record(rec, source)
            (out.problems if isinstance(item, Problem) else out.decisions).append(item)
    return out


def check_labels(decisions: list[Decision], class_names: Iterable[str]) -> list[Problem]:
    allowed = set(class_names) | set(SPECIAL_LABELS)
    shown = ", ".join(sorted(set(class_names))) + f" or {NOT_A_PRODUCT} / {UNSURE}"
    return [Problem("unknown_label", d.source, f"label {d.label!r} is not one of: {shown}")
            for d in decisions if d.label not in allowed]


def check_hashes(decisions: list[Decision], known: set[str], where: str) -> list[Problem]:
    return [Problem("unknown_hash", d.source, f"photo {d.sha256[:16]}... is in none of {where}")
            for d in decisions if d.sha256 not in known]


def check_repeats(decisions: list[Decision]) -> list[Problem]:
    """A photo decided twice: the same label is a duplicate, another label a conflict (every record
    after the first is reported, naming the first)."""
    first: dict[str, Decision] = {}
    problems = []
    for d in decisions:
        seen = first.setdefault(d.sha256, d)
        if seen is d:
            continue
        if seen.label == d.label:
            problems.append(Problem("duplicate", d.source, f"photo {d.sha256[:16]}... already decided "
                                    f"{d.label!r} at {seen.source}"))
        else:
            problems.append(Problem("conflict", d.source, f"photo {d.sha256[:16]}... decided {d.label!r} here "
                                    f"but {seen.label!r} at {seen.source} ({seen.reviewer})"))
    return problems


def decisions_hash(decisions: Iterable[Decision]) -> str:
    """The identity of a set of decisions: SHA-256 over sorted ``"<sha256> <label>"`` lines (who decided
    and when, and the files' order, do not change what a model learns)."""
    lines = sorted(f"{d.sha256} {d.label}\n" for d in decisions)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def split_hash(photo_hashes: Iterable[str]) -> str:
    """SHA-256 over the sorted photo hashes of a split (e.g. the held-out decided photos)."""
    return hashlib.sha256("".join(f"{h}\n" for h in sorted(photo_hashes)).encode()).hexdigest()


def held_out(photo_sha256: str, share: float, seed: int) -> bool:
    """Whether a photo is held out, from its hash and a seed alone: the same photo lands on the same
    side in every retrain with that seed, whichever files or order the decisions came in."""
    if not 0 <= share < 1:
        raise ValueError(f"held-out share must be in [0, 1), got {share}")
    u = int(hashlib.sha256(f"{seed}:{photo_sha256}".encode()).hexdigest()[:13], 16) / 16 ** 13
    return u < share
