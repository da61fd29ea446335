"""Every file a run leaves for its readers, derived from the journal: predictions.csv,
review_queue.jsonl, run_metadata.json (one shard's, and the run's merged one), `_SUCCESS`
and `<output>/LATEST`. (The journal's own append-only files are returns_submit.journal's.)

Everything here is regenerated from the JSONL journal in one streaming pass, so it
stays consistent with predictions.jsonl after any number of resumes, and is written
atomically (temporary file + fsync + rename): a reader never sees half a file.

The one exception to streaming is the review queue: it is written in review order (see
``review_order``), so its items are held in memory and sorted before writing. An item is a few
hundred bytes; a night with 100,000 photos to review holds some 50 MB, which the submitter's pod
affords. A shop whose queues grow far beyond that would sort on disk instead.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from array import array
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from returns_model.fileio import atomic_open, write_json, write_text
from returns_model.manifest import Reference
from returns_model.names import (LATEST_FILE, PREDICTIONS_CSV, PREDICTIONS_FILE, REJECTED_FILE, REVIEW_QUEUE_FILE,
                                 RUN_METADATA_FILE, SUCCESS_MARKER)
from returns_model.results import (CLASS_ID, CONFIDENCE, LABEL, LOW_CONFIDENCE, MODEL_NAME, MODEL_SHA256,
                                   MODEL_VERSION, NEEDS_REVIEW, NIGHT_DRIFT, REVIEW_REASON, REVIEW_REASONS, RULE,
                                   TOP_K, UNFAMILIAR, UNFAMILIAR_SCORE)
from returns_submit import drift
from returns_submit.drift import bin_index
from returns_submit.faults import fault_point
from returns_submit.journal import blocking_lock, read_records, shard_file_names
from returns_submit.log import event

# Columns are only ever appended: spreadsheets and scripts read them by position.
CSV_COLUMNS = ("path", "sha256", LABEL, CLASS_ID, CONFIDENCE, NEEDS_REVIEW, REVIEW_REASON, UNFAMILIAR_SCORE,
               MODEL_NAME, MODEL_VERSION, MODEL_SHA256, "shard", "timestamp", RULE)
DEFAULT_EDGES = [i / 10 for i in range(11)]


@dataclass
class Summary:
    """Counts and distributions over a run's records."""

    classified: int = 0
    needs_review: int = 0
    unfamiliar: int = 0  # photos the server's gate flagged as unlike the training data
    review_reasons: Counter = field(default_factory=Counter)
    rejected: int = 0
    retried: int = 0
    confidence_sum: float = 0.0
    rejected_by_code: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    histogram: list = field(default_factory=lambda: [0] * (len(DEFAULT_EDGES) - 1))
    by_rule: dict[str, drift.Tally] = field(default_factory=dict)  # drift.rule_key -> that rule's answers
    latencies_ms: array = field(default_factory=lambda: array("d"))

    @property
    def class_ids(self) -> Counter:
        """Photos per predicted class id, over every rule's answers."""
        return sum((t.class_ids for t in self.by_rule.values()), Counter())

    @property
    def rules(self) -> dict[str, int]:
        """Photos each rule answered (``unknown``: answers that name no rule)."""
        return {key: t.classified for key, t in sorted(self.by_rule.items())}

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
                "review_reasons": {r: self.review_reasons[r] for r in REVIEW_REASONS},
                "unfamiliar": self.unfamiliar,
                "rules": self.rules,
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
            "low_confidence_rate": round(self.review_reasons[LOW_CONFIDENCE] / self.classified, 6)
            if self.classified else None,
            "unfamiliar_rate": round(self.unfamiliar / self.classified, 6) if self.classified else None,
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


def reasons_of(r: dict) -> list[str]:
    """A record's review reasons; a server without them (an older model) reviews on confidence alone."""
    reasons = r.get(REVIEW_REASON)
    if isinstance(reasons, list):
        return [str(x) for x in reasons]
    return [LOW_CONFIDENCE] if r.get(NEEDS_REVIEW) else []


def csv_row(r: dict, reasons: list[str]) -> list:
    row = [printable_path(str(r.get("path"))), r.get("sha256"), r.get(LABEL), r.get(CLASS_ID),
           r.get(CONFIDENCE), str(bool(reasons)).lower(), "+".join(reasons), r.get(UNFAMILIAR_SCORE),
           r.get(MODEL_NAME), r.get(MODEL_VERSION), r.get(MODEL_SHA256), r.get("shard"), r.get("timestamp"),
           r.get(RULE)]
    return [spreadsheet_safe(v) for v in row]


def review_item(r: dict, reasons: list[str]) -> dict:
    keys = ("path", "sha256", LABEL, CLASS_ID, CONFIDENCE, UNFAMILIAR_SCORE, TOP_K, "archived_to",
            MODEL_VERSION, RULE, "shard", "timestamp")
    return {**{k: r[k] for k in keys if k in r}, REVIEW_REASON: reasons, "margin": top2_margin(r)}


