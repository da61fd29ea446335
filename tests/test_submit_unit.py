"""Unit tests of the nightly submitter against a small fake inference server
(tests/submit_fixtures.py); the real TorchServe runs in test_submit_integration.py."""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.submit_fixtures import (submit_args, 
    REPO,
    FakeInferenceServer,
    fake_manifest,
    fake_reference,
    log_events,
    read_csv,
    read_jsonl,
    recorded_paths,
    run_submit,
    submit_cmd,
    unlike_reference,
    write_photos,
)

from returns_submit import drift
from returns_submit.client import BatchFailed, InferenceClient
from returns_submit.inbox import Entry, Photo, Unreadable, read, shard_of, walk
from returns_submit.journal import DoneSet, Journal, OutputLock, read_records, shard_file_names
from returns_submit.mover import complete_move, move, plan, safe_component
from returns_submit.cli import get_args_parser, main
from returns_submit.errors import LockHeld, ProtocolError, RequestRejected


args = submit_args


# ---- the inbox ----------------------------------------------------------------------------

def test_walk_is_sorted_recursive_and_never_follows_symlinks(tmp_path):
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    write_photos(inbox / "b", 2)
    write_photos(inbox / "a", 1)
    write_photos(outside, 1)
    (inbox / "Z.JPG").write_bytes(b"x")
    (inbox / "notes.txt").write_text("x")
    (inbox / ".partial.png").write_bytes(b"x")
    (inbox / "link.png").symlink_to(outside / "item_00000.png")
    (inbox / "linkdir").symlink_to(outside, target_is_directory=True)
    skipped = Counter()
    entries = list(walk(inbox, skipped))
    assert [e.rel for e in entries] == ["Z.JPG", "a/item_00000.png", "b/item_00000.png",
                                        "b/item_00001.png", "link.png"]
    assert [e.is_symlink for e in entries][-1] is True
    assert skipped == Counter(non_image=1, hidden=1, symlink=1)
    got = read(entries[-1], 1 << 20)
    assert isinstance(got, Unreadable) and got.code == "symlink"


def test_walk_skips_an_output_folder_inside_the_inbox(tmp_path):
    write_photos(tmp_path / "in", 2)
    write_photos(tmp_path / "in" / "results" / "archive", 2)
    rels = [e.rel for e in walk(tmp_path / "in", Counter(), exclude=(tmp_path / "in" / "results",))]
    assert rels == ["item_00000.png", "item_00001.png"]


def test_read_rejects_empty_large_special_and_vanished_files(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"0" * 100)
    os.mkfifo(tmp_path / "fifo.png")
    codes = {name: read(Entry(tmp_path, name), max_bytes=50)
             for name in ("empty.png", "big.png", "fifo.png", "gone.png")}
    assert {k: v.code for k, v in codes.items()} == {
        "empty.png": "empty", "big.png": "too_large", "fifo.png": "not_a_file", "gone.png": "vanished"}
    ok = read(Entry(tmp_path, "big.png"), max_bytes=1000)
    assert isinstance(ok, Photo) and len(ok.sha256) == 64


def test_a_photo_that_grows_after_its_size_was_taken_is_read_whole_up_to_the_limit(tmp_path, monkeypatch):
    """read() asks for the size fstat gave (+1), so a file written on meanwhile is read on, and the
    byte limit still holds over the whole of it."""
    import hashlib

    data = b"\x89PNG" + bytes(range(100))
    (tmp_path / "growing.png").write_bytes(data)
    real_fstat = os.fstat

    def stale_fstat(fd):  # the size the file had a moment before the rest was written
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 10,
                               st.st_atime, st.st_mtime, st.st_ctime))

    monkeypatch.setattr("returns_submit.inbox.os.fstat", stale_fstat)
    whole = read(Entry(tmp_path, "growing.png"), max_bytes=1000)
    assert isinstance(whole, Photo) and whole.sha256 == hashlib.sha256(data).hexdigest()
    assert read(Entry(tmp_path, "growing.png"), max_bytes=50).code == "too_large"


def test_a_folder_swapped_for_a_symlink_after_the_listing_is_not_followed(tmp_path):
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    write_photos(inbox / "sub", 1)
    write_photos(outside, 1)
    entry = next(walk(inbox, Counter()))
    assert entry.rel == "sub/item_00000.png"
    shutil.rmtree(inbox / "sub")
    (inbox / "sub").symlink_to(outside, target_is_directory=True)  # swapped during the run
    got = read(entry, 1 << 20)
    assert isinstance(got, Unreadable) and got.code == "symlink"
    assert not move(inbox, entry.rel, tmp_path / "archive" / "x.png")
    assert (outside / "item_00000.png").exists() and not (tmp_path / "archive" / "x.png").exists()


def test_shards_are_disjoint_cover_and_stable():
    rels = [f"d{i % 7}/photo {i}.png" for i in range(2000)] + ["ünïcödé/名前.jpg"]
    for n in (1, 2, 3, 5):
        shards = [{r for r in rels if shard_of(r, n) == i} for i in range(n)]
        assert set().union(*shards) == set(rels)
        assert sum(map(len, shards)) == len(rels)
        if n > 1:
            assert min(map(len, shards)) > len(rels) / n * 0.8  # roughly balanced
    assert shard_of("a/b.png", 4) == shard_of("a/b.png", 4)


# ---- journal, lock, moves ------------------------------------------------------------------

def test_journal_cuts_a_torn_last_line_and_knows_what_is_done(tmp_path):
    j = Journal(tmp_path, 0, 1)
    j.open()
    j.append([{"path": "a.png"}, {"path": "b.png"}], [{"path": "c.png", "code": "empty"}])
    j.close()
    j.close()  # a second close (an error path after the normal one) is harmless
    with open(j.predictions_path, "ab") as f:
        f.write(b'{"path": "d.pn')  # killed mid-line
    done = Journal(tmp_path, 0, 1).open()
    assert len(done) == 3 and "a.png" in done and "c.png" in done and "d.png" not in done
    assert j.predictions_path.read_bytes().endswith(b"}\n")
    assert [r["path"] for r in read_records(j.predictions_path)] == ["a.png", "b.png"]


def test_doneset_membership():
    d = DoneSet([])
    assert "x" not in d and len(d) == 0


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    with OutputLock(tmp_path, "shard-0-of-1", {"run_id": "first"}):
        with pytest.raises(LockHeld, match="first"):
            OutputLock(tmp_path, "shard-0-of-1", {"run_id": "second"}).acquire()
        OutputLock(tmp_path, "shard-1-of-2", {"run_id": "other-shard"}).acquire().release()
    OutputLock(tmp_path, "shard-0-of-1", {"run_id": "third"}).acquire().release()


@pytest.mark.parametrize("content, who", [
    (None, f"pid {os.getpid()} on host {socket.gethostname()}, run first"),
    (b"held by a shell script\n", "held by a shell script"),
    (b"caf\xe9 \n", "caf\ufffd"),
    (b"", "an unknown process"),
    (b'{"pid": 7}', '{"pid": 7}'),
], ids=["json-holder", "text", "not-utf8", "empty", "json-without-host"])
def test_a_refused_lock_names_its_holder_exactly(tmp_path, content, who):
    """The holder's JSON becomes 'pid P on host H, run R'; anything else is quoted as text (bytes
    that are not UTF-8 replaced), and an empty lock file is 'an unknown process'."""
    with OutputLock(tmp_path, "shard-0-of-1", {"run_id": "first"}) as held:
        if content is not None:
            held.path.write_bytes(content)
        with pytest.raises(LockHeld) as e:
            OutputLock(tmp_path, "shard-0-of-1", {"run_id": "second"}).acquire()
    assert f"(.lock.shard-0-of-1, held by {who}); wait for it" in str(e.value)


def test_moves_never_overwrite_and_finish_after_a_kill(tmp_path):
    root = tmp_path / "archive"
    (root / "x").mkdir(parents=True)
    (root / "x" / "a.png").write_bytes(b"old")
    taken: set[str] = set()
    assert plan(root, "x/a.png", taken) == "x/a~1.png"
    assert plan(root, "x/a.png", taken) == "x/a~2.png"
    src = tmp_path / "a.png"
    src.write_bytes(b"new")
    assert move(tmp_path, "a.png", root / "x/a~1.png") and not src.exists()
    assert (root / "x" / "a.png").read_bytes() == b"old"
    # killed after the link but before the unlink: both names exist
    src.write_bytes(b"new")
    os.link(src, root / "x/b.png")
    import hashlib
    assert complete_move(tmp_path, "a.png", root / "x/b.png", hashlib.sha256(b"new").hexdigest())
    assert not src.exists()
    # a new upload with the recorded name but other content stays in the inbox
    src.write_bytes(b"another photo")
    assert not complete_move(tmp_path, "a.png", root / "x/c.png", hashlib.sha256(b"new").hexdigest())
    assert src.exists()
    assert safe_component("T-shirt/top") == "T-shirt_top" and safe_component("..") == "_"


