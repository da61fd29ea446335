"""Promises of docs/submitter.md that had no test (issue 17), against the fake server in process:
the run-level drift flag, retries on 408/409/425/429, a resume with another --shard-count, models_seen,
--max-request-bytes, a read-only inbox with --after keep, move_failed, skipped_unlistable and
low_confidence_rate; and the merged run of a sharded night."""
from __future__ import annotations

import base64
import json
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import pytest

from returns_model.manifest import read_reference
from returns_submit import outputs
from returns_submit.cli import main
from returns_submit.client import InferenceClient
from returns_submit.errors import ProtocolError
from returns_submit.journal import blocking_lock
from tests.submit_fixtures import (submit_args, CLASSES, FakeInferenceServer, SmallVolume, fake_manifest,
                                   fake_reference, log_events,
                                   read_csv,
                                   read_jsonl,
                                   unlike_reference,
                                   write_photos)


args = submit_args


def metadata(out: Path, run_id: str) -> dict:
    return json.loads((out / f"run_{run_id}" / "run_metadata.json").read_text())


# ---- drift ----------------------------------------------------------------------------------

def test_run_metadata_drift_flag_is_true_for_a_drifting_night_and_false_for_a_normal_one(tmp_path, server):
    """The fake server's classes are uniform over the 10 labels (a hash of the bytes), as is the
    reference, and it flags 2% of photos unfamiliar, as the reference expects: a normal night. The
    same photos from a server that flags 30% are a night that is off. A reference where 91% of
    photos are bags shifts the class mix, which is reported but is no fault on its own."""
    inbox = tmp_path / "inbox"
    write_photos(inbox, 200)
    normal = tmp_path / "normal.json"
    normal.write_text(json.dumps(fake_reference()))
    skewed_doc = fake_reference()
    skewed_doc["reference"]["class_distribution"] = [0.01] * 8 + [0.91, 0.01]
    skewed = tmp_path / "skewed.json"
    skewed.write_text(json.dumps(skewed_doc))
    out = tmp_path / "out"
    assert main(args(inbox, out, server.url, "--run-id", "normal", "--reference", str(normal))) == 0
    assert main(args(inbox, out, server.url, "--run-id", "mix", "--reference", str(skewed))) == 0
    with FakeInferenceServer(unfamiliar_share=0.3) as odd:
        assert main(args(inbox, out, odd.url, "--run-id", "drift", "--reference", str(normal))) == 8
    calm, mix, drifted = (metadata(out, r)["drift"] for r in ("normal", "mix", "drift"))
    assert calm["available"] and calm["drift"] is False
    assert calm["signals"]["class_mix"]["drift"] is False and calm["signals"]["confidence"]["drift"] is False
    assert mix["signals"]["class_mix"]["drift"] is True and mix["class_mix_shift"] is True and mix["drift"] is False
    assert mix["signals"]["class_mix"]["p_value"] < 0.01 < calm["signals"]["class_mix"]["p_value"]
    assert drifted["drift"] is True and drifted["signals"]["unfamiliar"]["drift"] is True


def test_sharded_run_metadata_carries_the_drift_flag_too(tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 120)
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(fake_reference()))
    with FakeInferenceServer(unfamiliar_share=0.3) as odd:
        common = args(inbox, tmp_path / "out", odd.url, "--run-id", "s", "--shard-count", "2",
                      "--reference", str(ref), "--on-drift", "record")
        assert main([*common, "--shard-index", "0"]) == 8 and main([*common, "--shard-index", "1"]) == 8
    meta = metadata(tmp_path / "out", "s")
    assert meta["shard"]["index"] is None and meta["drift"]["drift"] is True and meta["night_off"] is True


# ---- the client's retries -----------------------------------------------------------------------

@pytest.mark.parametrize("status", [408, 409, 425, 429])
def test_client_retries_the_documented_transient_statuses(tmp_path, status):
    photos = [p.read_bytes() for p in write_photos(tmp_path, 2)]
    with FakeInferenceServer(fail_first=[status, status]) as s:
        c = InferenceClient(s.url, "returns-classifier", retries=3, backoff=0.01, backoff_max=0.02)
        ans = c.predict(photos)
    assert ans.attempts == 3 and s.requests == 3 and all("label" in p for p in ans.predictions)