def top2_margin(r: dict) -> float:
    """The calibrated probability of the top class minus the runner-up's (1.0 when only one is known):
    a small margin is a photo whose decision moves the boundary between two classes."""
    probs = sorted((float(t.get("probability", 0.0)) for t in r.get(TOP_K) or []), reverse=True)
    if not probs:
        probs = [float(r.get(CONFIDENCE) or 0.0)]
    return round(probs[0] - (probs[1] if len(probs) > 1 else 0.0), 6)


def review_order(items: list[dict]) -> list[dict]:
    """Sort review items by how much a person's decision would teach the model, and number them.

    First the photos the gate found unfamiliar (unlike anything the model was trained on: a decision
    shows it a new kind of photo, or confirms one that is not a product), then by the smallest margin
    between the top two classes (the model's own uncertainty), ties broken by hash so the order is
    reproducible. ``priority`` is the 1-based rank: a team with a budget of N reviews takes 1..N.
    """
    ordered = sorted(items, key=lambda it: (UNFAMILIAR not in it.get(REVIEW_REASON, []),
                                            it.get("margin", 1.0), str(it.get("sha256"))))
    for rank, it in enumerate(ordered, 1):
        it["priority"] = rank
    return ordered


def journal_summary(predictions: list[Path], rejected: list[Path], reference_edges: list[float] | None,
                    edges_for: Callable[[str | None], list[float] | None] | None = None) -> Summary:
    """One streaming pass over the journal files: counts and distributions, nothing written.

    Each rule's answers are tallied apart, their confidences binned on ``edges_for(rule)``: the edges
    of the reference they will be judged against (default ``reference_edges`` for every rule)."""
    s = Summary()
    last_batch = None
    for r in _records(predictions):
        s.classified += 1
        conf = float(r.get(CONFIDENCE, 0.0))
        s.confidence_sum += conf
        class_id = int(r.get(CLASS_ID, -1))
        s.labels[str(r.get(LABEL))] += 1
        s.models[(r.get(MODEL_NAME), r.get(MODEL_VERSION), r.get(MODEL_SHA256))] += 1
        s.histogram[bin_index(conf, DEFAULT_EDGES)] += 1
        if r.get("attempts", 1) > 1:
            s.retried += 1
        batch = (r.get("shard"), r.get("batch"))
        if batch != last_batch and r.get("request_ms") is not None:
            s.latencies_ms.append(float(r["request_ms"]))  # a batch's lines are contiguous
        last_batch = batch
        reasons = reasons_of(r)
        s.needs_review += bool(reasons)
        s.review_reasons.update(reasons)
        flagged = UNFAMILIAR in reasons
        s.unfamiliar += flagged
        key = drift.rule_key(r.get(RULE))
        if key not in s.by_rule:
            rule = None if r.get(RULE) is None else key
            s.by_rule[key] = drift.Tally(rule, edges_for(rule) if edges_for else reference_edges)
        s.by_rule[key].add(class_id, conf, flagged)
    for r in _records(rejected):
        s.rejected += 1
        s.rejected_by_code[str(r.get("code"))] += 1
        if r.get("attempts", 1) > 1:
            s.retried += 1
    return s


def write_outputs(run_dir: Path, predictions: list[Path], rejected: list[Path], *, merge: bool,
                  all_to_review: bool = False) -> None:
    """predictions.csv and review_queue.jsonl from the journal files; with `merge`, also
    predictions.jsonl and rejected.jsonl as the concatenation of the shards' files.

    `all_to_review` (a drifting night under --on-drift review) sends every classified photo to
    review with the reason `night_drift`; the journal keeps the server's own answers. The review
    queue is written in `review_order`, so it is collected in memory first (see the module's note)."""
    review: list[dict] = []
    with atomic_open(run_dir / PREDICTIONS_CSV, "w", encoding="utf-8", errors="backslashreplace",
                     newline="") as fcsv, \
            atomic_open(run_dir / REVIEW_QUEUE_FILE, "w", encoding="utf-8") as freview, \
            _maybe_merge(run_dir / PREDICTIONS_FILE, merge) as fpred:
        writer = csv.writer(fcsv)
        writer.writerow(CSV_COLUMNS)
        for r in _records(predictions):
            reasons = reasons_of(r) + ([NIGHT_DRIFT] if all_to_review else [])
            writer.writerow(csv_row(r, reasons))
            fault_point("during_manifest_rewrite")  # test-only: returns_submit/faults.py
            if reasons:
                review.append(review_item(r, reasons))
            if fpred is not None:
                fpred.write(json.dumps(r) + "\n")
        for item in review_order(review):
            freview.write(json.dumps(item) + "\n")
    with _maybe_merge(run_dir / REJECTED_FILE, merge) as frej:
        if frej is not None:
            for r in _records(rejected):
                frej.write(json.dumps(r) + "\n")


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
        latest = output / LATEST_FILE
        try:
            current = latest.read_text().strip()
            other = json.loads((output / current / RUN_METADATA_FILE).read_text())["started_at"]
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


ON_DRIFT = ("record", "review", "fail")


