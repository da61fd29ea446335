"""Bad-input battery for the nightly submitter (issue 7), against the session's real TorchServe.

Every candidate lands in predictions.jsonl or rejected.jsonl (with a reason), none is
lost or counted twice, paths are relative to the inbox, and nothing outside the inbox
or the output is read, written or moved.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.submit_fixtures import (
    REPO,
    assert_exactly_once,
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
            "--connect-deadline", "30", "--backoff", "0.2", "--backoff-max", "2", "--retries", "40",
            "--max-error-rate", "1", *extra]


def untouched(path: Path) -> tuple:
    """Fingerprint of a file outside the inbox: content, and an access time set far in the
    past so that any read would move it (relatime updates an atime older than the mtime)."""
    st = path.stat()
    os.utime(path, (st.st_mtime - 100_000, st.st_mtime))
    return path.read_bytes(), path.stat().st_atime


def test_bad_inputs_each_land_once_with_a_reason(torchserve, tmp_path):
    inbox, outside, out = tmp_path / "inbox", tmp_path / "outside", tmp_path / "out"
    good = write_photos(inbox / "a" / "b" / "c", 3)
    write_photos(inbox, 3, names=["ünïcödé фото.png", "名前 with  spaces.PNG", "new\nline.jpeg"])
    write_photos(inbox / "dir with space", 2, start=10)
    png = good[0].read_bytes()
    odd_name = os.fsdecode(b"latin1-\xe9.png")  # not valid UTF-8: kept as a surrogate escape
    (inbox / odd_name).write_bytes(png)
    bad = inbox / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not a photo at all")
    (bad / "html.gif").write_text("<html><body>404</body></html>")
    (bad / "truncated.png").write_bytes(png[:40])
    (bad / "noise.tiff").write_bytes(os.urandom(5000))
    (bad / "secret.png").write_bytes(png)
    os.chmod(bad / "secret.png", 0)  # unreadable for a non-root submitter
    os.mkfifo(bad / "pipe.png")
    (inbox / "notes.txt").write_text("skipped")
    (inbox / ".upload-in-progress.png").write_bytes(png)
    # Symlinks: to a photo outside, to a folder of photos outside, to a photo inside.
    write_photos(outside, 2, start=20)
    outside_fp = {p: untouched(p) for p in outside.iterdir()}
    (inbox / "escape.png").symlink_to(outside / "item_00020.png")
    (inbox / "escape-dir").symlink_to(outside, target_is_directory=True)
    (inbox / "inside-link.png").symlink_to(good[0])
    expected = {str(p.relative_to(inbox)) for p in inbox.rglob("*")
                if (p.is_file() or p.is_symlink() or p.is_fifo()) and not p.name.startswith(".")
                and p.suffix.lower() != ".txt" and p.name != "escape-dir"}

    r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "battery", "--batch-size", "4"),
                   timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    run = out / "run_battery"
    records = assert_exactly_once(run, expected)
    by_path = {r["path"]: r for r in records}
    rejected = {p: r["code"] for p, r in by_path.items() if "code" in r}
    assert rejected["bad/zero.png"] == "empty"
    assert rejected["bad/pipe.png"] == "not_a_file"
    assert rejected["escape.png"] == rejected["inside-link.png"] == "symlink"
    for name in ("text.jpg", "html.gif", "truncated.png", "noise.tiff"):
        assert rejected[f"bad/{name}"] in {"not_an_image", "corrupt"}, name
    if os.geteuid() != 0:
        assert rejected["bad/secret.png"] == "unreadable"
    assert all(r["message"] for r in records if "code" in r)
    for p in ("ünïcödé фото.png", "名前 with  spaces.PNG", "new\nline.jpeg", odd_name, "a/b/c/item_00000.png"):
        assert "label" in by_path[p], p
    # Quarantine keeps the relative path; a symlink is moved as a link, its target stays.
    for rec in records:
        if "quarantined_to" in rec:
            assert os.path.lexists(out / rec["quarantined_to"]), rec["path"]
    assert os.path.islink(out / by_path["escape.png"]["quarantined_to"])
    assert good[0].exists()  # the target of inside-link.png
    for p, fingerprint in outside_fp.items():
        assert p.exists() and unchanged(p, fingerprint), f"{p} was read or changed"
    assert not any("outside" in rec["path"] or rec["path"].startswith("escape-dir") for rec in records)
    assert all(not rec["path"].startswith("/") and ".." not in rec["path"].split("/") for rec in records)
    meta = json.loads((run / "run_metadata.json").read_text())
    c = meta["counts"]
    assert (c["skipped_non_image"], c["skipped_hidden"], c["skipped_symlink"]) == (1, 1, 1)
    assert c["seen"] == len(expected) == c["classified"] + c["rejected"]
    # The CSV survives the odd names: one row per prediction, same paths (bytes that are not
    # UTF-8 written as \xe9, since a spreadsheet needs text).
    csv_paths = [row["path"] for row in read_csv(run / "predictions.csv")]
    assert csv_paths == [p.replace(odd_name, "latin1-\\xe9.png") for p in
                         (rec["path"] for rec in read_jsonl(run / "predictions.jsonl"))]
    assert "new\nline.jpeg" in csv_paths


def unchanged(path: Path, fingerprint: tuple) -> bool:
    content, atime = fingerprint
    same_atime = path.stat().st_atime == atime  # stat first: reading it here moves the atime
    return same_atime and path.read_bytes() == content


def test_files_appearing_and_vanishing_during_the_run(torchserve, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    for i, d in enumerate("abcdef"):
        write_photos(inbox / d, 15, start=15 * i)
    at_start = {str(p.relative_to(inbox)) for p in inbox.rglob("*.png")}
    doomed = sorted(inbox.glob("f/*.png"))[:5]
    cmd = submit_cmd(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "churn", "--batch-size", "2",
                                  "--concurrency", "1"))
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    wait_for_records(out / "run_churn", 4, proc)
    for p in doomed:
        p.unlink()
    write_photos(inbox / "a", 3, start=500)  # a/ was listed already: next run
    write_photos(inbox / "g", 3, start=600)  # g/ not yet listed (if the run is still going)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-2000:]
    run = out / "run_churn"
    recs = read_jsonl(run / "predictions.jsonl") + read_jsonl(run / "rejected.jsonl")
    paths = [r["path"] for r in recs]
    assert len(paths) == len(set(paths))
    deleted = {str(p.relative_to(inbox)) for p in doomed}
    assert at_start - deleted <= set(paths)  # everything that stayed is recorded
    for r in recs:  # a deleted photo is recorded before it went, or as vanished, or not at all
        if r["path"] in deleted and "code" in r:
            assert r["code"] == "vanished"
    # Re-running the same run id picks up what appeared too late, still once each.
    r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "churn"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    now = {str(p.relative_to(inbox)) for p in inbox.rglob("*.png")}
    final = assert_exactly_once(run, now | (set(paths) & deleted))
    assert {r["path"] for r in final} >= now


def test_a_flood_of_tiny_folders_streams(torchserve, tmp_path):
    """Many folders, few photos each, a batch spanning folders: the walk's order is the
    run's order and nothing is skipped at folder boundaries."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    for i in range(30):
        write_photos(inbox / f"d{i:02d}" / "sub", 2, start=2 * i)
    r = run_submit(*submit_args(inbox, out, torchserve.inference_url, "--run-id", "tiny", "--batch-size", "7",
                                "--concurrency", "1"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    preds = read_jsonl(out / "run_tiny" / "predictions.jsonl")
    assert [p["path"] for p in preds] == sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*.png"))