# ---- drift ---------------------------------------------------------------------------------

def test_chi_square_survival_function_matches_tables():
    assert drift.chi2_sf(3.841459, 1) == pytest.approx(0.05, abs=1e-6)
    assert drift.chi2_sf(21.665994, 9) == pytest.approx(0.01, abs=1e-6)
    assert drift.chi2_isf(0.05, 9) == pytest.approx(16.918978, abs=1e-4)


def test_drift_flag_accounts_for_run_size():
    rng = random.Random(0)
    ref = [500.0] * 10
    psis, flags = [], 0
    for _ in range(200):  # no drift, 100 photos: PSI ~0.09, yet (almost) never flagged
        counts = Counter(rng.randrange(10) for _ in range(100))
        out = drift.compare([counts[i] for i in range(10)], ref, alpha=0.01)
        psis.append(out["psi"])
        flags += out["drift"]
    assert 0.06 < sum(psis) / len(psis) < 0.12
    assert flags <= 6
    shifted = [30, 30, 5, 5, 5, 5, 5, 5, 5, 5]  # real drift, same size
    assert drift.compare(shifted, ref, alpha=0.01)["drift"] is True
    assert drift.compare([1, 2, 3], [10, 10, 10], alpha=0.01)["drift"] is None  # too few photos


def test_chi2_sf_edges_and_known_values():
    assert drift.chi2_sf(0.0, 3) == 1.0 and drift.chi2_sf(-2.0, 1) == 1.0
    assert drift.chi2_sf(0.5, 1) == pytest.approx(0.4795001, abs=1e-6)  # below 1: the series branch
    assert drift.chi2_sf(2.0, 4) == pytest.approx(math.exp(-1) * 2, abs=1e-9)  # Q(2, 1) = 2/e
    assert 0.0 <= drift.chi2_sf(500.0, 2) < 1e-100


def test_chi2_isf_inverts_the_survival_function_below_1_too():
    assert drift.chi2_isf(0.5, 1) == pytest.approx(0.4549364, abs=1e-5)
    assert drift.chi2_isf(0.01, 1) == pytest.approx(6.634897, abs=1e-4)
    for df in (1, 3, 9):
        for p in (0.9, 0.05, 1e-4):
            assert drift.chi2_sf(drift.chi2_isf(p, df), df) == pytest.approx(p, rel=1e-6)


@pytest.mark.parametrize("observed, reference, want", [
    ([10, 0, 1, 1, 8], [100, 1, 2, 2, 95], ([10, 10], [100, 100])),          # sparse middle joins the next
    ([10, 10, 10, 1], [100, 100, 100, 1], ([10, 10, 11], [100, 100, 101])),  # sparse tail joins the last
    ([1, 1], [1, 1], ([2], [2])),                                            # all sparse: one bin
])
def test_merge_sparse_exact(observed, reference, want):
    assert drift._merge_sparse([float(x) for x in observed], [float(x) for x in reference]) == want


def test_merge_sparse_refuses_vectors_of_different_lengths():
    with pytest.raises(ValueError):
        drift._merge_sparse([1.0, 2.0, 3.0], [1.0, 2.0])


def test_psi_of_identical_distributions_is_zero_and_grows_with_shift():
    assert drift.psi([10, 20, 30], [10, 20, 30]) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi([30, 20, 10], [10, 20, 30]) > drift.psi([15, 20, 25], [10, 20, 30]) > 0
    with pytest.raises(ValueError):
        drift.psi([1, 2], [1, 2, 3])


def test_bin_index_clips_and_includes_the_last_edge():
    edges = [0.0, 0.5, 0.9, 1.0]
    assert [drift.bin_index(x, edges) for x in (-1, 0.0, 0.49, 0.5, 0.95, 1.0, 2)] == [0, 0, 0, 1, 2, 2, 2]


def test_compare_reports_every_documented_field_exactly():
    """A 2 x 3 table worked by hand: chi2 = sum (count - expected)^2 / expected over both rows."""
    observed, reference = [10.0, 20.0, 30.0], [30.0, 30.0, 40.0]
    out = drift.compare(observed, reference, alpha=0.05)
    n, n_ref = 60, 100
    chi2 = 0.0
    for o, r in zip(observed, reference):
        col = o + r
        chi2 += (o - n * col / 160) ** 2 / (n * col / 160) + (r - n_ref * col / 160) ** 2 / (n_ref * col / 160)
    scale = 1 / n + 1 / n_ref
    assert set(out) == {"n", "n_reference", "psi", "chi2", "df", "p_value", "psi_expected_no_drift",
                        "psi_critical", "alpha", "drift"}
    assert (out["n"], out["n_reference"], out["df"], out["alpha"]) == (60, 100, 2, 0.05)
    assert out["chi2"] == round(chi2, 4) and out["p_value"] == pytest.approx(math.exp(-chi2 / 2), rel=1e-9)
    assert out["psi"] == round(drift.psi(observed, reference), 6)
    assert out["psi_expected_no_drift"] == round(2 * scale, 6)
    assert out["psi_critical"] == round(drift.chi2_isf(0.05, 2) * scale, 6)
    assert out["drift"] is (out["p_value"] < 0.05)


def test_compare_decides_from_20_photos_and_needs_a_reference():
    ref = [50.0, 50.0]
    small = drift.compare([10.0, 9.0], ref, alpha=0.01)
    assert small["drift"] is None and small["reason"] == "fewer than 20 photos" and small["n"] == 19
    assert set(small) == {"n", "n_reference", "psi", "drift", "reason"}
    assert drift.compare([10.0, 10.0], ref, alpha=0.01)["drift"] is False  # exactly 20: decided
    empty_ref = drift.compare([10.0, 10.0], [0.0, 0.0], alpha=0.01)
    assert empty_ref["drift"] is None and empty_ref["reason"] == "the reference has no photos"
    assert drift.compare([10.0, 10.0], [0.5, 0.5], alpha=0.01)["drift"] is not None  # a tiny reference still counts
    one = drift.compare([25.0, 0.0], [100.0, 0.0], alpha=0.01)
    assert one["drift"] is None and one["reason"] == "a single bin after merging sparse bins"


def test_sparse_bins_merge_at_exactly_five_expected_and_a_tail_with_no_photos_still_joins():
    assert drift._merge_sparse([3.0, 7.0, 90.0], [5.0, 5.0, 90.0]) == ([3.0, 7.0, 90.0], [5.0, 5.0, 90.0])
    assert drift._merge_sparse([50.0, 50.0, 0.0], [48.0, 48.0, 4.0]) == ([50.0, 50.0], [48.0, 52.0])


def test_compare_keeps_a_bin_with_a_single_reference_photo_and_decides_p_below_alpha():
    got = drift.compare([0.0, 1000.0], [1.0, 9.0], alpha=0.01)
    assert got["df"] == 1  # the first bin (0 photos tonight, 1 in the reference) is a column of its own
    at = drift.compare([12.0, 8.0], [50.0, 50.0], alpha=0.5)
    assert drift.compare([12.0, 8.0], [50.0, 50.0], alpha=at["p_value"])["drift"] is False  # p = alpha: no drift


