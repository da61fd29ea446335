"""Every file a run leaves for its readers, derived from the journal: predictions.csv,
review_queue.jsonl, run_metadata.json (one shard's, and the run's merged one), `_SUCCESS`
and `<output>/LATEST`. (The journal's own append-only files are returns_submit.journal's.)

Everything here is regenerated from the JSONL journal in one streaming pass, so it
stays consistent with predictions.jsonl after any number of resumes, and is written
atomically (temporary file + fsync + rename): a reader never sees half a file.
"""
from __future__ import annotations

import csv
import json
import os
from array import array
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from returns_model.fileio import atomic_open, write_json, write_text
from returns_model.manifest import Reference
from returns_submit import drift
from returns_submit.drift import bin_index
from returns_submit.faults import fault_point
from returns_submit.journal import blocking_lock, read_records, shard_file_names
from returns_submit.log import event

CSV_COLUMNS = ("path", "sha256", "label", "class_id", "confidence", "needs_review",
               "model_name", "model_version", "model_sha256", "shard", "timestamp")
DEFAULT_EDGES = [i / 10 for i in range(11)]


@dataclass
class Summary:
    """Counts and distributions over a run's records."""

    classified: int = 0
    needs_review: int = 0
    rejected: int = 0
    retried: int = 0
    confidence_sum: float = 0.0
    rejected_by_code: Counter = field(default_factory=Counter)
    class_ids: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    histogram: list = field(default_factory=lambda: [0] * (len(DEFAULT_EDGES) - 1))
    reference_histogram: list | None = None
    latencies_ms: array = field(default_factory=lambda: array("d"))

    @property
    def seen(self) -> int:
        return self.classified + self.rejected

    @property
    def error_rate(self) -> float:
        return self.rejected / self.seen if self.seen else 0.0

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile of request latency, in ms."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        rank = max(1, -(-len(ordered) * q // 100))
        return round(ordered[int(rank) - 1], 2)

    def as_json(self) -> dict:
        top_model = self.models.most_common(1)[0][0] if self.models else (None, None, None)
        return {
            "counts": {
                "seen": self.seen, "classified": self.classified, "needs_review": self.needs_review,
                "rejected": self.rejected, "retried": self.retried,
                "rejected_by_code": dict(sorted(self.rejected_by_code.items())),
            },
            "model": {
                "name": top_model[0], "version": top_model[1], "sha256": top_model[2],
                "models_seen": [{"name": n, "version": v, "sha256": s, "photos": c}
                                for (n, v, s), c in self.models.most_common()],
            },
            "error_rate": round(self.error_rate, 6),
            "average_confidence": round(self.confidence_sum / self.classified, 6) if self.classified else None,
            "low_confidence_rate": round(self.needs_review / self.classified, 6) if self.classified else None,
            "class_distribution": dict(sorted(self.labels.items())),
            "confidence_histogram": {"edges": DEFAULT_EDGES, "counts": self.histogram},
            "latency_ms": {"requests": len(self.latencies_ms), "p50": self.percentile(50),
                           "p95": self.percentile(95), "p99": self.percentile(99)},
        }


def printable_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that were not UTF-8 in the file name become `\\xe9`."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: object) -> object:
    """A text cell that a spreadsheet would run as a formula gets a leading single quote (OWASP's
    advice for CSV injection); photo file names come from the outside world. Numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_row(r: dict) -> list:
    row = [printable_path(str(r.get("path"))), r.get("sha256"), r.get("label"), r.get("class_id"),
           r.get("confidence"), str(bool(r.get("needs_review"))).lower(), r.get("model_name"),
           r.get("model_version"), r.get("model_sha256"), r.get("shard"), r.get("timestamp")]
    return [spreadsheet_safe(v) for v in row]


def review_item(r: dict) -> dict:
    keys = ("path", "sha256", "label", "class_id", "confidence", "top_k", "archived_to",
            "model_version", "shard", "timestamp")
    return {k: r[k] for k in keys if k in r}


def build_outputs(run_dir: Path, predictions: list[Path], rejected: list[Path],
                  reference_edges: list[float] | None, merge: bool = False) -> Summary:
    """One streaming pass over the journal files: the summary, predictions.csv and
    review_queue.jsonl; with `merge`, also predictions.jsonl and rejected.jsonl as the
    concatenation of the shards' files."""
    s = Summary()
    if reference_edges:
        s.reference_histogram = [0] * (len(reference_edges) - 1)
    last_batch = None
    with atomic_open(run_dir / "predictions.csv", "w", encoding="utf-8", errors="backslashreplace",
                     newline="") as fcsv, \
            atomic_open(run_dir / "review_queue.jsonl", "w", encoding="utf-8") as freview, \
            _maybe_merge(run_dir / "predictions.jsonl", merge) as fpred:
        writer = csv.writer(fcsv)
        writer.writerow(CSV_COLUMNS)
        for r in _records(predictions):
            s.classified += 1
            conf = float(r.get("confidence", 0.0))
            s.confidence_sum += conf
            s.class_ids[int(r.get("class_id", -1))] += 1
            s.labels[str(r.get("label"))] += 1
            s.models[(r.get("model_name"), r.get("model_version"), r.get("model_sha256"))] += 1
            s.histogram[bin_index(conf, DEFAULT_EDGES)] += 1
            if s.reference_histogram is not None:
                s.reference_histogram[bin_index(conf, reference_edges)] += 1
            if r.get("attempts", 1) > 1:
                s.retried += 1
            batch = (r.get("shard"), r.get("batch"))
            if batch != last_batch and r.get("request_ms") is not None:
                s.latencies_ms.append(float(r["request_ms"]))  # a batch's lines are contiguous
            last_batch = batch
            writer.writerow(csv_row(r))
            fault_point("during_manifest_rewrite")  # test-only: returns_submit/faults.py
            if r.get("needs_review"):
                s.needs_review += 1
                freview.write(json.dumps(review_item(r)) + "\n")
            if fpred is not None:
                fpred.write(json.dumps(r) + "\n")
    with _maybe_merge(run_dir / "rejected.jsonl", merge) as frej:
        for r in _records(rejected):
            s.rejected += 1
            s.rejected_by_code[str(r.get("code"))] += 1
            if r.get("attempts", 1) > 1:
                s.retried += 1
            if frej is not None:
                frej.write(json.dumps(r) + "\n")
    return s


