"""The nightly submitter against a real TorchServe on loopback (issue 4).

Uses the session fixtures of tests/conftest.py: `model_root` (a built dist/model),
`torchserve` (a started LocalTorchServe shared by the session, never disturbed here)
and `fmnist_pngs` (real Fashion-MNIST test images as PNG). The restart test runs a
TorchServe of its own.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.submit_fixtures import (
    REPO,
    assert_exactly_once,
    count_records,
    disruptable_torchserve,
    read_csv,
    read_jsonl,
    recorded_paths,
    run_submit,
    submit_cmd,
    wait_for_records,
    write_photos,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HANDLER_CODES = {"empty", "not_an_image", "corrupt", "too_large", "zero_size", "bad_base64", "bad_instance"}


def submit_args(inbox: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["--inbox", str(inbox), "--output", str(out), "--endpoint", url, "--progress", "log",
            "--connect-deadline", "30", "--backoff", "0.2", "--backoff-max", "2", "--retries", "40", *extra]


def rels(inbox: Path) -> set[str]:
    return {str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file() and p.suffix.lower() != ".txt"}


def add_broken(inbox: Path) -> None:
    good = next(inbox.rglob("*.png")).read_bytes()
    (inbox / "broken").mkdir(exist_ok=True)
    (inbox / "broken" / "truncated.png").write_bytes(good[: len(good) // 2])
    (inbox / "broken" / "text.jpg").write_text("a shipping label, not a photo")
    (inbox / "broken" / "empty.png").write_bytes(b"")
    (inbox / "broken" / "noise.webp").write_bytes(random.Random(0).randbytes(2000))
    (inbox / "broken" / "notes.txt").write_text("not an image name: skipped")


def label_name(label, names: list[str]) -> str:
    return names[label] if isinstance(label, int) else str(label)


def test_nightly_run_counts_add_up_and_csv_matches_jsonl(torchserve, fmnist_pngs, tmp_path):
    model_root = torchserve.model_root  # the archive this server serves
    inbox = tmp_path / "inbox"
    truth = {}
    for folder, start in (("shelf A", 0), ("shelf B/ünï", 150)):  # 300 distinct photos
        for path, label in fmnist_pngs(150, inbox / folder, start):
            truth[str(Path(path).relative_to(inbox))] = label
    add_broken(inbox)
    expected = rels(inbox)
    manifest = json.loads((Path(model_root) / "artifact_manifest.json").read_text())
    out = tmp_path / "out"
    t0 = time.monotonic()
    r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "night", "--batch-size", "16",
                                "--concurrency", "2", "--reference", str(Path(model_root) / "artifact_manifest.json")),
                   timeout=240)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "run_night"
    records = assert_exactly_once(run, expected)
    preds = read_jsonl(run / "predictions.jsonl")
    rejs = read_jsonl(run / "rejected.jsonl")
    assert len(preds) == 300 and len(rejs) == 4
    codes = {r["path"]: (r["source"], r["code"]) for r in rejs}
    assert codes["broken/empty.png"] == ("submitter", "empty")
    assert {codes[p][1] for p in ("broken/truncated.png", "broken/text.jpg", "broken/noise.webp")} <= HANDLER_CODES
    assert all((out / r["quarantined_to"]).exists() for r in rejs)
    # The CSV is the JSONL's essentials, row for row.
    rows = read_csv(run / "predictions.csv")
    assert [(x["path"], x["sha256"], x["label"], int(x["class_id"]), float(x["confidence"]),
             x["needs_review"] == "true") for x in rows] == \
        [(p["path"], p["sha256"], p["label"], p["class_id"], p["confidence"], p["needs_review"]) for p in preds]
    review = read_jsonl(run / "review_queue.jsonl")
    assert sorted(x["path"] for x in review) == sorted(p["path"] for p in preds if p["needs_review"])
    assert [x["priority"] for x in review] == list(range(1, len(review) + 1))  # in review order
    # The real model classifies real photos.
    names = manifest["reference"].get("class_names") or sorted({p["label"] for p in preds})
    correct = sum(p["label"] == label_name(truth[p["path"]], names) for p in preds)
    assert correct / len(preds) > manifest["metrics"]["accuracy"] - 0.15
    meta = json.loads((run / "run_metadata.json").read_text())
    c = meta["counts"]
    assert (c["seen"], c["classified"], c["rejected"], c["needs_review"]) == (304, 300, 4, len(review))
    assert c["skipped_non_image"] == 1 and sum(meta["class_distribution"].values()) == 300
    assert meta["model"]["sha256"] == manifest["archive_content_sha256"]  # as reported by the server
    assert meta["model"]["version"] == manifest["model_version"] and meta["model"]["matches_reference"] is True
    assert meta["latency_ms"]["p99"] >= meta["latency_ms"]["p50"] > 0
    assert meta["throughput"]["images_per_second"] > 0
    assert meta["drift"]["available"] and {"class_mix", "confidence"} <= set(meta["drift"]["signals"])
    assert meta["drift"]["signals"]["class_mix"]["drift"] is False  # the test set is the reference's twin
    assert (run / "_SUCCESS").exists() and (out / "LATEST").read_text().strip() == "run_night"
    print(f"304 photos in {elapsed:.1f} s, {meta['throughput']['images_per_second']} photos/s, "
          f"p50 {meta['latency_ms']['p50']} ms")
    assert len(records) == 304


def test_kserve_v1_path_gives_the_same_answers(torchserve, tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 6)
    for api in ("predictions", "v1"):
        r = run_submit(*submit_args(inbox, tmp_path / api, torchserve.inference_url, "--run-id", api, "--api", api))
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (read_jsonl(tmp_path / api / f"run_{api}" / "predictions.jsonl") for api in ("predictions", "v1"))
    def key(rows):
        return [(x["path"], x["label"], x["confidence"]) for x in rows]

    assert key(a) == key(b) and len(a) == 6


def test_shards_0_and_1_of_2_are_disjoint_and_cover_the_inbox(torchserve, tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox / "x", 40)
    write_photos(inbox / "y", 40, start=40)
    out = tmp_path / "out"
    procs = [subprocess.Popen(submit_cmd(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "idx",
                                                      "--shard-count", "2", "--batch-size", "8")),
                              cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "JOB_COMPLETION_INDEX": str(i)})
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    run = out / "run_idx"
    shard = [{r["path"] for r in read_jsonl(run / f"predictions.shard-{i}-of-2.jsonl")} for i in range(2)]
    assert shard[0] and shard[1] and not shard[0] & shard[1]
    assert shard[0] | shard[1] == rels(inbox)
    assert_exactly_once(run, rels(inbox))
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["counts"]["classified"] == 80 and [s["shard"]["index"] for s in meta["shards"]] == [0, 1]
    assert (run / "_SUCCESS").exists() and (out / "LATEST").read_text().strip() == "run_idx"


def test_a_second_concurrent_run_is_refused(torchserve, tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 4)
    out = tmp_path / "out"
    # The first run holds the lock while it waits for a server that is not there yet.
    first = subprocess.Popen(submit_cmd(*submit_args(inbox, out, "http://127.0.0.1:9", "--run-id", "first",
                                                     "--connect-deadline", "120")),
                             cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".lock.shard-0-of-1"
        deadline = time.monotonic() + 30
        while not (lock.exists() and str(first.pid) in lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "second"), timeout=60)
        assert r.returncode == 5
        assert "another submitter is running" in r.stderr and f"pid {first.pid} on host" in r.stderr
        assert not (out / "run_second").exists()  # refused before touching anything
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 7  # SIGTERM while waiting for the server: resumable


def test_sigkill_mid_run_then_resume_is_exactly_once(torchserve, tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox / "a", 60)
    write_photos(inbox / "b", 60, start=60)
    add_broken(inbox)
    expected = rels(inbox)
    out = tmp_path / "out"
    cmd = submit_cmd(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "kill", "--batch-size", "4",
                                  "--max-error-rate", "1"))
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
        have = count_records(out / "run_kill")
        wait_for_records(out / "run_kill", have + rng.randint(4, 30), proc)
        time.sleep(rng.uniform(0, 0.05))
        kills += proc.poll() is None
        proc.kill()
        proc.wait(timeout=10)
    assert kills >= 2
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "run_kill"
    assert_exactly_once(run, expected)
    assert len(read_csv(run / "predictions.csv")) == len(read_jsonl(run / "predictions.jsonl")) == 120
    assert json.loads((run / "run_metadata.json").read_text())["invocations"] == 4


def test_after_move_moves_only_recorded_photos(torchserve, tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox / "a", 50)
    add_broken(inbox)
    expected = rels(inbox)
    out = tmp_path / "out"
    cmd = submit_cmd(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "mv", "--after", "move",
                                  "--batch-size", "4", "--max-error-rate", "1"))
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
    wait_for_records(out / "run_mv", 12, proc)
    proc.kill()
    proc.wait(timeout=10)
    gone = expected - rels(inbox)
    assert gone, "the kill came before any move"
    assert gone <= set(recorded_paths(out / "run_mv"))  # nothing moved without its record
    assert subprocess.run(cmd, cwd=REPO, stderr=subprocess.DEVNULL, timeout=180).returncode == 0
    records = assert_exactly_once(out / "run_mv", expected)
    assert rels(inbox) == set()  # every photo moved: archived or quarantined
    import hashlib
    for r in records:
        dest = out / "archive" / r["archived_to"] if "archived_to" in r else out / r["quarantined_to"]
        assert dest.exists()
        if r.get("sha256"):
            assert hashlib.sha256(dest.read_bytes()).hexdigest() == r["sha256"]
    archived = [p for p in (out / "archive").rglob("*") if p.is_file()]
    assert len(archived) == 50


def test_torchserve_stopped_and_restarted_mid_run_completes(model_root, tmp_path):
    ts = disruptable_torchserve(model_root)
    inbox = tmp_path / "inbox"
    write_photos(inbox, 160)
    out = tmp_path / "out"
    proc = subprocess.Popen(submit_cmd(*submit_args(inbox, out, ts.inference_url, "--run-id", "rs",
                                                    "--batch-size", "4", "--concurrency", "2", "--timeout", "20",
                                                    "--retries", "60", "--backoff-max", "4")),
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(out / "run_rs", 20, proc)
        assert proc.poll() is None, "the run ended before the restart"
        restart = threading.Thread(target=ts.restart, kwargs={"timeout": 240})
        restart.start()
        _, err = proc.communicate(timeout=300)
        restart.join(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    records = assert_exactly_once(out / "run_rs", rels(inbox))
    assert all("label" in r for r in records)  # nothing rejected because of the restart
    meta = json.loads((out / "run_rs" / "run_metadata.json").read_text())
    assert meta["counts"]["retried"] > 0 and meta["status"] == "complete"


def test_a_night_served_by_the_float_rule_is_judged_against_the_float_reference(torchserve, model_root, fmnist_pngs,
                                                                              tmp_path):
    """The session server serves the float rule (``cpu_backend: onnx``), as a GPU pod or a CPU where the int8
    rule does not hold would; the reference given is the default archive's manifest, built for
    ``onnx-int8``. Every answer names the float rule, and the night is judged against the manifest's float
    reference, not the int8 one its ``reference`` holds."""
    manifest_path = Path(model_root) / "artifact_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["served_rule"] == "int8" and manifest["reference"] == manifest["references"]["int8"]
    assert manifest["references"]["float"] != manifest["references"]["int8"]
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    fmnist_pngs(200, inbox, 500)
    r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "float-night", "--reference",
                                str(manifest_path)), timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "run_float-night"
    assert {(p["rule"], p["runtime"]) for p in read_jsonl(run / "predictions.jsonl")} == {("float", "onnxruntime")}
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["counts"]["rules"] == {"float": 200}
    assert meta["drift"]["mixed_rules"] is False and set(meta["drift"]["by_rule"]) == {"float"}
    judged = meta["drift"]["by_rule"]["float"]
    assert judged["reference_fallback"] is False and "float" in judged["reference_body"]
    assert meta["drift"]["rule"] == "float" and meta["drift"]["signals"] == judged["signals"]
    assert {row["rule"] for row in read_csv(run / "predictions.csv")} == {"float"}