@pytest.mark.parametrize("status", [403, 405, 413])
def test_client_does_not_retry_other_client_errors(tmp_path, status):
    with FakeInferenceServer(fail_first=[status]) as s:
        c = InferenceClient(s.url, "returns-classifier", retries=3, backoff=0.01, backoff_max=0.02)
        with pytest.raises(ProtocolError, match=str(status)):
            c.predict([write_photos(tmp_path, 1)[0].read_bytes()])
    assert s.requests == 1


def test_a_run_retries_429_and_counts_the_retried_photos(tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 6)
    with FakeInferenceServer(fail_first=[429, 425]) as s:
        assert main(args(inbox, tmp_path / "out", s.url, "--run-id", "r", "--batch-size", "3",
                         "--concurrency", "1")) == 0
    meta = metadata(tmp_path / "out", "r")
    assert meta["counts"]["classified"] == 6 and meta["counts"]["retried"] == 3  # the first batch's 3 photos
    assert max(r["attempts"] for r in read_jsonl(tmp_path / "out" / "run_r" / "predictions.jsonl")) == 3


# ---- sharding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("again", ["1", "3"])
def test_resuming_a_run_with_another_shard_count_exits_2(tmp_path, server, capsys, again):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 6)
    out = tmp_path / "out"
    assert main(args(inbox, out, server.url, "--run-id", "sh", "--shard-count", "2", "--shard-index", "0")) == 0
    before = sorted(p.name for p in (out / "run_sh").iterdir())
    capsys.readouterr()
    code = main(args(inbox, out, server.url, "--run-id", "sh", "--shard-count", again, "--shard-index", "0"))
    assert code == 2
    assert "was started with --shard-count 2" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "run_sh").iterdir()) == before  # nothing written by the refused run


# ---- the model changing mid-run -----------------------------------------------------------------

def test_models_seen_lists_each_model_the_server_answered_with(tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 12)
    with FakeInferenceServer() as s:
        original = s.answer

        def answer(*a):
            if s.requests >= 2:  # a new model is rolled out after two requests (8 photos)
                s.sha = "cd" * 32
            return original(*a)

        s.answer = answer
        assert main(args(inbox, tmp_path / "out", s.url, "--run-id", "m", "--batch-size", "4",
                         "--concurrency", "1")) == 0
    model = metadata(tmp_path / "out", "m")["model"]
    seen = {m["sha256"]: m["photos"] for m in model["models_seen"]}
    assert seen == {"ab" * 32: 8, "cd" * 32: 4}
    assert model["sha256"] == "ab" * 32  # the model that answered most photos


# ---- request size -------------------------------------------------------------------------------

def test_max_request_bytes_splits_batches_by_photo_bytes(tmp_path):
    inbox = tmp_path / "inbox"
    photos = write_photos(inbox, 20)
    sizes = [p.stat().st_size for p in photos]
    limit = 3 * max(sizes)
    bodies: list[int] = []
    with FakeInferenceServer(max_instances=64) as s:
        original = s.answer

        def answer(path, body, auth):
            bodies.append(sum(len(base64.b64decode(i["b64"])) for i in json.loads(body)["instances"]))
            return original(path, body, auth)

        s.answer = answer
        assert main(args(inbox, tmp_path / "out", s.url, "--run-id", "b", "--batch-size", "16",
                         "--max-request-bytes", str(limit))) == 0
    assert sum(bodies) == sum(sizes) and len(read_jsonl(tmp_path / "out" / "run_b" / "predictions.jsonl")) == 20
    assert max(bodies) <= limit and len(bodies) >= -(-sum(sizes) // limit)
    assert max(bodies) > limit - max(sizes)  # requests are filled up to the limit, not cut short


def test_a_photo_larger_than_max_request_bytes_is_still_sent_alone(tmp_path, server):
    inbox = tmp_path / "inbox"
    photos = write_photos(inbox, 3)
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "one",
                     "--max-request-bytes", str(min(p.stat().st_size for p in photos) - 1))) == 0
    assert server.requests == 3 and len(read_jsonl(tmp_path / "out" / "run_one" / "predictions.jsonl")) == 3


