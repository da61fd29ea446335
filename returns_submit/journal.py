"""The per-shard journal: the predictions and rejected JSONL files themselves.

A photo is done once its line is in one of the two files. Lines for a batch are
written, flushed and fsynced together before any file is moved, so a SIGKILL at any
moment loses at most the lines of the batch in flight (they are sent again on resume)
and at worst leaves a torn last line, which `open()` cuts away before appending.
Done paths are kept as a sorted array of 64-bit hashes: 8 bytes a photo, no bytes of
any image, however large the inbox.
"""
from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import os
import socket
from array import array
from pathlib import Path
from typing import Iterable, Iterator

from returns_model.fileio import fsync_dir
from returns_model.names import PREDICTIONS_FILE, REJECTED_FILE, RUN_METADATA_FILE, SUCCESS_MARKER, shard_file
from returns_submit.errors import LockHeld, OutputNotWritable

STATE_FILE = ".state.json"  # the run's start time and invocations (the submitter's own, not for readers)


def path_key(rel: str) -> int:
    return int.from_bytes(hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


class DoneSet:
    """Membership of relative paths already recorded (sorted 64-bit hashes, binary search)."""

    def __init__(self, keys: Iterable[int] = ()):
        self._keys = array("Q", sorted(set(keys)))

    def __contains__(self, rel: str) -> bool:
        k = path_key(rel)
        i = bisect.bisect_left(self._keys, k)
        return i < len(self._keys) and self._keys[i] == k

    def __len__(self) -> int:
        return len(self._keys)


def shard_file_names(shard_index: int, shard_count: int) -> dict[str, str]:
    """File names of one shard's journal; a single shard writes the plain names."""
    def name(plain: str) -> str:
        return plain if shard_count == 1 else shard_file(plain, shard_index, shard_count)

    return {
        "predictions": name(PREDICTIONS_FILE),
        "rejected": name(REJECTED_FILE),
        "metadata": name(RUN_METADATA_FILE),
        "state": name(STATE_FILE),
        "success": name(SUCCESS_MARKER),
    }


def read_records(path: Path) -> Iterator[dict]:
    """Complete records of a JSONL journal (a torn, unparsable or non-object line is skipped)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            if not line.endswith(b"\n"):
                return  # torn tail after a kill; open() truncates it before appending
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):  # a damaged line can still parse as JSON: a number, a list
                yield rec


def _truncate_torn_tail(path: Path) -> None:
    """Cut everything after the last newline (a record half-written when the process died)."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                end = pos - step + nl + 1
                break
            pos -= step
        else:
            end = 0
        if end != size:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())


class Journal:
    """Append-only, fsynced per batch: predictions and rejected records of one shard."""

    def __init__(self, run_dir: Path, shard_index: int, shard_count: int):
        names = shard_file_names(shard_index, shard_count)
        self.predictions_path = run_dir / names["predictions"]
        self.rejected_path = run_dir / names["rejected"]
        self._files: dict[str, object] = {}

    def open(self) -> DoneSet:
        """Repair torn tails, open both files for appending, and return what is done."""
        keys = []
        try:
            for path in (self.predictions_path, self.rejected_path):
                if path.exists():
                    _truncate_torn_tail(path)
                    keys.extend(path_key(r["path"]) for r in read_records(path) if "path" in r)
            self._files = {
                "predictions": open(self.predictions_path, "ab"),
                "rejected": open(self.rejected_path, "ab"),
            }
            fsync_dir(self.predictions_path.parent)
        except OSError as e:
            raise OutputNotWritable(f"cannot open the journal in {self.predictions_path.parent}: {e}") from e
        return DoneSet(keys)

    def append(self, predictions: list[dict], rejected: list[dict]) -> None:
        """Write one batch's records durably (flush + fsync) before anything is moved."""
        try:
            for name, records in (("predictions", predictions), ("rejected", rejected)):
                if records:
                    f = self._files[name]
                    f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise OutputNotWritable(f"cannot append to the journal: {e}") from e

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files = {}


class OutputLock:
    """A non-blocking `flock` on `<output>/.lock.<name>`; the holder writes who it is."""

    def __init__(self, output: Path, name: str, holder: dict):
        self.path = output / f".lock.{name}"
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputNotWritable(f"cannot create the lock file {self.path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                who = _describe_holder(os.pread(fd, 4096, 0))
            finally:
                os.close(fd)
            raise LockHeld(f"another submitter is running on {self.path.parent} ({self.path.name}, "
                           f"held by {who}); wait for it to finish or stop it") from None
        info = json.dumps({**self.holder, "pid": os.getpid(), "host": socket.gethostname()}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info + b"\n", 0)
        except OSError as e:
            os.close(fd)
            raise OutputNotWritable(f"cannot write the lock file {self.path}: {e}") from e
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays for the next run
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']}, run {h.get('run_id')}"
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace").strip() or "an unknown process"


def blocking_lock(path: Path):
    """A blocking `flock` (short critical sections: finalising a run, updating LATEST)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd
