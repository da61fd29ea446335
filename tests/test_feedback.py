"""Reviewers' decisions: the format's parser and validation report every kind of bad record precisely
(file, line, code, count), and the review queue comes out in teaching order with a priority."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from returns_feedback.decisions import held_out, decisions_hash, read_decisions
from returns_feedback.validate import main as feedback_main, read_runs, validate
from returns_submit.outputs import review_order, write_outputs

CLASSES = ["T-shirt/top", "Trouser", "Coat"]
H = [f"{i:064x}" for i in range(1, 8)]  # photo hashes the run knows
WHEN = "2024-05-02T09:14:00Z"


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "results" / "run_1"
    run.mkdir(parents=True)
    rows = [{"sha256": h, "path": f"p{i}.png", "label": CLASSES[i % 3], "class_id": i % 3, "confidence": 0.5,
             "top_k": [{"label": c, "class_id": k, "probability": 0.3} for k, c in enumerate(CLASSES)]}
            for i, h in enumerate(H)]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _rec(sha: str, label: str, **kw) -> str:
    return json.dumps({"format_version": 1, "sha256": sha, "label": label, "reviewer": "ana",
                       "decided_at": WHEN, **kw}) + "\n"


def test_a_clean_file_in_both_formats_validates(tmp_path, capsys):
    run = _run(tmp_path)
    jl = tmp_path / "d.jsonl"
    jl.write_text(_rec(H[0], "Coat") + _rec(H[1], "not_a_product") + _rec(H[2], "unsure"))
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("format_version,sha256,label,reviewer,decided_at,note\n"
                        f"1,{H[3]},Trouser,bo,2024-05-02T10:00:00+02:00,looks fine\n")
    assert feedback_main(["validate", "--decisions", str(jl), str(csv_file), "--runs", str(run)]) == 0
    assert "4 records: 4 valid, 0 with problems" in capsys.readouterr().out


def test_every_kind_of_problem_is_reported_with_its_line_and_counted(tmp_path, capsys):
    run = _run(tmp_path)
    f = tmp_path / "bad.jsonl"
    f.write_text(
        _rec(H[0], "Coat")                                 # 1 ok
        + _rec(H[1], "Jumper")                             # 2 unknown_label
        + _rec("f" * 64, "Coat")                           # 3 unknown_hash
        + _rec(H[0], "Trouser")                            # 4 conflict with line 1
        + _rec(H[0], "Coat")                               # 5 duplicate of line 1
        + "[1, 2]\n"                                       # 6 malformed (not an object)
        + _rec(H[2], "Coat", format_version=2)             # 7 bad_version
        + json.dumps({"format_version": 1, "sha256": H[3], "label": "Coat"}) + "\n"  # 8 missing_field
        + _rec("ABC", "Coat")                              # 9 bad_field
        + _rec(H[4], "Coat", decided_at="yesterday")       # 10 bad_field
        + "\n"                                             # 11 blank: skipped, not a record
        + _rec(H[5], "Coat")[:40])                         # 12 truncated (no newline)
    code = feedback_main(["validate", "--decisions", str(f), "--runs", str(run)])
    out = capsys.readouterr().out
    assert code == 1
    for line, what in [(2, "unknown_label: label 'Jumper'"), (3, "unknown_hash"), (4, "conflict"),
                       (5, "duplicate"), (6, "malformed"), (7, "bad_version"), (8, "missing_field: missing reviewer"),
                       (9, "bad_field: sha256"), (10, "bad_field: decided_at"), (12, "truncated")]:
        assert f"{f}:{line}: {what}" in out, (line, out)
    assert f"{f}:1:" not in out and f"{f}:11:" not in out
    assert ("11 records: 1 valid, 10 with problems; truncated 1; malformed 1; bad_version 1; missing_field 1; "
            "bad_field 2; unknown_label 1; unknown_hash 1; duplicate 1; conflict 1") in out


def test_csv_rows_of_the_wrong_width_and_a_bad_header_are_reported(tmp_path):
    good_header = "format_version,sha256,label,reviewer,decided_at\n"
    f = tmp_path / "d.csv"
    f.write_text(good_header + f"1,{H[0]},Coat,ana,{WHEN}\n" + f"1,{H[1]},Coat\n" + f"1,{H[2]},Co")
    report = validate([f], set(H), CLASSES)
    assert [(p.source.rsplit(":", 1)[1], p.code) for p in report.problems] == [("3", "malformed"), ("4", "truncated")]
    g = tmp_path / "e.csv"
    g.write_text("sha,label\n" + f"{H[0]},Coat\n")
    assert [p.code for p in validate([g], set(H), CLASSES).problems] == ["malformed"]


def test_a_missing_run_folder_is_a_usage_error(tmp_path, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text(_rec(H[0], "Coat"))
    assert feedback_main(["validate", "--decisions", str(f), "--runs", str(tmp_path / "nope")]) == 2
    assert "no predictions.jsonl" in capsys.readouterr().err


def test_a_model_folder_gives_the_allowed_labels_and_a_folder_without_one_is_a_usage_error(
        tmp_path, capsys, release_model_dir):
    run = _run(tmp_path)
    f = tmp_path / "d.jsonl"
    f.write_text(_rec(H[0], "Coat") + _rec(H[1], "Sandal"))  # both release classes; Sandal is not in the run
    assert feedback_main(["validate", "--decisions", str(f), "--runs", str(run), "--model", str(release_model_dir)]) == 0
    assert feedback_main(["validate", "--decisions", str(f), "--runs", str(run)]) == 1  # the runs' labels only
    capsys.readouterr()
    assert feedback_main(["validate", "--decisions", str(f), "--runs", str(run), "--model", str(tmp_path)]) == 2
    assert f"{tmp_path / 'model.json'}: not found" in capsys.readouterr().err


def test_runs_give_hashes_and_class_names(tmp_path):
    runs = read_runs([_run(tmp_path)])
    assert set(runs.photos) == set(H) and runs.class_names == set(CLASSES)


def test_a_sharded_run_not_yet_merged_is_read_from_its_shards_journals(tmp_path):
    run = _run(tmp_path)
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    (run / "predictions.jsonl").unlink()
    (run / "predictions.shard-0-of-2.jsonl").write_text("".join(lines[:3]))
    (run / "predictions.shard-1-of-2.jsonl").write_text("".join(lines[3:]))
    assert set(read_runs([run]).photos) == set(H)


def test_hold_out_and_hashes_depend_on_content_not_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(_rec(H[0], "Coat") + _rec(H[1], "Trouser"))
    b.write_text(_rec(H[1], "Trouser", reviewer="bo") + _rec(H[0], "Coat"))
    assert decisions_hash(read_decisions([a]).decisions) == decisions_hash(read_decisions([b]).decisions)
    shares = sum(held_out(f"{i:064x}", 0.2, seed=0) for i in range(5000)) / 5000
    assert 0.18 < shares < 0.22
    assert held_out(H[0], 0.2, 0) == held_out(H[0], 0.2, 0)


def _item(sha: str, reasons: list[str], probs: list[float]) -> dict:
    return {"sha256": sha, "review_reason": reasons, "confidence": probs[0],
            "top_k": [{"label": "x", "class_id": i, "probability": p} for i, p in enumerate(probs)]}


def test_review_queue_is_in_teaching_order_with_a_priority(tmp_path):
    from returns_submit.outputs import review_item, reasons_of

    recs = [_item("a" * 64, ["low_confidence"], [0.80, 0.15]),                  # margin 0.65
            _item("b" * 64, ["low_confidence"], [0.45, 0.40]),                  # margin 0.05
            _item("c" * 64, ["unfamiliar"], [0.99, 0.01]),                      # unfamiliar first
            _item("d" * 64, ["low_confidence", "unfamiliar"], [0.5, 0.3]),      # unfamiliar, smaller margin
            {**_item("e" * 64, [], [0.999, 0.001]), "needs_review": False}]     # accepted: not in the queue
    journal = tmp_path / "predictions.shard-0-of-1.jsonl"
    journal.write_text("".join(json.dumps({**r, "path": r["sha256"][0] + ".png"}) + "\n" for r in recs))
    write_outputs(tmp_path, [journal], [], merge=False)
    queue = [json.loads(x) for x in (tmp_path / "review_queue.jsonl").read_text().splitlines()]
    assert [q["sha256"][0] for q in queue] == ["d", "c", "b", "a"]
    assert [q["priority"] for q in queue] == [1, 2, 3, 4]
    assert queue[0]["margin"] == pytest.approx(0.2)
    # Ties (the same reasons and margin) are broken by hash: the order never depends on the journal's order.
    tied = [_item("g" * 64, ["low_confidence"], [0.6, 0.3]), _item("f" * 64, ["low_confidence"], [0.6, 0.3])]
    items = [review_item(r, reasons_of(r)) for r in recs[:4] + tied]
    assert [i["sha256"][0] for i in review_order(items)] == ["d", "c", "b", "f", "g", "a"]
    assert [i["sha256"] for i in review_order(items[::-1])] == [i["sha256"] for i in review_order(items)]