# ---- moves that cannot happen ---------------------------------------------------------------------

def test_move_failed_counts_photos_that_could_not_be_archived(tmp_path, server):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 5)
    not_a_folder = tmp_path / "archive-is-a-file"
    not_a_folder.write_text("x")
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "mf", "--after", "move",
                     "--archive-dir", str(not_a_folder))) == 0
    meta = metadata(tmp_path / "out", "mf")
    assert meta["counts"]["move_failed"] == 5 and meta["counts"]["classified"] == 5
    assert len(list(inbox.glob("*.png"))) == 5  # recorded, and still in the inbox


def test_read_only_inbox_with_after_keep_copies_rejects_to_quarantine(tmp_path, server):
    """The chart's default: the inbox mounted read-only, --after keep. Rejected photos are copied
    (not moved) to quarantine, move_failed counts them, and the run succeeds."""
    with SmallVolume(tmp_path / "inbox", "4m") as vol:
        if not vol.available:
            pytest.skip("a read-only inbox needs a tmpfs mount (root); not available here")
        write_photos(vol.path, 4)
        (vol.path / "broken.png").write_bytes(b"not a photo")
        vol.readonly()
        out = tmp_path / "out"
        assert main(args(vol.path, out, server.url, "--run-id", "ro", "--max-error-rate", "1")) == 0
        meta = metadata(out, "ro")
        assert meta["counts"]["classified"] == 4 and meta["counts"]["rejected"] == 1
        assert meta["counts"]["move_failed"] == 1 and meta["status"] == "complete"
        (rej,) = read_jsonl(out / "run_ro" / "rejected.jsonl")
        assert (out / rej["quarantined_to"]).read_bytes() == b"not a photo"
        assert (vol.path / "broken.png").exists()  # still there: the inbox is read-only


def test_an_unlistable_folder_is_skipped_and_counted(tmp_path, server, monkeypatch):
    """A folder the submitter may not open (permissions; root ignores them, so it is simulated)."""
    import returns_submit.inbox as inbox_mod

    inbox = tmp_path / "inbox"
    write_photos(inbox / "ok", 3)
    write_photos(inbox / "locked", 2)
    real_open = os.open

    def guarded_open(path, flags, *a, dir_fd=None, **kw):
        if path == "locked" and dir_fd is not None:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *a, dir_fd=dir_fd, **kw)

    monkeypatch.setattr(inbox_mod.os, "open", guarded_open)
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "ul")) == 0
    meta = metadata(tmp_path / "out", "ul")
    assert meta["counts"]["skipped_unlistable"] == 1 and meta["counts"]["classified"] == 3


# ---- low confidence ---------------------------------------------------------------------------------

def test_low_confidence_rate_is_the_share_of_classified_photos_needing_review(tmp_path, server):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 60)
    (inbox / "bad.png").write_bytes(b"not a photo")
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "lc", "--max-error-rate", "1")) == 0
    preds = read_jsonl(tmp_path / "out" / "run_lc" / "predictions.jsonl")
    review = sum(p["needs_review"] for p in preds)
    low = sum("low_confidence" in p["review_reason"] for p in preds)
    assert 0 < low <= review < len(preds) == 60
    meta = metadata(tmp_path / "out", "lc")
    assert meta["low_confidence_rate"] == round(low / 60, 6)  # rejected photos are not in the denominator
    assert meta["counts"]["needs_review"] == review
    assert meta["average_confidence"] == pytest.approx(sum(p["confidence"] for p in preds) / 60, abs=1e-6)
    assert sum(meta["class_distribution"].values()) == 60 and set(meta["class_distribution"]) <= set(CLASSES)


# ---- the merged run of a sharded night (returns_submit.outputs.finalize_shards) ----------------
# It must say what one unsharded run over the same photos says, be published once, by the last
# shard, under a lock, and keep its status, start time and LATEST right.

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
    mu, ms = metadata(one, "u"), metadata(two, "s")
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


