"""Promises of docs/submitter.md that had no test (issue 17), against the fake server in process:
the run-level drift flag, retries on 408/409/425/429, a resume with another --shard-count, models_seen,
--max-request-bytes, a read-only inbox with --after keep, move_failed, skipped_unlistable and
low_confidence_rate."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from returns_submit.cli import main
from returns_submit.client import InferenceClient
from returns_submit.errors import ProtocolError
from tests.submit_fixtures import (CLASSES, FakeInferenceServer, SmallVolume, fake_reference, read_jsonl,
                                   write_photos)


@pytest.fixture
def server():
    with FakeInferenceServer() as s:
        yield s


def args(inbox: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["--inbox", str(inbox), "--output", str(out), "--endpoint", url, "--progress", "log",
            "--backoff", "0.01", "--backoff-max", "0.05", "--connect-deadline", "2", *extra]


def metadata(out: Path, run_id: str) -> dict:
    return json.loads((out / f"run_{run_id}" / "run_metadata.json").read_text())


# ---- drift ----------------------------------------------------------------------------------

def test_run_metadata_drift_flag_is_true_for_a_drifting_night_and_false_for_a_normal_one(tmp_path, server):
    """The fake server's classes are uniform over the 10 labels (a hash of the bytes), as is the
    first reference: a normal night. Against a reference where 91% of photos are bags, the same
    night has drifted."""
    inbox = tmp_path / "inbox"
    write_photos(inbox, 200)
    normal = tmp_path / "normal.json"
    normal.write_text(json.dumps(fake_reference()))
    skewed_doc = fake_reference()
    skewed_doc["reference"]["class_distribution"] = [0.01] * 8 + [0.91, 0.01]
    skewed = tmp_path / "skewed.json"
    skewed.write_text(json.dumps(skewed_doc))
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "normal", "--reference", str(normal))) == 0
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "drift", "--reference", str(skewed))) == 0
    calm, drifted = metadata(tmp_path / "out", "normal")["drift"], metadata(tmp_path / "out", "drift")["drift"]
    assert calm["available"] and calm["drift"] is False
    assert calm["signals"]["class_mix"]["drift"] is False and calm["signals"]["confidence"]["drift"] is False
    assert drifted["drift"] is True and drifted["signals"]["class_mix"]["drift"] is True
    assert drifted["signals"]["class_mix"]["p_value"] < 0.01 < calm["signals"]["class_mix"]["p_value"]


def test_sharded_run_metadata_carries_the_drift_flag_too(tmp_path, server):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 120)
    skewed_doc = fake_reference()
    skewed_doc["reference"]["class_distribution"] = [0.91] + [0.01] * 9
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(skewed_doc))
    common = args(inbox, tmp_path / "out", server.url, "--run-id", "s", "--shard-count", "2", "--reference", str(ref))
    assert main([*common, "--shard-index", "0"]) == 0 and main([*common, "--shard-index", "1"]) == 0
    meta = metadata(tmp_path / "out", "s")
    assert meta["shard"]["index"] is None and meta["drift"]["drift"] is True


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
    assert 0 < review < len(preds) == 60
    meta = metadata(tmp_path / "out", "lc")
    assert meta["low_confidence_rate"] == round(review / 60, 6)  # rejected photos are not in the denominator
    assert meta["counts"]["needs_review"] == review
    assert meta["average_confidence"] == pytest.approx(sum(p["confidence"] for p in preds) / 60, abs=1e-6)
    assert sum(meta["class_distribution"].values()) == 60 and set(meta["class_distribution"]) <= set(CLASSES)
