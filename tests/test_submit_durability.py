"""Crashes placed exactly at the submitter's durability points (returns_submit/faults.py), with the
fake server: the order promised in docs/submitter.md ("Exactly once") is checked at the moment of
the kill, and the resumed run records every photo exactly once with nothing moved unrecorded."""
from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from returns_submit.faults import FAULT_ENV, POINTS
from tests.submit_fixtures import (FakeInferenceServer, assert_exactly_once, read_csv, read_jsonl, run_submit,
                                   write_photos)


@pytest.fixture
def server():
    with FakeInferenceServer() as s:
        yield s


def args(inbox: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["--inbox", str(inbox), "--output", str(out), "--endpoint", url, "--progress", "log",
            "--backoff", "0.01", "--backoff-max", "0.05", "--connect-deadline", "5", "--run-id", "f",
            "--batch-size", "3", "--concurrency", "1", "--after", "move", "--max-error-rate", "1", *extra]


def make_inbox(root: Path) -> tuple[Path, set[str]]:
    inbox = root / "inbox"
    write_photos(inbox / "a", 7)
    write_photos(inbox / "b", 5, start=20)
    (inbox / "b" / "zz_broken.png").write_bytes(b"a text file, not a photo")
    return inbox, inbox_state(inbox)


def inbox_state(inbox: Path) -> set[str]:
    return {str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file()}


def assert_nothing_moved_unrecorded(inbox: Path, out: Path, expected: set[str]) -> list[dict]:
    """Every photo gone from the inbox has a record naming where it went, and is there intact."""
    run = out / "run_f"
    records = {r["path"]: r for r in read_jsonl(run / "predictions.jsonl") + read_jsonl(run / "rejected.jsonl")}
    gone = expected - inbox_state(inbox)
    assert gone <= set(records), f"moved without a record: {sorted(gone - set(records))}"
    for rel in gone:
        r = records[rel]
        dest = out / "archive" / r["archived_to"] if "archived_to" in r else out / r["quarantined_to"]
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == r["sha256"], rel
    return list(records.values())


def resume_and_check(inbox: Path, out: Path, url: str, expected: set[str]) -> dict:
    r = run_submit(*args(inbox, out, url), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "run_f"
    assert_exactly_once(run, expected)
    assert inbox_state(inbox) == set()  # every photo archived or quarantined, none lost
    assert_nothing_moved_unrecorded(inbox, out, expected)
    assert len(read_csv(run / "predictions.csv")) == len(read_jsonl(run / "predictions.jsonl"))
    return json.loads((run / "run_metadata.json").read_text())


def killed(inbox: Path, out: Path, url: str, fault: str):
    r = run_submit(*args(inbox, out, url), timeout=60, env={FAULT_ENV: fault})
    assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
    return r


def test_the_hook_names_exactly_the_documented_points():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "submitter.md").read_text()
    assert FAULT_ENV in doc and all(p in doc for p in POINTS)


def test_killed_after_the_journal_append_the_batch_is_recorded_but_not_moved(tmp_path, server):
    inbox, expected = make_inbox(tmp_path)
    out = tmp_path / "out"
    killed(inbox, out, server.url, "after_journal_append:2")
    records = read_jsonl(out / "run_f" / "predictions.jsonl") + read_jsonl(out / "run_f" / "rejected.jsonl")
    assert len(records) == 6  # two batches of three, fsynced
    first, second = records[:3], records[3:]
    left = inbox_state(inbox)
    # The order: records first, moves only after. Batch 1 was moved; batch 2 is recorded, still here.
    assert all(r["path"] not in left for r in first)
    assert all(r["path"] in left for r in second), "a photo was moved before its record was written"
    assert_nothing_moved_unrecorded(inbox, out, expected)
    sent = server.photos_seen
    meta = resume_and_check(inbox, out, server.url, expected)
    assert meta["invocation"]["recovered_moves"] == 3  # batch 2's moves finished on resume
    assert server.photos_seen - sent == len(expected) - 6  # recorded photos are never sent again


@pytest.mark.parametrize("nth", [1, 4, 8])
def test_killed_after_a_move_nothing_is_moved_without_its_record(tmp_path, server, nth):
    inbox, expected = make_inbox(tmp_path)
    out = tmp_path / "out"
    killed(inbox, out, server.url, f"after_move:{nth}")
    assert len(expected - inbox_state(inbox)) == nth  # exactly the moves before the kill
    records = assert_nothing_moved_unrecorded(inbox, out, expected)
    assert len(records) == 3 * -(-nth // 3)  # the batch of the nth move, and the ones before it
    resume_and_check(inbox, out, server.url, expected)


def test_killed_while_rewriting_the_derived_files_leaves_the_previous_ones_whole(tmp_path, server):
    inbox, expected = make_inbox(tmp_path)
    out = tmp_path / "out"
    first = run_submit(*args(inbox, out, server.url), timeout=60)
    assert first.returncode == 0, first.stderr[-2000:]
    run = out / "run_f"
    csv_before = (run / "predictions.csv").read_bytes()
    meta_before = (run / "run_metadata.json").read_bytes()
    more = write_photos(inbox / "c", 4, start=40)
    expected |= {str(p.relative_to(inbox)) for p in more}
    killed(inbox, out, server.url, "during_manifest_rewrite:5")  # 5 rows into the new predictions.csv
    assert (run / "predictions.csv").read_bytes() == csv_before  # old file whole: never half a file
    assert (run / "run_metadata.json").read_bytes() == meta_before
    assert not (run / "_SUCCESS").exists()  # the resumed run is not complete yet
    assert len(read_jsonl(run / "predictions.jsonl")) == 16  # the new photos were recorded before the kill
    resume_and_check(inbox, out, server.url, expected)
    assert (run / "_SUCCESS").exists() and len(read_csv(run / "predictions.csv")) == 16