def test_judge_rules_shows_the_largest_rule_at_the_top_and_the_night_is_off_when_any_rule_is():
    from returns_model.manifest import Reference

    single, unlike = fake_reference()["reference"], unlike_reference()
    ref = Reference(single, "m.json", by_rule={"int8": unlike}, by_rule_at={"int8": "references.int8"})
    tallies = {}
    for rule, n in (("float", 120), ("int8", 100), (None, 10)):
        t = tallies[drift.rule_key(rule)] = drift.Tally(rule, drift.edges_of(ref.for_rule(rule).body))
        for i in range(n):
            t.add(i % 10, 0.3 + 0.7 * (i % 7 + 0.5) / 7, i == 0)
    got = drift.judge_rules(ref, tallies, alpha=0.01)
    by_rule = got["by_rule"]
    assert list(by_rule) == ["float", "int8", "unknown"] and got["mixed_rules"] is True
    assert [by_rule[k]["reference_body"] for k in by_rule] == ["reference", "references.int8", "reference"]
    assert [by_rule[k]["reference_fallback"] for k in by_rule] == [True, False, True]
    assert [by_rule[k]["drift"] for k in by_rule] == [False, True, None]  # 10 photos: too few to judge
    assert got["rule"] == "float" and got["signals"] == by_rule["float"]["signals"]
    assert got["drift"] is True and got["class_mix_shift"] is True  # the int8 answers' class mix shifted
    alone = drift.judge_rules(ref, {"float": tallies["float"]}, alpha=0.01)
    assert {k: alone[k] for k in by_rule["float"]} == by_rule["float"] and alone["mixed_rules"] is False
    assert drift.judge_rules(None, tallies, 0.01)["by_rule"]["int8"] == {
        "available": False, "drift": None, "reason": "no --reference given (artifact_manifest.json or model.json)"}


# ---- the HTTP client ------------------------------------------------------------------------

def photo_bytes(tmp_path, n):
    return [p.read_bytes() for p in write_photos(tmp_path, n)]


def test_client_retries_5xx_and_404_then_succeeds(tmp_path):
    with FakeInferenceServer(fail_first=[503, 404, 500]) as s:
        c = InferenceClient(s.url, "returns-classifier", retries=4, backoff=0.01, backoff_max=0.02)
        ans = c.predict(photo_bytes(tmp_path, 3))
    assert ans.attempts == 4 and len(ans.predictions) == 3 and s.requests == 4


def test_client_gives_up_after_the_retries(tmp_path):
    with FakeInferenceServer(fail_first=[503] * 10) as s:
        c = InferenceClient(s.url, "returns-classifier", retries=2, backoff=0.01, backoff_max=0.02)
        with pytest.raises(BatchFailed) as e:
            c.predict(photo_bytes(tmp_path, 1))
    assert e.value.server_error and e.value.attempts == 3 and s.requests == 3


def test_client_treats_400_with_predictions_as_an_answer_and_400_error_as_fatal(tmp_path):
    with FakeInferenceServer(max_instances=2) as s:
        c = InferenceClient(s.url, "returns-classifier", api="v1", retries=0)
        ans = c.predict([b"not an image", b"nor this"])
        assert [p["error"]["code"] for p in ans.predictions] == ["not_an_image"] * 2
        with pytest.raises(RequestRejected) as e:
            c.predict([b"a", b"b", b"c"])
        assert e.value.exit_code == 2 and "too_many_instances" in str(e.value)


def test_client_rejects_an_answer_of_the_wrong_length(tmp_path):
    with FakeInferenceServer(wrong_length=True) as s:
        c = InferenceClient(s.url, "returns-classifier", retries=0)
        with pytest.raises(ProtocolError, match="2 predictions for 3 photos"):
            c.predict(photo_bytes(tmp_path, 3))


def test_a_server_breaking_the_contract_fails_the_run_with_status_failed(tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 3)
    with FakeInferenceServer(wrong_length=True) as s:
        code = main(args(inbox, tmp_path / "out", s.url, "--run-id", "w", "--retries", "0"))
    meta = json.loads((tmp_path / "out" / "run_w" / "run_metadata.json").read_text())
    assert code == meta["exit_code"] == 1 and meta["status"] == "failed"  # EXIT_INTERNAL: not ours to retry blindly
    assert "2 predictions for 3 photos" in meta["error"] and not (tmp_path / "out" / "run_w" / "_SUCCESS").exists()
    assert sorted(p.name for p in inbox.iterdir()) == [f"item_{i:05d}.png" for i in range(3)]  # nothing lost


def test_client_rereads_a_rotated_token_on_401(tmp_path):
    token = tmp_path / "token"
    token.write_text("old\n")
    with FakeInferenceServer(token="new") as s:
        c = InferenceClient(s.url, "returns-classifier", retries=2, backoff=0.01, token_file=token)
        token.write_text("new\n")
        assert len(c.predict(photo_bytes(tmp_path, 1)).predictions) == 1


# ---- whole runs (in process) -----------------------------------------------------------------

def make_inbox(root: Path, n: int = 60) -> Path:
    inbox = root / "inbox"
    write_photos(inbox / "day1", n // 2)
    write_photos(inbox / "day 2 ünï", n - n // 2, start=500)
    (inbox / "broken.png").write_bytes(b"this is not a png")
    (inbox / "empty.jpg").write_bytes(b"")
    (inbox / "readme.txt").write_text("not a photo")
    return inbox


def test_a_run_records_every_photo_once_and_the_files_agree(tmp_path, server):
    inbox = make_inbox(tmp_path)
    out = tmp_path / "out"
    ref = tmp_path / "artifact_manifest.json"
    ref.write_text(json.dumps(fake_reference()))
    images = sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.suffix in (".png", ".jpg"))
    code = main(args(inbox, out, server.url, "--run-id", "n1", "--batch-size", "7", "--concurrency", "3",
                     "--max-error-rate", "0.1", "--reference", str(ref)))
    assert code == 0
    run = out / "run_n1"
    preds, rejs = read_jsonl(run / "predictions.jsonl"), read_jsonl(run / "rejected.jsonl")
    assert sorted(r["path"] for r in preds + rejs) == images  # exactly once, relative paths
    assert {r["path"]: r["code"] for r in rejs} == {"broken.png": "not_an_image", "empty.jpg": "empty"}
    assert all((out / r["quarantined_to"]).exists() for r in rejs)
    assert not (inbox / "broken.png").exists()  # quarantined, never silently dropped
    rows = read_csv(run / "predictions.csv")
    assert [(r["path"], r["sha256"], r["label"], float(r["confidence"])) for r in rows] == \
        [(r["path"], r["sha256"], r["label"], r["confidence"]) for r in preds]
    review = read_jsonl(run / "review_queue.jsonl")
    # every photo to review, once, in priority order (review_order: unfamiliar first, then smallest margin)
    assert sorted(r["path"] for r in review) == sorted(r["path"] for r in preds if r["needs_review"])
    assert [r["priority"] for r in review] == list(range(1, len(review) + 1))
    assert [r["margin"] for r in review if "unfamiliar" not in r["review_reason"]] == \
        sorted(r["margin"] for r in review if "unfamiliar" not in r["review_reason"])
    meta = json.loads((run / "run_metadata.json").read_text())
    c = meta["counts"]
    assert (c["seen"], c["classified"], c["rejected"], c["skipped_non_image"]) == (62, 60, 2, 1)
    assert c["needs_review"] == len(review)
    assert sum(meta["class_distribution"].values()) == 60
    assert meta["model"]["sha256"] == server.sha and meta["model"]["matches_reference"] is True
    assert meta["latency_ms"]["requests"] == 9 and meta["latency_ms"]["p50"] is not None
    assert meta["drift"]["available"] and meta["drift"]["signals"]["class_mix"]["drift"] is False
    assert meta["config"]["batch_size"] == 7 and meta["status"] == "complete"
    assert (run / "_SUCCESS").exists() and (out / "LATEST").read_text().strip() == "run_n1"
    assert all(set(r) >= {"sha256", "label", "class_id", "confidence", "needs_review", "top_k",
                          "model_name", "model_version", "model_sha256", "shard", "timestamp"} for r in preds)


def test_requests_in_flight_never_exceed_concurrency(tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 40)
    active, peak, lock = [0], [0], threading.Lock()
    with FakeInferenceServer(delay_s=0.05) as s:
        original = s.answer

        def counting(*a):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                return original(*a)
            finally:
                with lock:
                    active[0] -= 1

        s.answer = counting
        assert main(args(inbox, tmp_path / "out", s.url, "--run-id", "c", "--batch-size", "2",
                         "--concurrency", "3")) == 0
    assert peak[0] == 3


def test_rerunning_the_same_run_id_resumes_without_duplicates(tmp_path, server):
    inbox = make_inbox(tmp_path, 40)
    out = tmp_path / "out"
    common = args(inbox, out, server.url, "--run-id", "r", "--batch-size", "5", "--max-error-rate", "1")
    assert main(common) == 0
    run = out / "run_r"
    lines = (run / "predictions.jsonl").read_text().splitlines(keepends=True)
    # as if killed after 3 batches, mid-line
    (run / "predictions.jsonl").write_text("".join(lines[:15]) + lines[15][:20])
    (run / "_SUCCESS").unlink()
    before = server.photos_seen
    assert main(common) == 0
    assert server.photos_seen - before == 40 - 15
    paths = recorded_paths(run)
    assert len(paths) == len(set(paths)) == 42
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["invocations"] == 2 and meta["counts"]["resumed_skipped"] == 15
    assert len(read_csv(run / "predictions.csv")) == 40


def test_after_move_archives_only_recorded_photos(tmp_path, server):
    inbox = make_inbox(tmp_path, 20)
    out = tmp_path / "out"
    assert main(args(inbox, out, server.url, "--run-id", "m", "--after", "move", "--max-error-rate", "1")) == 0
    preds = read_jsonl(out / "run_m" / "predictions.jsonl")
    meta = json.loads((out / "run_m" / "run_metadata.json").read_text())
    assert sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file()) == ["readme.txt"]
    for r in preds:
        dest = out / "archive" / r["archived_to"]
        assert dest.exists() and r["archived_to"].split("/")[1] == safe_component(r["label"])
        assert r["archived_to"].endswith(r["path"])
        assert r["archived_to"].split("/")[0] == meta["started_at"][:10]  # the night's UTC date


