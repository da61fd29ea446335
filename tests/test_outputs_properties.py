"""The run's derived files and the journal, for any file name and any bytes (hypothesis).

predictions.csv must give back every path through a standard CSV reader (commas, quotes, new lines,
bytes that are not UTF-8), the JSONL files must round-trip paths exactly, and the journal's resume
logic must know exactly the complete lines after a kill at any byte.
"""
from __future__ import annotations

import csv
import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from returns_submit.journal import Journal, read_records
from returns_submit.outputs import CSV_COLUMNS, derive, journal_summary, printable_path, spreadsheet_safe

# A relative path as os.scandir gives it: any bytes but NUL, decoded with surrogateescape.
file_names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b).map(os.fsdecode)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def record(path: str, i: int = 0, needs_review: bool = False) -> dict:
    return {"path": path, "sha256": f"{i:064x}", "size": 10 + i, "label": "Bag", "class_id": 8,
            "confidence": 0.5 + i / 1000, "needs_review": needs_review, "top_k": [],
            "model_name": "returns-classifier", "model_version": "1.0", "model_sha256": "ab" * 32,
            "run_id": "r", "shard": 0, "shard_count": 1, "timestamp": "2026-01-01T00:00:00.000+00:00",
            "batch": f"1-{i // 3}", "request_ms": 5.0, "attempts": 1}


def write_journal(run: Path, records: list[dict], rejected: list[dict] = ()) -> Journal:
    j = Journal(run, 0, 1)
    j.open()
    j.append(records, list(rejected))
    j.close()
    return j


