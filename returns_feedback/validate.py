"""Validate decision files against the runs they refer to: ``returns-feedback validate``.

    returns-feedback validate --decisions night1.jsonl extra.csv --runs /data/results/run_2024...

Every problem is printed as ``<file>:<line>: <code>: <message>``, then a count per code; the exit
code is 0 when every record is valid, 1 when anything is wrong, 2 for bad arguments. Nothing is
dropped silently: ``records = valid + problems`` always holds, and the summary says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from returns_feedback.decisions import (CODES, Decision, Parsed, Problem, check_hashes, check_labels,
                                        check_repeats, read_decisions)
from returns_model.meta import ArtifactError, read_meta
from returns_model.names import PREDICTIONS_FILE, shard_file
from returns_model.results import LABEL, TOP_K


class RunError(RuntimeError):
    """A run folder has no predictions to validate against."""


@dataclass
class RunPhotos:
    """What the runs know: photo hashes (with the run that saw each) and the class names they use."""

    photos: dict[str, str] = field(default_factory=dict)  # sha256 -> run folder name
    class_names: set[str] = field(default_factory=set)


def read_runs(run_dirs: Iterable[Path]) -> RunPhotos:
    """Photo hashes and labels from each run's predictions (the merged file, else the shards')."""
    out = RunPhotos()
    for run in map(Path, run_dirs):
        shards = shard_file(PREDICTIONS_FILE, "*", "*")
        files = [run / PREDICTIONS_FILE] if (run / PREDICTIONS_FILE).exists() else sorted(run.glob(shards))
        if not files:
            raise RunError(f"{run}: no {PREDICTIONS_FILE} (or {shards}); is it a run folder?")
        for path in files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:
                        continue  # a journal's torn last line: the submitter ignores it too
                    if isinstance(r, dict) and r.get("sha256"):
                        out.photos.setdefault(r["sha256"], run.name)
                        out.class_names.add(str(r.get(LABEL)))
                        out.class_names.update(str(t.get(LABEL)) for t in r.get(TOP_K) or [])
    out.class_names.discard("None")
    return out


def model_class_names(model_dir: Path) -> list[str]:
    """The labels a model folder allows: its class names (ArtifactError when model.json is missing or malformed)."""
    return list(read_meta(model_dir).class_names)


@dataclass
class Report:
    parsed: Parsed
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def valid(self) -> list[Decision]:
        bad = {p.source for p in self.problems}
        return [d for d in self.parsed.decisions if d.source not in bad]

    def counts(self) -> dict[str, int]:
        c = Counter(p.code for p in self.problems)
        return {code: c[code] for code in CODES if c[code]}

    def to_dict(self) -> dict:
        labels = Counter(d.label for d in self.valid)
        return {"ok": self.ok, "records": self.parsed.lines, "valid": len(self.valid),
                "with_problems": len({p.source for p in self.problems}), "problem_counts": self.counts(),
                "valid_labels": dict(sorted(labels.items())),
                "problems": [{"source": p.source, "code": p.code, "message": p.message} for p in self.problems]}


def validate(decision_files: list[Path], known: set[str] | None, class_names: Iterable[str],
             where: str = "the given runs") -> Report:
    """Parse, then check labels, hashes (when ``known`` is given) and repeats, in file order."""
    parsed = read_decisions(decision_files)
    problems = list(parsed.problems)
    problems += check_labels(parsed.decisions, class_names)
    if known is not None:
        problems += check_hashes(parsed.decisions, known, where)
    problems += check_repeats(parsed.decisions)
    order = {str(Path(p)): i for i, p in enumerate(decision_files)}

    def key(p: Problem) -> tuple:
        file, _, line = p.source.rpartition(":")
        return (order.get(file, len(order)), int(line) if line.isdigit() else 0, list(CODES).index(p.code))

    return Report(parsed, sorted(problems, key=key))


def print_report(report: Report, out=None) -> None:
    out = out or sys.stdout
    for p in report.problems:
        print(str(p), file=out)
    d = report.to_dict()
    print(f"{d['records']} records: {d['valid']} valid, {d['with_problems']} with problems"
          + "".join(f"; {code} {n}" for code, n in d["problem_counts"].items()), file=out)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="returns-feedback", description="Reviewers' decisions: check them before "
                                "they reach a model (format: docs/interfaces.md, 'Reviewers' decisions').")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check decision files against the runs' predictions")
    v.add_argument("--decisions", nargs="+", required=True, type=Path, help="JSONL or .csv decision files")
    v.add_argument("--runs", nargs="+", required=True, type=Path, help=f"run folders (with {PREDICTIONS_FILE})")
    v.add_argument("--model", type=Path, default=None,
                   help="model folder whose class names are the allowed labels (default: the labels the runs use)")
    v.add_argument("--json", action="store_true", help="print the report as JSON instead of lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        runs = read_runs(args.runs)
        names = model_class_names(args.model) if args.model else sorted(runs.class_names)
    except (RunError, ArtifactError, OSError, ValueError) as exc:
        print(f"returns-feedback: {exc}", file=sys.stderr)
        return 2
    report = validate(args.decisions, set(runs.photos), names,
                      where=f"{len(args.runs)} run(s): " + ", ".join(r.name for r in args.runs))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