def test_an_answer_that_is_neither_a_result_nor_an_error_rejects_that_photo_only(tmp_path):
    inbox = tmp_path / "inbox"
    photos = write_photos(inbox, 5)
    odd = photos[2].read_bytes()

    class OddAnswers(FakeInferenceServer):
        def predict(self, data):
            return ["a list, not a result"] if data == odd else super().predict(data)

    out = tmp_path / "out"
    with OddAnswers() as s:
        assert main(args(inbox, out, s.url, "--run-id", "o", "--max-error-rate", "1")) == 0
    [rej] = read_jsonl(out / "run_o" / "rejected.jsonl")
    assert (rej["path"], rej["code"], rej["source"]) == (photos[2].name, "bad_response", "server")
    assert rej["message"] == "unexpected answer: ['a list, not a result']"
    assert len(read_jsonl(out / "run_o" / "predictions.jsonl")) == 4


def test_after_move_finishes_moves_interrupted_by_a_kill(tmp_path, server):
    inbox = tmp_path / "inbox"
    photos = write_photos(inbox, 6)
    out = tmp_path / "out"
    common = args(inbox, out, server.url, "--run-id", "k", "--after", "move")
    assert main(common) == 0
    preds = read_jsonl(out / "run_k" / "predictions.jsonl")
    victim = preds[0]
    os.replace(out / "archive" / victim["archived_to"], inbox / victim["path"])  # record written, move not
    (out / "run_k" / "_SUCCESS").unlink()
    assert main(common) == 0
    assert not any(p.exists() for p in photos) and (out / "archive" / victim["archived_to"]).exists()
    assert len(read_jsonl(out / "run_k" / "predictions.jsonl")) == 6


def test_a_batch_that_keeps_failing_is_split_until_the_culprit_is_alone(tmp_path, capsys):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 8)
    (inbox / "poison.png").write_bytes(b"\x89PNG-POISON")
    with FakeInferenceServer(poison=b"POISON") as s:
        code = main(args(inbox, tmp_path / "out", s.url, "--run-id", "p", "--batch-size", "9",
                         "--retries", "1", "--max-error-rate", "0.2"))
    assert code == 0
    rejs = read_jsonl(tmp_path / "out" / "run_p" / "rejected.jsonl")
    assert [(r["path"], r["code"]) for r in rejs] == [("poison.png", "server_error")]
    assert len(read_jsonl(tmp_path / "out" / "run_p" / "predictions.jsonl")) == 8
    # the record says what the server said, that the server said it, and that no request answered it
    (rej,) = rejs
    assert "500" in rej["message"] and "Worker died" in rej["message"] and rej["source"] == "server"
    assert rej["request_ms"] == 0.0 and rej["attempts"] == 2
    # each split is logged as a warning with the size split and the error; sizes halve down to 2 or 3
    events = log_events(capsys.readouterr().err)
    splits = [e for e in events if e.get("msg") == "splitting a failing batch"]
    sizes = [e["size"] for e in splits]
    assert sizes[0] == 9 and sizes[-1] in (2, 3) and all(b in (a // 2, a - a // 2) for a, b in zip(sizes, sizes[1:]))
    assert all(e["level"] == "warning" and e["msg"] == "splitting a failing batch" and "Worker died" in e["error"]
               for e in splits)
    rejected = [e for e in events if e.get("event") == "rejected"]
    assert [(e["msg"], e["level"], e["path"], e["code"]) for e in rejected] == \
        [("rejected", "warning", "poison.png", "server_error")] and "Worker died" in rejected[0]["reason"]


def test_a_poison_photo_first_in_the_night_is_rejected_not_a_stop_on_every_resume(tmp_path):
    """One photo per request and the very first photo crashes the worker: no photo has been
    classified yet to prove the server healthy, so the submitter asks it to classify a blank PNG
    of its own; the server answers it, so the poison photo alone is rejected and the night goes on."""
    inbox = tmp_path / "inbox"
    write_photos(inbox, 4)
    (inbox / "a_poison.png").write_bytes(b"\x89PNG-POISON")
    with FakeInferenceServer(poison=b"POISON") as s:
        code = main(args(inbox, tmp_path / "out", s.url, "--run-id", "f", "--batch-size", "1", "--concurrency", "1",
                         "--retries", "1", "--max-error-rate", "0.5"))
    assert code == 0
    rejs = read_jsonl(tmp_path / "out" / "run_f" / "rejected.jsonl")
    assert [(r["path"], r["code"]) for r in rejs] == [("a_poison.png", "server_error")]
    assert len(read_jsonl(tmp_path / "out" / "run_f" / "predictions.jsonl")) == 4


def test_the_health_probe_is_a_real_png():
    from PIL import Image
    from returns_submit.runner import BLANK_PNG

    img = Image.open(__import__("io").BytesIO(BLANK_PNG))
    img.load()
    assert img.size == (28, 28) and img.mode == "L" and img.getextrema() == (0, 0)


@pytest.mark.parametrize("fail_after", [0, 3])
def test_a_server_that_fails_everything_stops_the_run_instead_of_rejecting_photos(tmp_path, fail_after):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 20)
    with FakeInferenceServer(fail_after=fail_after) as s:
        code = main(args(inbox, tmp_path / "out", s.url, "--run-id", "down", "--batch-size", "4",
                         "--retries", "1"))
    assert code == 4
    run = tmp_path / "out" / "run_down"
    assert read_jsonl(run / "rejected.jsonl") == []  # nothing turned into a rejection
    assert len(read_jsonl(run / "predictions.jsonl")) <= 4 * fail_after
    assert json.loads((run / "run_metadata.json").read_text())["status"] == "server_unreachable"


def test_an_error_rate_above_the_maximum_exits_3_but_completes(tmp_path, server):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 3)
    (inbox / "bad.png").write_bytes(b"nope")
    assert main(args(inbox, tmp_path / "out", server.url, "--run-id", "e", "--max-error-rate", "0.1")) == 3
    meta = json.loads((tmp_path / "out" / "run_e" / "run_metadata.json").read_text())
    assert meta["status"] == "partial" and meta["error_rate"] == 0.25
    assert (tmp_path / "out" / "run_e" / "_SUCCESS").exists()


def test_unreachable_server_exits_4_after_the_deadline(tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 2)
    t0 = time.monotonic()
    code = main(args(inbox, tmp_path / "out", "http://127.0.0.1:9", "--run-id", "u",
                     "--connect-deadline", "1"))
    assert code == 4 and time.monotonic() - t0 < 10
    meta = json.loads((tmp_path / "out" / "run_u" / "run_metadata.json").read_text())
    assert meta["status"] == "server_unreachable" and not (tmp_path / "out" / "run_u" / "_SUCCESS").exists()


