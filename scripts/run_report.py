"""run_metadata.json: what one shard reports, and the run's merged report once every
shard is done (sharded runs only; a single shard's report is the run's)."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from scripts import drift, manifests
from scripts.journal import blocking_lock, shard_file_names
from scripts.submit_config import SubmitConfig
from scripts.submit_log import event


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def summary_json(summary: manifests.Summary, reference: dict | None) -> dict:
    """Counts and distributions, with the server's model checked against the reference's."""
    body = summary.as_json()
    ref = reference or {}
    server_sha, ref_sha = body["model"]["sha256"], ref.get("_archive_content_sha256")
    body["model"].update({
        "reference_archive_content_sha256": ref_sha,
        "reference_mar_sha256": ref.get("_mar_sha256"),
        "matches_reference": server_sha == ref_sha if server_sha and ref_sha else None,
    })
    return body


def drift_json(summary: manifests.Summary, reference: dict | None, alpha: float) -> dict:
    return drift.summarize(reference, summary.class_ids, summary.reference_histogram, alpha)


def finalize_shards(output: Path, run_dir: Path, cfg: SubmitConfig, reference: dict | None) -> bool:
    """Whichever shard finds every shard's `_SUCCESS.shard-*` marker writes the run's merged
    predictions/rejected JSONL, CSV, review queue, run_metadata.json, `_SUCCESS` and LATEST.
    A lock in the run folder serialises shards finishing together. True if it did."""
    fd = blocking_lock(run_dir / ".lock.finalize")
    try:
        names = [shard_file_names(i, cfg.shard_count) for i in range(cfg.shard_count)]
        if not all((run_dir / n["success"]).exists() for n in names):
            event("shard complete; waiting for the other shards", shard=cfg.shard_index)
            return False
        edges = (reference or {}).get("confidence_histogram", {}).get("edges")
        summary = manifests.build_outputs(run_dir, [run_dir / n["predictions"] for n in names],
                                          [run_dir / n["rejected"] for n in names], edges, merge=True)
        shards = [_read_json(run_dir / n["metadata"]) for n in names]
        starts = [s["started_at"] for s in shards if s and "started_at" in s]
        meta = {
            "run_id": cfg.run_id,
            "status": "partial" if summary.error_rate > cfg.max_error_rate else "complete",
            "started_at": min(starts) if starts else utc_now(),
            "ended_at": utc_now(),
            "shard": {"index": None, "count": cfg.shard_count},
            **summary_json(summary, reference),
            "drift": drift_json(summary, reference, cfg.drift_alpha),
            "shards": shards,
            "config": {**cfg.as_json(), "shard_index": None},
        }
        manifests.write_json(run_dir / "run_metadata.json", meta)
        manifests.write_text(run_dir / "_SUCCESS", run_dir.name + "\n")
        manifests.update_latest(output, run_dir.name, meta["started_at"])
        event("run complete: all shards done", shards=cfg.shard_count)
        return True
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
