"""Faults a nightly run meets (issue 7), with a real TorchServe: a worker killed mid-batch,
the whole server stopped and started, the submitter SIGKILLed at random points across
several runs, SIGTERM, and an output volume that is read-only or full.

Tests that disturb the server use a TorchServe of their own (`disruptable_torchserve`);
the others use the session's shared one.
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
    SmallVolume,
    assert_exactly_once,
    count_records,
    disruptable_torchserve,
    read_csv,
    read_jsonl,
    run_submit,
    submit_cmd,
    wait_for_records,
    write_photos,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def submit_args(inbox: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["--inbox", str(inbox), "--output", str(out), "--endpoint", url, "--progress", "log",
            "--connect-deadline", "30", "--backoff", "0.2", "--backoff-max", "4", "--retries", "60",
            "--timeout", "30", *extra]


def photo_rels(inbox: Path) -> set[str]:
    return {str(p.relative_to(inbox)) for p in inbox.rglob("*.png")}


def test_worker_killed_mid_batch_loses_nothing(model_root, tmp_path):
    ts = disruptable_torchserve(model_root)
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    write_photos(inbox, 200)
    proc = subprocess.Popen(submit_cmd(*submit_args(inbox, out, ts.inference_url, "--run-id", "wk",
                                                    "--batch-size", "8", "--concurrency", "2")),
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    killed = []
    try:
        for target in (16, 80):
            wait_for_records(out / "run_wk", target, proc)
            if proc.poll() is not None:
                break
            for pid in ts.worker_pids():
                os.kill(pid, signal.SIGKILL)  # TorchServe restarts its worker; requests in it fail
                killed.append(pid)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, "no worker was killed"
    assert proc.returncode == 0, err[-3000:]
    records = assert_exactly_once(out / "run_wk", photo_rels(inbox))
    assert all("label" in r for r in records), [r for r in records if "code" in r][:3]
    # The requests in the dying worker failed ("Worker died.", 500/507) and were sent again.
    assert json.loads((out / "run_wk" / "run_metadata.json").read_text())["counts"]["retried"] > 0


def test_server_stopped_and_started_mid_run_completes(model_root, tmp_path):
    ts = disruptable_torchserve(model_root)
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    write_photos(inbox, 120)

    def outage():
        ts.stop()
        time.sleep(3)  # the submitter sees refused connections meanwhile
        ts.start(timeout=240)

    proc = subprocess.Popen(submit_cmd(*submit_args(inbox, out, ts.inference_url, "--run-id", "ss",
                                                    "--batch-size", "4")),
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_records(out / "run_ss", 12, proc)
        assert proc.poll() is None, "the run ended before the outage"
        t = threading.Thread(target=outage)
        t.start()
        _, err = proc.communicate(timeout=300)
        t.join(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert_exactly_once(out / "run_ss", photo_rels(inbox))
    assert json.loads((out / "run_ss" / "run_metadata.json").read_text())["counts"]["retried"] > 0


@pytest.mark.parametrize("after", ["keep", "move"])
def test_sigkill_at_random_points_across_runs_is_exactly_once(torchserve, tmp_path, after):
    rng = random.Random(f"sigkill-{after}")
    for night in range(2):
        inbox, out = tmp_path / f"inbox{night}", tmp_path / "out"
        write_photos(inbox / "x", 30, start=100 * night)
        write_photos(inbox / "y", 30, start=100 * night + 50)
        (inbox / "y" / "broken.png").write_bytes(b"\x89PNG but no more")
        expected = photo_rels(inbox)
        run = out / f"run_n{night}"
        cmd = submit_cmd(*submit_args(inbox, out, torchserve.inference_url, "--run-id", f"n{night}",
                                      "--batch-size", "3", "--after", after, "--max-error-rate", "1"))
        for _ in range(3):
            proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.DEVNULL)
            have = count_records(run)
            wait_for_records(run, have + rng.randint(1, 15), proc)
            time.sleep(rng.uniform(0, 0.05))  # while sending, writing, fsyncing or moving
            proc.kill()
            proc.wait(timeout=10)
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        assert_exactly_once(run, expected)
        assert len(read_csv(run / "predictions.csv")) == len(read_jsonl(run / "predictions.jsonl")) == 60
        if after == "move":
            assert photo_rels(inbox) == set()


def test_sigterm_finishes_in_flight_batches_and_resumes(torchserve, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    write_photos(inbox, 150)
    cmd = submit_cmd(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "term", "--batch-size", "4"))
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_for_records(out / "run_term", 20, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 7, err[-2000:]
    assert "stop requested" in err
    run = out / "run_term"
    meta = json.loads((run / "run_metadata.json").read_text())
    assert meta["status"] == "interrupted" and meta["exit_code"] == 7 and not (run / "_SUCCESS").exists()
    assert (run / "predictions.jsonl").read_bytes().endswith(b"\n")  # no torn line: a clean stop
    done = meta["counts"]["seen"]
    assert 20 <= done < 150
    r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "term"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_exactly_once(run, photo_rels(inbox))
    assert json.loads((run / "run_metadata.json").read_text())["counts"]["resumed_skipped"] == done


def test_read_only_output_fails_clearly_and_keeps_the_manifest(torchserve, tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 10)
    with SmallVolume(tmp_path / "vol", "8m") as vol:
        if not vol.available:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        out = vol.path / "results"
        r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "a"))
        assert r.returncode == 0, r.stderr[-2000:]
        manifest = (out / "run_a" / "run_metadata.json").read_bytes()
        vol.readonly()
        for run_id in ("a", "b"):
            r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", run_id))
            assert r.returncode == 6, r.stderr[-2000:]
            assert "Read-only file system" in r.stderr
        assert (out / "run_a" / "run_metadata.json").read_bytes() == manifest
        assert (out / "LATEST").read_text().strip() == "run_a"


def test_full_output_fails_clearly_and_resumes_once_there_is_room(torchserve, tmp_path):
    inbox = tmp_path / "inbox"
    write_photos(inbox, 250)
    with SmallVolume(tmp_path / "vol", "96k") as vol:
        if not vol.available:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        out = vol.path / "results"
        r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "full", "--batch-size", "8"),
                       timeout=180)
        assert r.returncode == 6, r.stderr[-2000:]
        assert "No space left on device" in r.stderr
        run = out / "run_full"
        assert not (run / "_SUCCESS").exists()
        for name in ("run_metadata.json", "predictions.csv"):
            if (run / name).exists():  # written atomically: whole or absent, never half
                assert (run / name).read_text().endswith("\n")
        vol.writable("64m")
        r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "full", "--batch-size", "8"),
                       timeout=180)
        assert r.returncode == 0, r.stderr[-2000:]
        assert_exactly_once(run, photo_rels(inbox))
        json.loads((run / "run_metadata.json").read_text())