def test_a_server_that_takes_fewer_photos_per_request_gets_smaller_requests(tmp_path, capsys):
    """--batch-size 4 against a server limited to 2: the first request is refused with the limit
    stated, that batch goes again as requests of 2, every later one is cut to 2, and the night
    finishes with every photo classified once, a warning in the log and the size used recorded."""
    inbox = tmp_path / "inbox"
    write_photos(inbox, 9)
    with FakeInferenceServer(max_instances=2) as s:
        code = main(args(inbox, tmp_path / "out", s.url, "--run-id", "b", "--batch-size", "4", "--concurrency", "1"))
        requests = s.requests
    assert code == 0
    run = tmp_path / "out" / "run_b"
    assert len(read_jsonl(run / "predictions.jsonl")) == 9 and (run / "_SUCCESS").exists()
    # the refused 4 and its 2+2, then 2, 2 and 1 for the other five; the next batch of 4 may already
    # have been formed (and is refused too) while the first one was being answered
    assert requests in (1 + 5, 2 + 5)
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["invocation"]["batch_size_used"] == 2 and meta["counts"]["rejected"] == 0
    warned = [e for e in log_events(capsys.readouterr().err) if e.get("now") == 2]
    assert warned and warned[0]["batch_size"] == 4 and "the limit is 2" in warned[0]["server"]


@pytest.mark.parametrize("message, limit", [
    ("server rejected the request (too_many_instances): 300 instances in one request; the limit is 256", 256),
    ("server rejected the request (too_many_instances): too_many_instances: 9 photos in one request; allowed 1 to 8", 8),
    ("server rejected the request (too_many_instances): 9 > 8", None),
    ("the limit is 0", None),
])
def test_the_limit_a_server_states_is_read_from_its_message(message, limit):
    from returns_submit.runner import _stated_limit

    assert _stated_limit(message) == limit


def test_a_one_photo_request_refused_as_too_many_is_still_a_configuration_error(tmp_path, capsys):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 2)
    with FakeInferenceServer(max_instances=0) as s:
        code = main(args(inbox, tmp_path / "out", s.url, "--run-id", "z", "--batch-size", "1"))
    assert code == 2 and "too_many_instances" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--shard-index", "2", "--shard-count", "2", "--run-id", "x"], "shard-index"),
    (["--shard-count", "2"], "needs --run-id"),
    (["--run-id", "../escape"], "run-id"),
    (["--max-error-rate", "2"], "max-error-rate"),
    (["--output", "INBOX"], "must not be the inbox"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, extra, message):
    (tmp_path / "inbox").mkdir()
    extra = [str(tmp_path / "inbox") if x == "INBOX" else x for x in extra]
    assert main(args(tmp_path / "inbox", tmp_path / "out", "http://127.0.0.1:9", *extra)) == 2
    assert message in capsys.readouterr().err


def test_missing_inbox_and_unknown_flag_exit_2(tmp_path):
    assert main(["--inbox", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert main(["--no-such-flag"]) == 2


def test_environment_variables_configure_the_run(monkeypatch, tmp_path):
    monkeypatch.setenv("RETURNS_INBOX", str(tmp_path))
    monkeypatch.setenv("RETURNS_BATCH_SIZE", "9")
    monkeypatch.setenv("RETURNS_API", "v1")
    monkeypatch.setenv("RETURNS_SHARD_COUNT", "3")
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    a = get_args_parser().parse_args([])
    assert (a.inbox, a.batch_size, a.api, a.shard_index, a.shard_count) == (tmp_path, 9, "v1", 2, 3)
    monkeypatch.setenv("RETURNS_SHARD_INDEX", "1")
    assert get_args_parser().parse_args(["--batch-size", "4"]).shard_index == 1
    assert get_args_parser().parse_args(["--batch-size", "4"]).batch_size == 4


def test_a_second_run_on_the_same_output_is_refused(tmp_path, server):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 2)
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out, "shard-0-of-1", {"run_id": "holder"}):
        r = run_submit(*args(inbox, out, server.url, "--run-id", "second"), timeout=60)
    assert r.returncode == 5 and "another submitter is running" in r.stderr and "holder" in r.stderr


def test_shards_write_their_own_files_and_the_last_one_completes_the_run(tmp_path, server):
    inbox = make_inbox(tmp_path, 30)
    out = tmp_path / "out"
    common = args(inbox, out, server.url, "--run-id", "s", "--shard-count", "2", "--max-error-rate", "1")
    assert main([*common, "--shard-index", "0"]) == 0
    run = out / "run_s"
    assert (run / "_SUCCESS.shard-0-of-2").exists() and not (run / "_SUCCESS").exists()
    assert main([*common, "--shard-index", "1"]) == 0
    s0 = {r["path"] for f in ("predictions", "rejected") for r in read_jsonl(run / f"{f}.shard-0-of-2.jsonl")}
    s1 = {r["path"] for f in ("predictions", "rejected") for r in read_jsonl(run / f"{f}.shard-1-of-2.jsonl")}
    assert s0 and s1 and not s0 & s1 and len(s0 | s1) == 32
    merged = read_jsonl(run / "predictions.jsonl") + read_jsonl(run / "rejected.jsonl")
    assert sorted(r["path"] for r in merged) == sorted(s0 | s1)
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["counts"]["seen"] == 32 and len(meta["shards"]) == 2
    assert (run / "_SUCCESS").exists() and (out / "LATEST").read_text().strip() == "run_s"
    # each shard counts the photos it left to the other, and names its own files (not its state)
    for i, (mine, theirs) in enumerate(((s0, s1), (s1, s0))):
        shard = json.loads((run / f"run_metadata.shard-{i}-of-2.json").read_text())
        assert shard["counts"]["other_shards"] == len(theirs) and shard["counts"]["seen"] == len(mine)
        assert shard["files"] == {k: v for k, v in shard_file_names(i, 2).items() if k != "state"}


def test_what_the_walk_left_out_and_what_the_submitter_rejected_are_counted_and_described(tmp_path, server):
    inbox = make_inbox(tmp_path, 4)
    write_photos(inbox, 1, names=[".hidden.png"])
    write_photos(inbox / "day1", 1, start=7, names=[".also_hidden.png"])
    out = tmp_path / "out"
    assert main(args(inbox, out, server.url, "--run-id", "w", "--max-error-rate", "1")) == 0
    meta = json.loads((out / "run_w" / "run_metadata.json").read_text())
    assert (meta["counts"]["skipped_hidden"], meta["counts"]["skipped_non_image"]) == (2, 1)
    assert meta["model"]["matches_reference"] is None  # no --reference: nothing to compare with
    [empty] = [r for r in read_jsonl(out / "run_w" / "rejected.jsonl") if r["path"] == "empty.jpg"]
    assert (empty["size"], empty["sha256"], empty["code"]) == (0, None, "empty")  # sha256 only when read
    assert isinstance(empty["message"], str) and empty["message"]


def test_latest_names_the_newest_complete_run(tmp_path, server):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 2)
    out = tmp_path / "out"
    assert main(args(inbox, out, server.url, "--run-id", "old")) == 0
    assert main(args(inbox, out, server.url, "--run-id", "new")) == 0
    assert (out / "LATEST").read_text().strip() == "run_new"
    assert main(args(inbox, out, server.url, "--run-id", "old")) == 0  # re-run of an older run
    assert (out / "LATEST").read_text().strip() == "run_new"


def test_the_submitter_imports_no_torch():
    code = "import sys, returns_submit.cli, returns_submit.runner; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_help_documents_exit_codes_and_env_vars():
    r = run_submit("--help", timeout=60)
    assert r.returncode == 0
    for text in ("RETURNS_BATCH_SIZE", "JOB_COMPLETION_INDEX", "exit codes", "another run holds the lock"):
        assert text in r.stdout


# ---- signals (subprocess) --------------------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 3])
def test_sigterm_finishes_the_batch_in_flight_and_exits_7(tmp_path, concurrency):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 40)
    out = tmp_path / "out"
    with FakeInferenceServer(delay_s=0.15) as s:
        cmd = submit_cmd(*args(inbox, out, s.url, "--run-id", "t", "--batch-size", "2",
                               "--concurrency", str(concurrency)))
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while s.requests < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 7, err
        sent = s.photos_seen
        run = out / "run_t"
        assert len(recorded_paths(run)) == sent  # the batch in flight was recorded
        meta = json.loads((run / "run_metadata.json").read_text())
        assert meta["status"] == "interrupted" and not (run / "_SUCCESS").exists()
        assert main(args(inbox, out, s.url, "--run-id", "t")) == 0
    paths = recorded_paths(run)
    assert len(paths) == len(set(paths)) == 40