def csv_paths(run: Path) -> list[str]:
    with open(run / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert all(len(r) == len(CSV_COLUMNS) for r in rows[1:])
    return [r[0] for r in rows[1:]]


def test_csv_quotes_commas_quotes_and_new_lines_in_names(tmp_path):
    names = ["a,b.png", 'say "cheese".png', "line\nbreak.png", 'all,of "them"\r\n.png', "semi;colon.png",
             "tab\tinside.png", "plain.png", "caf\udce9.png"]
    j = write_journal(tmp_path, [record(n, i, needs_review=i % 2 == 0) for i, n in enumerate(names)])
    summary = derive(tmp_path, [j.predictions_path], [j.rejected_path], None, 0.01, "record").summary
    assert summary.classified == len(names) and summary.needs_review == 4
    assert csv_paths(tmp_path) == [spreadsheet_safe(printable_path(n)) for n in names]
    assert csv_paths(tmp_path)[-1] == "caf\\xe9.png"  # not UTF-8 on disk: escaped in the CSV
    review = [json.loads(line) for line in (tmp_path / "review_queue.jsonl").read_text().splitlines()]
    assert [r["path"] for r in review] == names[::2]  # the JSONL keeps the true names


def test_the_summary_is_what_the_records_say(tmp_path):
    # Every count and distribution of run_metadata.json, recomputed here from the records alone.
    rng = random.Random(5)
    recs = [{**record(f"p{i}.png", i), "confidence": rng.random(), "attempts": rng.choice([1, 1, 2, 3]),
             "batch": f"1-{i // 7}", "request_ms": 10.0 + (i // 7) * 3, "class_id": i % 10,
             "rule": rng.choice(["float", "int8", None])} for i in range(60)]
    del recs[0]["attempts"]  # a record without the field was sent once
    recs[1].update(model_version="0.9", model_sha256="cd" * 32)
    rejected = [{"path": "r1", "code": "not_an_image", "attempts": 2}, {"path": "r2", "code": "not_an_image"},
                {"path": "r3", "code": "too_large"}]
    j = write_journal(tmp_path, recs, rejected)
    ref_edges = [0.0, 0.5, 0.9, 1.0]
    s = journal_summary([j.predictions_path], [j.rejected_path], ref_edges)
    body = s.as_json()
    assert body["counts"]["retried"] == sum(r.get("attempts", 1) > 1 for r in recs + rejected)
    assert body["counts"]["rejected_by_code"] == {"not_an_image": 2, "too_large": 1}
    tenths = [min(int(r["confidence"] * 10), 9) for r in recs]
    assert body["confidence_histogram"] == {"edges": [i / 10 for i in range(11)],
                                            "counts": [tenths.count(b) for b in range(10)]}
    ref_bins = [sum(lo <= r["confidence"] < hi for r in recs) for lo, hi in zip(ref_edges, ref_edges[1:])]
    assert [sum(b) for b in zip(*(t.reference_histogram for t in s.by_rule.values()))] == ref_bins
    rules = Counter("unknown" if r["rule"] is None else r["rule"] for r in recs)
    assert body["counts"]["rules"] == dict(sorted(rules.items())) and sum(rules.values()) == 60
    # Each rule's tally is its own records' share of the night's (here all on the same edges).
    for key, t in s.by_rule.items():
        mine = [r for r in recs if ("unknown" if r["rule"] is None else r["rule"]) == key]
        assert t.class_ids == Counter(r["class_id"] for r in mine) and t.classified == len(mine)
        assert t.reference_histogram == [sum(lo <= r["confidence"] < hi for r in mine)
                                         for lo, hi in zip(ref_edges, ref_edges[1:])]
    assert sum((t.class_ids for t in s.by_rule.values()), Counter()) == s.class_ids
    per_batch = sorted({r["batch"]: r["request_ms"] for r in recs}.values())  # one latency per request
    assert body["latency_ms"] == {"requests": 9, "p50": per_batch[4], "p95": per_batch[8], "p99": per_batch[8]}
    assert body["model"]["models_seen"] == [
        {"name": "returns-classifier", "version": "1.0", "sha256": "ab" * 32, "photos": 59},
        {"name": "returns-classifier", "version": "0.9", "sha256": "cd" * 32, "photos": 1}]


def test_a_label_that_is_not_valid_unicode_is_escaped_in_the_csv_not_fatal(tmp_path):
    # A server may answer a label with a lone surrogate ("\\ud800" is valid JSON); the journal keeps
    # it exactly, and the CSV, which must be UTF-8, writes it escaped instead of failing the night.
    odd = {**record("a.png"), "label": "Bag\ud800"}
    j = write_journal(tmp_path, [odd, record("b.png", 1)])
    assert derive(tmp_path, [j.predictions_path], [j.rejected_path], None, 0.01, "record").summary.classified == 2
    assert [r["label"] for r in read_records(j.predictions_path)] == ["Bag\ud800", "Bag"]
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as f:
        labels = [row[2] for row in csv.reader(f)][1:]
    assert labels == ["Bag\\ud800", "Bag"]


@SETTINGS
@given(st.lists(file_names, min_size=1, max_size=8, unique=True))
def test_any_file_name_round_trips_through_csv_and_jsonl(names):
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        j = write_journal(run, [record(n, i, needs_review=True) for i, n in enumerate(names)])
        derive(run, [j.predictions_path], [j.rejected_path], None, 0.01, "record").summary
        assert csv_paths(run) == [spreadsheet_safe(printable_path(n)) for n in names]
        assert [r["path"] for r in read_records(j.predictions_path)] == names
        review = [json.loads(line) for line in (run / "review_queue.jsonl").read_text().splitlines()]
        assert [r["path"] for r in review] == names
        # CSV cells are text a spreadsheet will not run, whatever the name.
        assert not any(p.startswith(("=", "+", "-", "@", "\t", "\r")) for p in csv_paths(run))


@SETTINGS
@given(st.lists(st.lists(file_names, min_size=1, max_size=4), min_size=1, max_size=5, unique_by=tuple),
       st.data())
def test_resume_after_a_kill_at_any_byte_knows_exactly_the_complete_lines(batches, data):
    """Batches appended, then the file cut at any byte (a SIGKILL mid-write): open() keeps the complete
    lines, reports exactly their paths as done, and appends after them without a broken line."""
    seen: set[str] = set()
    batches = [[n for n in b if not (n in seen or seen.add(n))] for b in batches]
    batches = [b for b in batches if b]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        j = Journal(run, 0, 1)
        j.open()
        for b in batches:
            j.append([record(n) for n in b], [])
        j.close()
        raw = j.predictions_path.read_bytes()
        cut = data.draw(st.integers(0, len(raw)), label="cut")
        j.predictions_path.write_bytes(raw[:cut])
        complete = [json.loads(line)["path"] for line in raw[:cut].split(b"\n")[:-1]]
        done = Journal(run, 0, 1)
        got = done.open()
        assert len(got) == len(complete)
        assert all(p in got for p in complete)
        assert not any(p in got for p in seen - set(complete))
        done.append([record("after-resume.png")], [])
        done.close()
        lines = j.predictions_path.read_bytes().split(b"\n")
        assert lines[-1] == b""  # ends with a whole line
        assert [json.loads(x)["path"] for x in lines[:-1]] == complete + ["after-resume.png"]


@SETTINGS
@given(st.lists(st.binary(max_size=30), max_size=6))
def test_arbitrary_bytes_in_a_journal_are_skipped_never_fatal(garbage):
    """Lines that are not JSON objects (a disk error, a hand edit: `1`, `["path"]`) are skipped by
    readers and by the resume, never fatal."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.jsonl"
        good = json.dumps(record("ok.png")).encode() + b"\n"
        path.write_bytes(good + b"\n".join(g.replace(b"\n", b" ") for g in garbage) + b"\n" + good)
        assert [r["path"] for r in read_records(path)] == ["ok.png", "ok.png"]
        done = Journal(Path(tmp), 0, 1).open()
        assert "ok.png" in done and len(done) == 1


def test_json_values_that_are_not_objects_do_not_break_the_resume(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(b'{"path": "a.png"}\n1\n["path"]\n"path"\nnull\n{"path": "b.png"}\n')
    done = Journal(tmp_path, 0, 1).open()
    assert len(done) == 2 and "a.png" in done and "b.png" in done
