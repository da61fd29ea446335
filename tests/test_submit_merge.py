"""The merged run of a sharded night (returns_submit.outputs.finalize_shards): it must say what one
unsharded run over the same photos says, be published once, by the last shard, under a lock, and
keep its status, start time and LATEST right. Against the fake server, in process."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from returns_model.manifest import read_reference
from returns_submit import outputs
from returns_submit.cli import main
from returns_submit.journal import blocking_lock
from tests.submit_fixtures import FakeInferenceServer, fake_reference, read_csv, read_jsonl, submit_args, write_photos

RUN_SPECIFIC = {"shard", "shard_count", "run_id", "timestamp", "batch", "request_ms", "attempts", "archived_to",
                "quarantined_to",
                "priority"}


def inbox_with_rejects(root: Path, n: int = 40) -> Path:
    inbox = root / "inbox"
    write_photos(inbox, n)
    (inbox / "broken.png").write_bytes(b"this is not a png")
    (inbox / "zz_broken.png").write_bytes(b"nor is this")
    (inbox / "notes.txt").write_text("not a photo")  # skipped, and listed by every shard
    return inbox


def strip(rows: list[dict]) -> list[dict]:
    return sorted(({k: v for k, v in r.items() if k not in RUN_SPECIFIC} for r in rows), key=lambda r: r["path"])


def run_sharded(inbox: Path, out: Path, url: str, *extra: str, run_id: str = "s") -> list[int]:
    common = submit_args(inbox, out, url, "--run-id", run_id, "--shard-count", "2", "--after", "keep", *extra)
    return [main([*common, "--shard-index", str(i)]) for i in (0, 1)]


@pytest.fixture
def reference(tmp_path) -> Path:
    ref = tmp_path / "reference.json"
    ref.write_text(json.dumps(fake_reference()))
    return ref


def test_the_merged_run_says_what_one_unsharded_run_says(tmp_path, server, reference):
    inbox = inbox_with_rejects(tmp_path / "a")
    shutil.copytree(inbox, tmp_path / "b")  # rejected photos are quarantined: each run gets its own copy
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(submit_args(inbox, one, server.url, "--run-id", "u", "--after", "keep", "--reference", str(reference),
                            "--max-error-rate", "1")) == 0
    assert run_sharded(tmp_path / "b", two, server.url, "--reference", str(reference), "--max-error-rate", "1") == [0, 0]
    u, s = one / "run_u", two / "run_s"
    for name in ("predictions.jsonl", "rejected.jsonl", "review_queue.jsonl"):
        assert strip(read_jsonl(s / name)) == strip(read_jsonl(u / name)), name
    assert len(read_jsonl(s / "rejected.jsonl")) == 2
    csv_u, csv_s = read_csv(u / "predictions.csv"), read_csv(s / "predictions.csv")
    assert strip(csv_s) == strip(csv_u) and len(csv_s) == 40
    # review order: the same photos in the same order, numbered 1..n
    queue = read_jsonl(s / "review_queue.jsonl")
    assert [q["sha256"] for q in queue] == [q["sha256"] for q in read_jsonl(u / "review_queue.jsonl")]
    assert [q["priority"] for q in queue] == list(range(1, len(queue) + 1))
    mu, ms = (json.loads((d / "run_metadata.json").read_text()) for d in (u, s))
    per_invocation = {"other_shards", "resumed_skipped"}
    assert ms["counts"] == {k: v for k, v in mu["counts"].items() if k not in per_invocation}
    for key in ("model", "error_rate", "average_confidence", "low_confidence_rate", "unfamiliar_rate",
                "class_distribution", "confidence_histogram", "night_off"):
        assert ms[key] == mu[key], key
    assert ms["model"]["reference_archive_content_sha256"] == fake_reference()["archive_content_sha256"]
    assert {k: v for k, v in ms["drift"].items()} == {k: v for k, v in mu["drift"].items()}
    assert ms["shard"] == {"index": None, "count": 2} and ms["config"]["shard_index"] is None
    assert ms["status"] == "complete" and ms["run_id"] == "s"
    shards = [json.loads((s / f"run_metadata.shard-{i}-of-2.json").read_text()) for i in (0, 1)]
    assert ms["shards"] == shards
    assert ms["started_at"] == min(x["started_at"] for x in shards)
    assert (s / "_SUCCESS").read_text() == "run_s\n" and (two / "LATEST").read_text() == "run_s\n"


def test_only_the_last_shard_publishes_and_it_says_so(tmp_path, server, monkeypatch):
    said: list[tuple[str, dict]] = []
    monkeypatch.setattr(outputs, "event", lambda msg, **kw: said.append((msg, kw)))
    real = outputs.finalize_shards
    returned: list[bool] = []

    def finalize(*a, **kw):
        returned.append(real(*a, **kw))
        return returned[-1]

    monkeypatch.setattr(outputs, "finalize_shards", finalize)
    inbox = inbox_with_rejects(tmp_path, 10)
    assert run_sharded(inbox, tmp_path / "out", server.url, "--max-error-rate", "1") == [0, 0]
    assert returned == [False, True]
    msgs = [m for m, _ in said]
    assert msgs.count("shard complete; waiting for the other shards") == 1
    assert ("run complete: all shards done", {"shards": 2, "night_off": False}) in said


@pytest.mark.parametrize("limit, status", [("0.05", "complete"), ("0.049", "partial")])
def test_the_merged_status_follows_the_error_rate_limit(tmp_path, server, limit, status):
    """2 of 40 photos rejected: an error rate of exactly 0.05, which a limit of 0.05 allows."""
    inbox = inbox_with_rejects(tmp_path, 38)
    run_sharded(inbox, tmp_path / "out", server.url, "--max-error-rate", limit)
    meta = json.loads((tmp_path / "out" / "run_s" / "run_metadata.json").read_text())
    assert meta["error_rate"] == 0.05 and meta["status"] == status


def test_a_failed_drifting_night_is_merged_but_not_published(tmp_path, reference):
    """Each shard records its drift (--on-drift record, exit 8) and publishes its part; the merge,
    asked to fail a drifting night, writes run_metadata.json but neither _SUCCESS nor LATEST."""
    inbox = tmp_path / "inbox"
    write_photos(inbox, 120)
    out = tmp_path / "out"
    with FakeInferenceServer(unfamiliar_share=0.3) as odd:
        assert run_sharded(inbox, out, odd.url, "--reference", str(reference), "--on-drift", "record") == [8, 8]
    run = out / "run_s"
    assert json.loads((run / "run_metadata.json").read_text())["status"] == "complete"
    for name in (run / "run_metadata.json", run / "_SUCCESS", out / "LATEST"):
        name.unlink()
    assert outputs.finalize_shards(out, run, "s", 2, 1.0, 0.01, "fail", {"shard_count": 2},
                                   read_reference(reference)) is True
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["status"] == "failed_drift" and meta["drift"]["action"] == "failed" and meta["night_off"] is True
    assert not (run / "_SUCCESS").exists() and not (out / "LATEST").exists()


def test_a_sharded_run_becomes_latest_over_an_older_run(tmp_path, server):
    inbox = inbox_with_rejects(tmp_path, 6)
    out = tmp_path / "out"
    assert main(submit_args(inbox, out, server.url, "--run-id", "older", "--after", "keep",
                            "--max-error-rate", "1")) == 0
    assert (out / "LATEST").read_text() == "run_older\n"
    assert run_sharded(inbox, out, server.url, "--max-error-rate", "1") == [0, 0]
    assert (out / "LATEST").read_text() == "run_s\n"


def test_finalising_waits_for_the_run_folders_lock(tmp_path, server):
    inbox = inbox_with_rejects(tmp_path, 6)
    out = tmp_path / "out"
    assert run_sharded(inbox, out, server.url, "--max-error-rate", "1") == [0, 0]
    run = out / "run_s"
    meta_before = (run / "run_metadata.json").read_text()
    (run / "run_metadata.json").unlink()
    result: list[bool] = []
    fd = blocking_lock(run / ".lock.finalize")
    t = threading.Thread(target=lambda: result.append(outputs.finalize_shards(
        out, run, "s", 2, 1.0, 0.01, "review", {"shard_count": 2}, None)))
    try:
        t.start()
        t.join(0.5)
        assert t.is_alive() and not (run / "run_metadata.json").exists()  # held off by the lock
    finally:
        os.close(fd)
    t.join(30)
    assert result == [True] and json.loads((run / "run_metadata.json").read_text())["counts"] == \
        json.loads(meta_before)["counts"]