def test_sigkill_at_random_moments_then_resume_is_exactly_once(tmp_path):
    inbox = make_inbox(tmp_path, 60)
    out = tmp_path / "out"
    rng = random.Random(4)
    with FakeInferenceServer(delay_s=0.02) as s:
        cmd = submit_cmd(*args(inbox, out, s.url, "--run-id", "k", "--batch-size", "3", "--concurrency", "2",
                               "--after", "move", "--max-error-rate", "1"))
        killed = 0
        for _ in range(5):
            target = s.requests + rng.randint(1, 4)
            proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while s.requests < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.03))  # anywhere in the batch: sending, recording, moving
            killed += proc.poll() is None
            proc.kill()
            proc.wait(timeout=10)
        assert killed >= 3
        assert subprocess.run(cmd, cwd=REPO, stderr=subprocess.DEVNULL, timeout=60).returncode == 0
    paths = recorded_paths(out / "run_k")
    assert len(paths) == len(set(paths)) == 62
    assert sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file()) == ["readme.txt"]


def test_pod_metadata_is_read_through_the_kubernetes_client(monkeypatch):
    from types import SimpleNamespace

    from kubernetes import client, config

    from returns_submit import k8s_info

    assert k8s_info.pod_info({}) is None  # outside a cluster
    calls = []
    pod = SimpleNamespace(spec=SimpleNamespace(node_name="node-7"), status=SimpleNamespace(container_statuses=[
        SimpleNamespace(name="submit", image="reg/returns-submit:1.0",
                        image_id="reg/returns-submit@sha256:" + "1" * 64)]))
    monkeypatch.setattr(config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(client, "CoreV1Api", lambda: SimpleNamespace(
        read_namespaced_pod=lambda name, namespace, **kw: calls.append((name, namespace)) or pod))
    info = k8s_info.pod_info({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_NAME": "submit-0-abc",
                              "POD_NAMESPACE": "returns"})
    assert calls == [("submit-0-abc", "returns")]
    assert info["node"] == "node-7" and info["containers"][0]["image_id"].endswith("1" * 64)
    monkeypatch.setattr(config, "load_incluster_config", lambda: (_ for _ in ()).throw(RuntimeError("no RBAC")))
    failed = k8s_info.pod_info({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "HOSTNAME": "p"})
    assert "no RBAC" in failed["error"] and failed["pod"] == "p"  # reported, never fatal


def test_progress_bar_mode_runs_and_still_records_everything(tmp_path, server):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 5)
    a = args(inbox, tmp_path / "out", server.url, "--run-id", "bar")
    a[a.index("log")] = "bar"
    assert main(a) == 0
    assert len(read_jsonl(tmp_path / "out" / "run_bar" / "predictions.jsonl")) == 5


def test_a_read_only_output_exits_6_and_leaves_the_manifest_intact(tmp_path, server):
    from tests.submit_fixtures import SmallVolume
    inbox = tmp_path / "inbox"
    write_photos(inbox, 4)
    with SmallVolume(tmp_path / "vol") as vol:
        if not vol.available:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        out = vol.path / "results"
        assert main(args(inbox, out, server.url, "--run-id", "ro")) == 0
        before = (out / "run_ro" / "run_metadata.json").read_bytes()
        write_photos(inbox, 2, start=50)
        vol.readonly()
        assert main(args(inbox, out, server.url, "--run-id", "ro")) == 6
        assert main(args(inbox, out, server.url, "--run-id", "new")) == 6
        assert (out / "run_ro" / "run_metadata.json").read_bytes() == before
        vol.writable()
        assert main(args(inbox, out, server.url, "--run-id", "ro")) == 0
        paths = recorded_paths(out / "run_ro")
        assert len(paths) == len(set(paths)) == 6