@dataclass
class Night:
    """A run's records summarised, its drift judged (each rule's answers against that rule's
    reference), and what --on-drift makes of it."""

    summary: Summary
    drift: dict
    action: str  # "none" (not drifting), "recorded", "all_to_review" or "failed"

    @property
    def off(self) -> bool:
        return bool(self.drift.get("drift"))


def derive(run_dir: Path, predictions: list[Path], rejected: list[Path], reference: Reference | None,
           drift_alpha: float, on_drift: str, merge: bool = False) -> Night:
    """Summarise the journal files, judge the night's drift rule by rule, then write the derived
    files (with every photo sent to review when the night is off and --on-drift is `review`)."""
    if on_drift not in ON_DRIFT:
        raise ValueError(f"on_drift must be one of {ON_DRIFT}, not {on_drift!r}")
    if reference is None:
        summary = journal_summary(predictions, rejected, None)
    else:
        summary = journal_summary(predictions, rejected, drift.edges_of(reference.body),
                                  edges_for=lambda rule: drift.edges_of(reference.for_rule(rule).body))
    judged = drift.judge_rules(reference, summary.by_rule, drift_alpha)
    if judged["mixed_rules"]:
        event("more than one rule answered this night (a rolling update, or servers on different machines); "
              "each rule's answers are judged against its own reference", level=logging.WARNING,
              rules=summary.rules)
    action = {"record": "recorded", "review": "all_to_review", "fail": "failed"}[on_drift] \
        if judged.get("drift") else "none"
    write_outputs(run_dir, predictions, rejected, all_to_review=action == "all_to_review", merge=merge)
    if action == "all_to_review":
        summary.review_reasons[NIGHT_DRIFT] = summary.classified
        summary.needs_review = summary.classified
    return Night(summary, {**judged, "on_drift": on_drift, "action": action}, action)


def run_metadata(night: Night, reference: Reference | None, *, run_id: str, status: str,
                 started_at: str, shard_index: int | None, shard_count: int, config: dict,
                 extra_counts: dict | None = None, ended_at: str | None = None, **sections: Any) -> dict:
    """The run_metadata.json of one shard (``shard_index``) or of the merged run (``None``).

    Both carry the same summary, model check and drift sections; ``sections`` adds what only
    one of them has (a shard's invocation and throughput, the merged run's list of shards).
    """
    body = night.summary.as_json()
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
        "night_off": night.off,
        **body,
        "drift": night.drift,
        **sections,
        "config": config,
    }


def finalize_shards(output: Path, run_dir: Path, run_id: str, shard_count: int, max_error_rate: float,
                    drift_alpha: float, on_drift: str, config: dict, reference: Reference | None) -> bool:
    """Whichever shard finds every shard's `_SUCCESS.shard-*` marker writes the run's merged
    predictions/rejected JSONL, CSV, review queue, run_metadata.json, `_SUCCESS` and LATEST.
    A lock in the run folder serialises shards finishing together. True if it did."""
    fd = blocking_lock(run_dir / ".lock.finalize")
    try:
        names = [shard_file_names(i, shard_count) for i in range(shard_count)]
        if not all((run_dir / n["success"]).exists() for n in names):
            event("shard complete; waiting for the other shards")
            return False
        night = derive(run_dir, [run_dir / n["predictions"] for n in names],
                       [run_dir / n["rejected"] for n in names], reference, drift_alpha, on_drift, merge=True)
        shards = [_read_json(run_dir / n["metadata"]) for n in names]
        starts = [s["started_at"] for s in shards if s and "started_at" in s]
        extra = merged_inbox_counts([s.get("counts", {}) for s in shards if s])
        status = "partial" if night.summary.error_rate > max_error_rate else "complete"
        if night.action == "failed":
            status = "failed_drift"
        meta = run_metadata(night, reference, run_id=run_id, status=status,
                            started_at=min(starts) if starts else utc_now(), shard_index=None,
                            shard_count=shard_count, config={**config, "shard_index": None}, shards=shards,
                            extra_counts=extra)
        write_json(run_dir / RUN_METADATA_FILE, meta)
        if night.action != "failed":  # a failed night is not published as the latest run
            write_text(run_dir / SUCCESS_MARKER, run_dir.name + "\n")
            update_latest(output, run_dir.name, meta["started_at"])
        event("run complete: all shards done", shards=shard_count, night_off=night.off)
        return True
    finally:
        os.close(fd)


# Every shard lists the whole inbox, so each counts the same skipped files: the run's count is the
# largest any shard saw. Moves are each shard's own: the run's count is their sum.
LISTED_COUNTS = ("skipped_non_image", "skipped_hidden", "skipped_symlink", "skipped_unlistable")
SUMMED_COUNTS = ("move_failed",)


def merged_inbox_counts(shard_counts: list[dict]) -> dict:
    """The merged run's counts of what the shards skipped or could not move (see above); a shard's
    per-invocation `other_shards` and `resumed_skipped` say nothing about the run and are left out."""
    merged = {k: max((int(c.get(k, 0)) for c in shard_counts), default=0) for k in LISTED_COUNTS}
    merged.update({k: sum(int(c.get(k, 0)) for c in shard_counts) for k in SUMMED_COUNTS})
    return merged


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