@contextmanager
def _maybe_merge(path: Path, merge: bool):
    if not merge:
        yield None
        return
    with atomic_open(path, "w", encoding="utf-8") as f:
        yield f


def _records(paths: Iterable[Path]) -> Iterator[dict]:
    for p in paths:
        yield from read_records(p)


def update_latest(output: Path, run_name: str, started_at: str) -> bool:
    """Point `<output>/LATEST` at `run_name` unless it already names a run started later."""
    fd = blocking_lock(output / ".lock.latest")
    try:
        latest = output / "LATEST"
        try:
            current = latest.read_text().strip()
            other = json.loads((output / current / "run_metadata.json").read_text())["started_at"]
            if current != run_name and other > started_at:
                return False
        except (OSError, ValueError, KeyError):
            pass
        write_text(latest, run_name + "\n")
        return True
    finally:
        os.close(fd)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def run_metadata(summary: Summary, reference: Reference | None, drift_alpha: float, *, run_id: str, status: str,
                 started_at: str, shard_index: int | None, shard_count: int, config: dict,
                 extra_counts: dict | None = None, ended_at: str | None = None, **sections: Any) -> dict:
    """The run_metadata.json of one shard (``shard_index``) or of the merged run (``None``).

    Both carry the same summary, model check and drift sections; ``sections`` adds what only
    one of them has (a shard's invocation and throughput, the merged run's list of shards).
    """
    body = summary.as_json()
    body["counts"].update(extra_counts or {})
    server_sha = body["model"]["sha256"]
    ref_sha = reference.archive_content_sha256 if reference else None
    body["model"].update({
        "reference_archive_content_sha256": ref_sha,
        "reference_mar_sha256": reference.mar_sha256 if reference else None,
        "matches_reference": server_sha == ref_sha if server_sha and ref_sha else None,
    })
    return {
        "run_id": run_id, "status": status, "started_at": started_at, "ended_at": ended_at or utc_now(),
        "shard": {"index": shard_index, "count": shard_count},
        **body,
        "drift": drift.summarize(reference, summary.class_ids, summary.reference_histogram, drift_alpha),
        **sections,
        "config": config,
    }


def finalize_shards(output: Path, run_dir: Path, run_id: str, shard_count: int, max_error_rate: float,
                    drift_alpha: float, config: dict, reference: Reference | None) -> bool:
    """Whichever shard finds every shard's `_SUCCESS.shard-*` marker writes the run's merged
    predictions/rejected JSONL, CSV, review queue, run_metadata.json, `_SUCCESS` and LATEST.
    A lock in the run folder serialises shards finishing together. True if it did."""
    fd = blocking_lock(run_dir / ".lock.finalize")
    try:
        names = [shard_file_names(i, shard_count) for i in range(shard_count)]
        if not all((run_dir / n["success"]).exists() for n in names):
            event("shard complete; waiting for the other shards")
            return False
        edges = reference.body.get("confidence_histogram", {}).get("edges") if reference else None
        summary = build_outputs(run_dir, [run_dir / n["predictions"] for n in names],
                                [run_dir / n["rejected"] for n in names], edges, merge=True)
        shards = [_read_json(run_dir / n["metadata"]) for n in names]
        starts = [s["started_at"] for s in shards if s and "started_at" in s]
        meta = run_metadata(summary, reference, drift_alpha, run_id=run_id,
                            status="partial" if summary.error_rate > max_error_rate else "complete",
                            started_at=min(starts) if starts else utc_now(), shard_index=None,
                            shard_count=shard_count, config={**config, "shard_index": None}, shards=shards)
        write_json(run_dir / "run_metadata.json", meta)
        write_text(run_dir / "_SUCCESS", run_dir.name + "\n")
        update_latest(output, run_dir.name, meta["started_at"])
        event("run complete: all shards done", shards=shard_count)
        return True
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