@pytest.mark.slow
def test_memory_stays_flat_however_large_the_inbox(tmp_path, server):
    """Peak RSS of the submitter with a 15 MB and a 150 MB inbox: it streams, so the same."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=False, "
             "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peaks = []
    for n in (15, 150):
        inbox = tmp_path / f"inbox{n}"
        inbox.mkdir()
        for i in range(n):
            (inbox / f"big_{i:04d}.png").write_bytes(b"\x89PNG" + os.urandom(1 << 20))
        cmd = submit_cmd(*args(inbox, tmp_path / f"out{n}", server.url, "--run-id", "mem", "--batch-size", "4",
                               "--concurrency", "2",
                               "--max-error-rate", "1"))
        r = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
        peaks.append(int(r.stdout.strip()) / 1024)  # MiB
        assert len(read_jsonl(tmp_path / f"out{n}" / "run_mem" / "predictions.jsonl")) == n
    assert peaks[1] - peaks[0] < 30, peaks
    assert peaks[1] < 150, peaks  # far below the inbox's 150 MB


def test_an_empty_inbox_is_a_complete_run(tmp_path, server):
    (tmp_path / "inbox").mkdir()
    ref = tmp_path / "model.json"
    ref.write_text(json.dumps(fake_reference()))
    assert main(args(tmp_path / "inbox", tmp_path / "out", server.url, "--run-id", "empty",
                     "--reference", str(ref))) == 0
    run = tmp_path / "out" / "run_empty"
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["counts"]["seen"] == 0 and meta["error_rate"] == 0.0 and meta["average_confidence"] is None
    assert meta["drift"]["signals"]["class_mix"]["drift"] is None  # too few photos to judge
    assert meta["counts"]["rules"] == {} and meta["drift"]["by_rule"] == {} and meta["drift"]["mixed_rules"] is False
    assert read_csv(run / "predictions.csv") == [] and (run / "_SUCCESS").exists()


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path, server):
    """Photo file names come from the outside world: =cmd|' /C calc'!A0 must stay text in Excel."""
    hostile = ["=HYPERLINK(\"evil.example\").png", "+1+1.png", "-2.png", "@SUM(A1).png", "\tTAB.png", "\rCR.png",
               "plain.png"]
    inbox = tmp_path / "inbox"
    write_photos(inbox, len(hostile), names=hostile)
    out = tmp_path / "out"
    assert main(args(inbox, out, server.url, "--run-id", "csv")) == 0
    rows = read_csv(out / "run_csv" / "predictions.csv")
    paths = sorted(r["path"] for r in rows)
    assert paths == sorted("'" + h if h[0] in "=+-@\t\r" else h for h in hostile)
    assert all(not p.startswith(("=", "+", "-", "@", "\t", "\r")) for p in paths)
    # The JSONL manifest keeps the true names; numbers in the CSV stay numbers.
    assert sorted(r["path"] for r in read_jsonl(out / "run_csv" / "predictions.jsonl")) == sorted(hostile)
    assert all(0 <= float(r["confidence"]) <= 1 for r in rows)


# ---- nights that are off --------------------------------------------------------------------------

def _night(tmp_path, share: float, *extra: str, reference: dict | None = None, rules=("float",)):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 300)
    ref = tmp_path / "artifact_manifest.json"
    ref.write_text(json.dumps(reference or fake_reference()))
    out = tmp_path / "out"
    with FakeInferenceServer(unfamiliar_share=share, rules=rules) as s:
        code = main(args(inbox, out, s.url, "--run-id", "n", "--reference", str(ref), *extra))
    run = out / "run_n"
    return code, run, json.loads((run / "run_metadata.json").read_text()), out


def test_a_reference_without_a_confidence_histogram_judges_the_other_signals(tmp_path):
    ref = fake_reference()
    del ref["reference"]["confidence_histogram"]  # e.g. a model.json from before the histogram
    code, _, meta, _ = _night(tmp_path, 0.02, reference=ref)
    assert code == 0 and set(meta["drift"]["signals"]) == {"class_mix", "unfamiliar"}
    assert meta["drift"]["method"].startswith("chi-square test of homogeneity")
    assert meta["drift"]["drift"] is False


def test_the_run_says_who_ran_it_and_the_done_event_carries_the_exit_code(tmp_path, capsys):
    code, run, meta, _ = _night(tmp_path, 0.02)
    inv = meta["invocation"]
    assert code == 0 and (inv["pid"], inv["host"], inv["processed"]) == (os.getpid(), socket.gethostname(), 300)
    assert inv["started_at"] <= inv["ended_at"] == meta["ended_at"]
    flagged = sum("unfamiliar" in r["review_reason"] for r in read_jsonl(run / "predictions.jsonl"))
    assert meta["counts"]["unfamiliar"] == flagged > 0
    done = [e for e in log_events(capsys.readouterr().err) if e.get("event") == "done"]
    assert len(done) == 1 and (done[0]["exit_code"], done[0]["status"], done[0]["classified"]) == (0, "complete", 300)


def test_an_ordinary_night_is_not_off_and_counts_each_review_reason(tmp_path):
    code, run, meta, out = _night(tmp_path, 0.02)
    assert code == 0 and meta["night_off"] is False and meta["drift"]["drift"] is False
    preds = read_jsonl(run / "predictions.jsonl")
    reasons = meta["counts"]["review_reasons"]
    assert reasons["unfamiliar"] == sum("unfamiliar" in r["review_reason"] for r in preds)
    assert reasons["low_confidence"] == sum("low_confidence" in r["review_reason"] for r in preds)
    assert reasons["night_drift"] == 0 and meta["drift"]["action"] == "none"
    assert meta["low_confidence_rate"] == round(reasons["low_confidence"] / 300, 6)
    assert meta["unfamiliar_rate"] == round(reasons["unfamiliar"] / 300, 6)


def test_a_drifting_night_goes_to_review_by_default_and_exits_8(tmp_path):
    code, run, meta, out = _night(tmp_path, 0.3)
    assert code == 8 and meta["status"] == "complete" and meta["exit_code"] == 8
    assert meta["night_off"] is True and meta["drift"]["signals"]["unfamiliar"]["drift"] is True
    assert meta["drift"]["on_drift"] == "review" and meta["drift"]["action"] == "all_to_review"
    queue = read_jsonl(run / "review_queue.jsonl")
    assert len(queue) == 300 and all("night_drift" in q["review_reason"] for q in queue)
    assert all(r["needs_review"] == "true" for r in read_csv(run / "predictions.csv"))
    assert meta["counts"]["review_reasons"]["night_drift"] == 300 == meta["counts"]["needs_review"]
    # The journal keeps the server's own answers; the night is published (LATEST) for review.
    assert sum(r["needs_review"] for r in read_jsonl(run / "predictions.jsonl")) < 300
    assert (run / "_SUCCESS").exists() and (out / "LATEST").read_text().strip() == "run_n"


def test_on_drift_record_only_flags_and_fail_publishes_nothing(tmp_path):
    code, run, meta, _ = _night(tmp_path / "a", 0.3, "--on-drift", "record")
    assert code == 8 and meta["drift"]["action"] == "recorded"
    assert len(read_jsonl(run / "review_queue.jsonl")) == meta["counts"]["needs_review"] < 300
    code, run, meta, out = _night(tmp_path / "b", 0.3, "--on-drift", "fail")
    assert code == 8 and meta["status"] == "failed_drift" and meta["drift"]["action"] == "failed"
    assert not (run / "_SUCCESS").exists() and not (out / "LATEST").exists()
    assert len(read_jsonl(run / "predictions.jsonl")) == 300  # every photo still recorded


def test_a_new_class_mix_alone_is_a_wave_of_returns_not_a_fault(tmp_path):
    skewed = [0.91] + [0.01] * 9  # the reference saw almost only one class
    code, run, meta, _ = _night(tmp_path, 0.02, reference=fake_reference(class_distribution=skewed))
    assert meta["drift"]["signals"]["class_mix"]["drift"] is True and meta["drift"]["class_mix_shift"] is True
    assert code == 0 and meta["night_off"] is False and meta["drift"]["drift"] is False


def test_a_float_night_is_judged_against_the_float_reference_not_the_one_the_archive_serves(tmp_path):
    """The archive serves int8 on a CPU, so its single reference is the int8 rule's, unlike anything
    the fake server answers; a night the float rule answered is judged against the float reference
    and is not off. The same photos answered by the int8 rule are judged against the int8 one: off."""
    manifest = fake_manifest("int8", float=fake_reference()["reference"], int8=unlike_reference())
    code, _, meta, _ = _night(tmp_path / "float", 0.02, reference=manifest, rules=("float",))
    judged = meta["drift"]["by_rule"]["float"]
    assert code == 0 and meta["night_off"] is False and judged["drift"] is False
    assert (judged["reference_body"], judged["reference_fallback"]) == ("references.float", False)
    assert meta["counts"]["rules"] == {"float": 300} and set(meta["drift"]["by_rule"]) == {"float"}
    assert {k: meta["drift"][k] for k in judged} == judged and meta["drift"]["rule"] == "float"
    assert meta["drift"]["mixed_rules"] is False
    code, _, meta, _ = _night(tmp_path / "int8", 0.02, reference=manifest, rules=("int8",))
    judged = meta["drift"]["by_rule"]["int8"]
    assert code == 8 and meta["night_off"] is True and judged["signals"]["confidence"]["drift"] is True
    assert (judged["reference_body"], judged["reference_fallback"]) == ("references.int8", False)
    assert {k: meta["drift"][k] for k in judged} == judged and meta["counts"]["rules"] == {"int8": 300}


def test_a_night_two_rules_answered_judges_each_against_its_own_reference_and_says_so(tmp_path, capsys):
    """A rolling update: some photos answered by the float rule, some by the int8 rule. Each rule's
    answers get their own judgement; the int8 rule's drift from its reference, so the night is off."""
    manifest = fake_manifest("int8", float=fake_reference()["reference"], int8=unlike_reference())
    code, run, meta, _ = _night(tmp_path, 0.02, "--on-drift", "record", reference=manifest,
                                rules=("float", "int8"))
    answered = Counter(r["rule"] for r in read_jsonl(run / "predictions.jsonl"))
    assert meta["counts"]["rules"] == dict(answered) and set(answered) == {"float", "int8"}
    assert min(answered.values()) > 100 and sum(answered.values()) == 300
    d = meta["drift"]
    assert d["mixed_rules"] is True and set(d["by_rule"]) == {"float", "int8"}
    assert d["by_rule"]["float"]["drift"] is False and d["by_rule"]["int8"]["drift"] is True
    assert [d["by_rule"][r]["reference_body"] for r in ("float", "int8")] == ["references.float", "references.int8"]
    assert [d["by_rule"][r]["signals"]["class_mix"]["n"] for r in ("float", "int8")] == \
        [answered["float"], answered["int8"]]
    assert code == 8 and d["drift"] is True and meta["night_off"] is True and d["action"] == "recorded"
    top = d["rule"]  # the top-level signals are those of the rule that answered most photos
    assert answered[top] == max(answered.values()) and d["signals"] == d["by_rule"][top]["signals"]
    warned = [e for e in log_events(capsys.readouterr().err) if e.get("rules")]
    assert warned and warned[0]["level"] == "warning" and warned[0]["rules"] == dict(answered)
    assert "more than one rule answered this night" in warned[0]["msg"]


def test_answers_that_name_no_rule_are_judged_against_the_single_reference(tmp_path):
    """An older server names no rule: its answers count as `unknown` and are judged against the
    file's single reference (the rule the archive serves on a CPU, here int8's), not the float one."""
    manifest = fake_manifest("int8", float=fake_reference()["reference"], int8=unlike_reference())
    code, _, meta, _ = _night(tmp_path, 0.02, "--on-drift", "record", reference=manifest, rules=(None,))
    judged = meta["drift"]["by_rule"]["unknown"]
    assert meta["counts"]["rules"] == {"unknown": 300} and set(meta["drift"]["by_rule"]) == {"unknown"}
    assert (judged["reference_body"], judged["reference_fallback"]) == ("reference", True)
    assert code == 8 and judged["drift"] is True and {k: meta["drift"][k] for k in judged} == judged


def test_the_unfamiliar_share_test_is_exact_for_small_nights():
    # 4 expected at 2% of 200: a chi-square table could not judge it; the binomial test can.
    assert drift.binomial_sf(0, 200, 0.02) == 1.0
    assert drift.binomial_sf(1, 10, 0.5) == pytest.approx(1 - 0.5 ** 10)
    assert drift.unfamiliar_share(61, 200, 0.02, 0.01)["drift"] is True
    assert drift.unfamiliar_share(5, 200, 0.02, 0.01)["drift"] is False  # 2.5%: chance
    assert drift.unfamiliar_share(0, 200, 0.02, 0.01)["drift"] is False  # fewer than usual is no fault
    assert drift.unfamiliar_share(3, 10, 0.02, 0.01)["drift"] is None  # too few photos to judge