def test_the_merged_run_of_a_night_two_rules_answered_counts_and_judges_each_rule_as_one_run_would(tmp_path):
    """Both rules answer (a rolling update); each shard and the merged run count photos per rule and
    judge each rule's answers against its own reference, and the merge says what one unsharded run says."""
    ref = tmp_path / "manifest.json"
    ref.write_text(json.dumps(fake_manifest("int8", float=fake_reference()["reference"], int8=unlike_reference())))
    inbox = tmp_path / "a" / "inbox"
    write_photos(inbox, 160)
    shutil.copytree(inbox, tmp_path / "b" / "inbox")
    one, two = tmp_path / "one", tmp_path / "two"
    with FakeInferenceServer(rules=("float", "int8")) as s:
        assert main(submit_args(inbox, one, s.url, "--run-id", "u", "--after", "keep", "--reference", str(ref),
                                "--on-drift", "record")) == 8
        assert run_sharded(tmp_path / "b" / "inbox", two, s.url, "--reference", str(ref), "--on-drift", "record") \
            == [8, 8]
    mu, ms = metadata(one, "u"), metadata(two, "s")
    answered = Counter(r["rule"] for r in read_jsonl(two / "run_s" / "predictions.jsonl"))
    shards = [Counter(shard["counts"]["rules"]) for shard in ms["shards"]]
    assert ms["counts"]["rules"] == mu["counts"]["rules"] == dict(answered) == dict(shards[0] + shards[1])
    assert set(answered) == {"float", "int8"} and all(set(c) == {"float", "int8"} for c in shards)
    assert ms["drift"]["mixed_rules"] is True and ms["drift"]["by_rule"] == mu["drift"]["by_rule"]
    assert ms["drift"]["by_rule"]["float"]["drift"] is False and ms["drift"]["by_rule"]["int8"]["drift"] is True
    assert ms["drift"] == mu["drift"] and ms["night_off"] is True


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
    meta = metadata(tmp_path / "out", "s")
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
    assert metadata(out, "s")["status"] == "complete"
    for name in (run / "run_metadata.json", run / "_SUCCESS", out / "LATEST"):
        name.unlink()
    assert outputs.finalize_shards(out, run, "s", 2, 1.0, 0.01, "fail", {"shard_count": 2},
                                   read_reference(reference)) is True
    meta = metadata(out, "s")
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
    assert result == [True] and metadata(out, "s")["counts"] == \
        json.loads(meta_before)["counts"]


# ---- the drift section's edges --------------------------------------------------------------------

def test_without_a_reference_the_drift_section_says_so(tmp_path, server):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 5)
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "n")) == 0
    meta = metadata(tmp_path / "out", "n")
    assert {k: meta["drift"][k] for k in ("available", "drift", "reason")} == {
        "available": False, "drift": None, "reason": "no --reference given (artifact_manifest.json or model.json)"}
    assert meta["model"]["name"] == "returns-classifier" and meta["model"]["version"] == "1.0"


def test_a_reference_without_a_confidence_histogram_and_classes_it_never_saw(tmp_path, server):
    """An older reference (no histogram) still judges the class mix; classes the reference does not
    know are counted, not dropped."""
    doc = fake_reference(class_names=CLASSES[:8])
    del doc["reference"]["confidence_histogram"]
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(doc))
    inbox = tmp_path / "inbox"
    write_photos(inbox, 60)
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "o", "--reference", str(ref))) in (0, 8)
    meta = metadata(tmp_path / "out", "o")
    recs = read_jsonl(tmp_path / "out" / "run_o" / "predictions.jsonl")
    unknown = sum(r["class_id"] >= 8 for r in recs)
    assert unknown > 0 and meta["drift"]["signals"]["class_mix"]["unknown_class_ids"] == unknown


def test_a_night_too_small_to_judge_is_neither_off_nor_calm_and_the_start_is_logged(tmp_path, server, capsys):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(fake_reference()))
    inbox = tmp_path / "inbox"
    write_photos(inbox, 5)
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "t", "--reference", str(ref))) == 0
    assert metadata(tmp_path / "out", "t")["drift"]["drift"] is None  # 5 photos: no signal can decide
    (start,) = [e for e in log_events(capsys.readouterr().err) if e.get("event") == "start"]
    assert (start["msg"], start["run_id"], start["shard"], start["shard_count"]) == ("start", "t", 0, 1)