def test_the_unfamiliar_share_reports_every_field_exactly():
    from scipy.stats import binom

    got = drift.unfamiliar_share(9, 200, 0.02, 0.05)
    p = float(binom.sf(8, 200, 0.02))  # P(X >= 9)
    assert got == {"n": 200, "unfamiliar": 9, "reference_rate": 0.02, "rate": 0.045,
                   "method": "one-sided exact binomial test", "p_value": pytest.approx(p, rel=1e-9), "alpha": 0.05,
                   "drift": p < 0.05}
    assert drift.unfamiliar_share(1, 3, 0.02, 0.05) == {"n": 3, "unfamiliar": 1, "reference_rate": 0.02,
                                                       "rate": 0.333333, "drift": None, "reason": "fewer than 20 photos"}
    assert drift.unfamiliar_share(0, 0, 0.02, 0.05)["rate"] is None
    assert drift.unfamiliar_share(1, 20, 0.02, 0.05)["drift"] is False  # exactly 20 photos are judged
    # a p-value equal to alpha is not drift (p < alpha)
    p_at = drift.binomial_sf(3, 20, 0.02)
    assert drift.unfamiliar_share(3, 20, 0.02, p_at)["drift"] is False


def test_binomial_sf_at_its_edges():
    from scipy.stats import binom

    assert drift.binomial_sf(-1, 5, 0.3) == 1.0 and drift.binomial_sf(0, 5, 0.3) == 1.0
    assert drift.binomial_sf(6, 5, 0.3) == 0.0                        # more events than trials
    assert drift.binomial_sf(5, 5, 0.3) == pytest.approx(0.3 ** 5, rel=1e-9)  # k = n: every trial an event
    assert drift.binomial_sf(2, 5, 0.0) == 0.0 and drift.binomial_sf(2, 5, 1.0) == 1.0
    for k, n, p in ((3, 40, 0.02), (12, 100, 0.05), (1, 1, 0.5)):
        assert drift.binomial_sf(k, n, p) == pytest.approx(float(binom.sf(k - 1, n, p)), rel=1e-9)


def test_every_record_carries_the_documented_fields_with_their_values(tmp_path):
    """docs/submitter.md's prediction record, field by field, against what was sent and answered."""
    import hashlib
    from datetime import datetime

    inbox = tmp_path / "inbox"
    photos = write_photos(inbox, 5)
    with FakeInferenceServer(delay_s=0.05) as s:
        assert main(args(inbox, tmp_path / "out", s.url, "--run-id", "f", "--batch-size", "2", "--concurrency", "1",
                         "--after", "keep", "--shard-count", "1")) == 0
        expected = {p.name: s.predict(p.read_bytes()) for p in photos}
    recs = read_jsonl(tmp_path / "out" / "run_f" / "predictions.jsonl")
    assert sorted(r["path"] for r in recs) == sorted(expected)
    for r in recs:
        data = (inbox / r["path"]).read_bytes()
        assert (r["sha256"], r["size"]) == (hashlib.sha256(data).hexdigest(), len(data))
        assert {k: r[k] for k in expected[r["path"]]} == expected[r["path"]]
        assert (r["run_id"], r["shard"], r["shard_count"], r["attempts"]) == ("f", 0, 1, 1)
        assert datetime.fromisoformat(r["timestamp"]).utcoffset().total_seconds() == 0
        assert isinstance(r["request_ms"], float) and 50 <= r["request_ms"] < 5000
        assert r["request_ms"] == round(r["request_ms"], 2)
        assert set(r) == {*expected[r["path"]], "path", "sha256", "size", "run_id", "shard", "shard_count",
                          "timestamp", "batch", "request_ms", "attempts"}
    # batches of 2, 2 and 1, numbered <invocation>-<sequence>
    assert sorted(r["batch"] for r in recs) == ["1-1", "1-1", "1-2", "1-2", "1-3"]
    # the CSV says what the records say, column by column
    by_path = {r["path"]: r for r in recs}
    for row in read_csv(tmp_path / "out" / "run_f" / "predictions.csv"):
        r = by_path[row["path"]]
        for col in ("sha256", "label", "class_id", "confidence", "unfamiliar_score", "model_name", "model_version",
                    "model_sha256", "shard", "timestamp", "rule"):
            assert row[col] == str(r[col]), col
        assert row["needs_review"] == str(r["needs_review"]).lower() and row["review_reason"] == "+".join(
            r["review_reason"])
    meta = json.loads((tmp_path / "out" / "run_f" / "run_metadata.json").read_text())
    assert set(meta["throughput"]) == {"this_invocation_photos", "this_invocation_seconds", "images_per_second"}
    assert meta["throughput"]["this_invocation_photos"] == 5 and meta["throughput"]["this_invocation_seconds"] > 0


def test_the_journal_keeps_the_rule_and_runtime_that_answered_and_null_from_an_older_server(tmp_path):
    inbox = tmp_path / "inbox"
    photos = write_photos(inbox, 8)
    for name, rules in (("new", ("float", "int8")), ("old", (None,))):
        with FakeInferenceServer(rules=rules) as s:
            assert main(args(inbox, tmp_path / name, s.url, "--run-id", "j")) == 0
            said = {p.name: s.predict(p.read_bytes()) for p in photos}
        recs = read_jsonl(tmp_path / name / "run_j" / "predictions.jsonl")
        assert {r["path"]: (r["rule"], r["runtime"]) for r in recs} == {
            n: (a.get("rule"), a.get("runtime")) for n, a in said.items()}
    assert not any("rule" in a for a in said.values())  # the older server named none: recorded as null


def test_the_csv_appends_the_rule_column_and_review_items_name_the_rule(tmp_path):
    """Columns are only appended (readers take them by position); an older server's photos have an
    empty rule cell and a null rule in the queue."""
    from returns_submit.outputs import CSV_COLUMNS

    assert CSV_COLUMNS == ("path", "sha256", "label", "class_id", "confidence", "needs_review", "review_reason",
                           "unfamiliar_score", "model_name", "model_version", "model_sha256", "shard", "timestamp",
                           "rule")
    inbox = tmp_path / "inbox"
    photos = write_photos(inbox, 40)
    for name, rules in (("new", ("float", "int8")), ("old", (None,))):
        with FakeInferenceServer(rules=rules) as s:
            assert main(args(inbox, tmp_path / name, s.url, "--run-id", "c")) == 0
            said = {p.name: s.predict(p.read_bytes()).get("rule") for p in photos}
        run = tmp_path / name / "run_c"
        assert {r["path"]: r["rule"] for r in read_csv(run / "predictions.csv")} == {
            n: rule or "" for n, rule in said.items()}
        queue = read_jsonl(run / "review_queue.jsonl")
        assert queue and all(q["rule"] == said[q["path"]] for q in queue)
    assert set(said.values()) == {None}


def test_the_margin_between_the_top_two_classes():
    from returns_submit.outputs import top2_margin

    assert top2_margin({"top_k": [{"probability": 0.6}, {"probability": 0.2345678}]}) == 0.365432
    assert top2_margin({"top_k": [{"probability": 0.3}, {"probability": 0.55}]}) == 0.25  # sorted first
    assert top2_margin({"top_k": [{"probability": 0.9}]}) == 0.9 and top2_margin({"confidence": 0.7}) == 0.7


@pytest.mark.parametrize("content, kept", [
    (b"", b""), (b"x", b""), (b"\n", b"\n"), (b"\nabc", b"\n"), (b'{"a":1}\n{"b":', b'{"a":1}\n'),
    (b"\n" + b"x" * 65536, b"\n"),                       # the newline is alone in the second 64 KiB window
    (b"r\n" * 40000 + b"y" * 70000, b"r\n" * 40000),      # a torn tail longer than one window
])
def test_a_torn_tail_is_cut_after_the_last_newline_whatever_its_length(tmp_path, content, kept):
    from returns_submit.journal import _truncate_torn_tail

    path = tmp_path / "predictions.jsonl"
    path.write_bytes(content)
    _truncate_torn_tail(path)
    assert path.read_bytes() == kept


def test_latest_moves_only_to_a_run_started_no_earlier(tmp_path):
    from returns_submit.outputs import update_latest

    for name, started in (("run_b", "2026-01-02T00:00:00"), ("run_c", "2026-01-03T00:00:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run_metadata.json").write_text(json.dumps({"started_at": started}))
    assert update_latest(tmp_path, "run_b", "2026-01-02T00:00:00") is True
    assert update_latest(tmp_path, "run_a", "2026-01-01T00:00:00") is False
    assert (tmp_path / "LATEST").read_text() == "run_b\n"
    assert update_latest(tmp_path, "run_x", "2026-01-02T00:00:00") is True  # a tie goes to the newer call
    assert (tmp_path / "LATEST").read_text() == "run_x\n"
    assert update_latest(tmp_path, "run_c", "2026-01-03T00:00:00") is True
    assert (tmp_path / "LATEST").read_text() == "run_c\n"
