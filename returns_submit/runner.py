"""One shard of one nightly run: walk the inbox, send batches, record, move, summarise.

Order of durability, which is what makes a run exactly-once under SIGKILL:
  1. a batch's records (predictions and rejected) are appended, flushed and fsynced;
  2. only then are its photos moved (archive with --after move, quarantine if rejected);
  3. when the shard is done: predictions.csv, review_queue.jsonl, run_metadata.json,
     then `_SUCCESS` and `<output>/LATEST`, each written atomically.
A re-run with the same run id skips every path already in the journal and finishes
moves that a kill interrupted between steps 1 and 2.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import threading
import zlib
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from returns_model.manifest import Reference, read_reference
from returns_model.names import SUCCESS_MARKER, run_folder
from returns_model.results import CLASS_ID, CONFIDENCE, LABEL, RESULT_KEYS
from returns_submit import k8s_info, outputs
from returns_submit.faults import fault_point
from returns_submit.client import Answer, BatchFailed, InferenceClient
from returns_submit.inbox import Entry, Photo, Unreadable, lexists, read, shard_of, walk
from returns_submit.journal import Journal, OutputLock, read_records, shard_file_names
from returns_submit.mover import complete_move, move, plan, safe_component
from returns_submit.outputs import utc_now
from returns_submit.config import SubmitConfig
from returns_submit.errors import (
    EXIT_DRIFT,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_TERMINATED,
    BadArguments,
    OutputNotWritable,
    RequestRejected,
    ServerUnreachable,
    SubmitError,
)
from returns_submit.log import Progress, event, want_bar

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, cfg: SubmitConfig, stop: threading.Event | None = None):
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.output = Path(cfg.output)
        self.inbox = Path(cfg.inbox)
        self.run_name = run_folder(cfg.run_id)
        self.run_dir = self.output / self.run_name
        self.archive_root = Path(cfg.archive_dir) if cfg.archive_dir else self.output / "archive"
        self.names = shard_file_names(cfg.shard_index, cfg.shard_count)
        self.journal = Journal(self.run_dir, cfg.shard_index, cfg.shard_count)
        self.client = InferenceClient(
            cfg.endpoint, cfg.model, api=cfg.api, timeout=cfg.timeout, retries=cfg.retries,
            backoff=cfg.backoff, backoff_max=cfg.backoff_max, token_file=cfg.token_file,
            pool_size=cfg.concurrency, should_stop=self.stop.is_set)
        self.skipped: Counter = Counter()  # what the walk left out, this invocation
        self.invocation: dict = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": utc_now(),
                                 "resumed_skipped": 0, "other_shards": 0, "processed": 0,
                                 "move_failed": 0, "recovered_moves": 0}
        self.fatal: SubmitError | None = None
        self._batch_seq = 0
        self._pending_rejects: list[Unreadable] = []
        self._requeue: deque[list[Photo]] = deque()
        self._canary: bytes | None = None  # one photo the server classified: a health probe
        self._batch_limit = cfg.batch_size  # lowered to the server's own limit when it states a smaller one

    # ---- the run -------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        self.reference = self._load_reference()
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputNotWritable(f"cannot create {self.output}: {e}") from e
        lock = OutputLock(self.output, cfg.shard_label, {"run_id": cfg.run_id}).acquire()
        try:
            try:
                self.run_dir.mkdir(exist_ok=True)
            except OSError as e:
                raise OutputNotWritable(f"cannot create {self.run_dir}: {e}") from e
            self._check_same_sharding()
            self.state = self._start_state()
            done = self.journal.open()
            self._recover_moves()
            event("start", run_id=cfg.run_id, shard=cfg.shard_index, shard_count=cfg.shard_count,
                  already_recorded=len(done), invocation=self.state["invocations"])
            try:
                self.client.wait_ready(cfg.connect_deadline)
            except SubmitError as e:
                if not self.stop.is_set():  # a SIGTERM while waiting is an interruption (exit 7)
                    self.fatal = e
            if self.fatal is None and not self.stop.is_set():
                self._process(done)
            return self._finish()
        finally:
            self.journal.close()
            lock.release()

    def _check_same_sharding(self) -> None:
        for state_file in self.run_dir.glob(".state*.json"):
            try:
                count = json.loads(state_file.read_text()).get("shard_count")
            except (OSError, ValueError):
                continue
            if count is not None and count != self.cfg.shard_count:
                raise BadArguments(f"run {self.cfg.run_id} was started with --shard-count {count}; "
                                   f"resume it with the same count or use a new --run-id")

    def _start_state(self) -> dict:
        path = self.run_dir / self.names["state"]
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            now = datetime.now(timezone.utc)
            state = {"run_id": self.cfg.run_id, "shard_count": self.cfg.shard_count,
                     "started_at": now.isoformat(timespec="milliseconds"),
                     "run_date": now.strftime("%Y-%m-%d"), "invocations": 0}
        state["invocations"] += 1
        try:
            outputs.write_json(path, state)
            # Running again means the run is not complete until this invocation says so.
            for marker in (self.run_dir / self.names["success"], self.run_dir / SUCCESS_MARKER):
                marker.unlink(missing_ok=True)
        except OSError as e:
            raise OutputNotWritable(f"cannot write to {self.run_dir}: {e}") from e
        return state

    def _load_reference(self) -> Reference | None:
        if self.cfg.reference is None:
            return None
        try:
            return read_reference(self.cfg.reference)
        except (OSError, ValueError) as e:
            raise BadArguments(f"--reference {self.cfg.reference}: {e}") from e

    def _recover_moves(self) -> None:
        """Finish moves a kill interrupted after the record was written."""
        for path, key, root in ((self.journal.predictions_path, "archived_to", self.archive_root),
                                (self.journal.rejected_path, "quarantined_to", self.output)):
            for r in read_records(path):
                dest = r.get(key)
                if dest and lexists(self.inbox, r["path"]):
                    if complete_move(self.inbox, r["path"], root / dest, r.get("sha256")):
                        self.invocation["recovered_moves"] += 1

    def _entries(self, done) -> Iterator[Entry]:
        cfg = self.cfg
        # the output folder holds the quarantine too: a walk never enters it, nor the archive
        for entry in walk(self.inbox, self.skipped, exclude=(self.output, self.archive_root)):
            if cfg.shard_count > 1 and shard_of(entry.rel, cfg.shard_count) != cfg.shard_index:
                self.invocation["other_shards"] += 1
            elif entry.rel in done:
                self.invocation["resumed_skipped"] += 1
            else:
                yield entry

    def _process(self, done) -> None:
        cfg = self.cfg
        total = None
        bar = want_bar(cfg.progress)
        if bar:  # a names-only pass for the bar's total; cheap next to sending the photos
            total = sum(1 for _ in self._entries(done))
            self.skipped.clear()
            self.invocation.update(resumed_skipped=0, other_shards=0)
        self.progress = Progress(bar, total)
        try:
            with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="submit") as pool:
                try:
                    self._send_all(pool, done)
                except BaseException:
                    self.stop.set()  # e.g. the output is full: cut the other batches' retries short
                    raise
            if self._pending_rejects:
                self._record([], None)
        finally:
            self.progress.close()

    def _send_all(self, pool: ThreadPoolExecutor, done) -> None:
        cfg = self.cfg
        inflight: dict[Future, list[Photo]] = {}
        batch: list[Photo] = []
        size = 0
        for entry in self._entries(done):
            if self.stop.is_set() or self.fatal:
                break
            item = read(entry, cfg.max_image_bytes)
            if isinstance(item, Unreadable):
                self._pending_rejects.append(item)
                if len(self._pending_rejects) >= cfg.batch_size:
                    self._record([], None)
                continue
            if batch and (len(batch) >= self._batch_limit or size + len(item.data) > cfg.max_request_bytes):
                self._submit(pool, inflight, batch)
                batch, size = [], 0
            batch.append(item)
            size += len(item.data)
        if batch and not (self.stop.is_set() or self.fatal):
            self._submit(pool, inflight, batch)
        while inflight or (self._requeue and not (self.stop.is_set() or self.fatal)):
            self._submit(pool, inflight, None)

    def _submit(self, pool, inflight: dict, batch: list[Photo] | None) -> None:
        """Send `batch` (and batches split after server errors) keeping at most
        `concurrency` requests in flight; record answers as they come back."""
        queue = self._requeue
        if batch is not None:
            queue.append(batch)
        while queue or inflight:
            while queue and len(inflight) < self.cfg.concurrency and not (self.stop.is_set() or self.fatal):
                b = queue.popleft()
                inflight[pool.submit(self.client.predict, [p.data for p in b])] = b
            if not inflight or (batch is not None and not queue):
                return  # nothing to wait for, or the caller may prepare its next batch meanwhile
            finished, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
            for fut in finished:
                self._collect(fut, inflight.pop(fut))

    def _collect(self, fut: Future, batch: list[Photo]) -> None:
        try:
            answer = fut.result()
        except BatchFailed as e:
            if self.stop.is_set():
                return  # not recorded: sent again on resume
            self._batch_failed(batch, e)
            return
        except RequestRejected as e:
            if e.code == "too_many_instances" and len(batch) > 1:
                self._fit_server_limit(batch, e)
            else:
                self.fatal = self.fatal or e
            return
        except SubmitError as e:
            self.fatal = self.fatal or e
            return
        canary = next((p.data for p, r in zip(batch, answer.predictions, strict=True) if _valid_result(r)), None)
        self._canary = canary or self._canary
        self._record(batch, answer)

    def _batch_failed(self, batch: list[Photo], e: BatchFailed) -> None:
        """A batch failed after all its retries. If the server still classifies the last photo
        it classified (the canary), the batch itself is the problem (a photo that crashes the
        worker, say): split it until the culprit is alone, then reject that one photo with
        `server_error`. Otherwise the server is down: stop the run (exit 4, resumable), so a
        long outage never turns the night's photos into rejections."""
        healthy = e.server_error and self._server_answers_canary()
        if healthy and len(batch) == 1:
            self._record(batch, Answer([{"error": {"code": "server_error", "message": str(e)}}], e.attempts, 0.0))
        elif e.server_error and len(batch) > 1 and (healthy or self._canary is None):
            half = len(batch) // 2
            event("splitting a failing batch", level=logging.WARNING, size=len(batch), error=str(e))
            self._requeue.extend([batch[:half], batch[half:]])
        else:
            self.fatal = self.fatal or e

    def _fit_server_limit(self, batch: list[Photo], e: RequestRejected) -> None:
        """The server takes fewer photos per request than ``--batch-size``: send this batch again
        in requests it accepts, and cut every later batch to that size. The limit is the one the
        server states ("the limit is N", "allowed 1 to N"); a server that states none gets halves."""
        stated = _stated_limit(str(e))
        size = stated if stated is not None and stated < len(batch) else max(1, len(batch) // 2)
        if size < self._batch_limit:
            self._batch_limit = size
            self.invocation["batch_size_used"] = size
            event("the server takes fewer photos per request than --batch-size; sending smaller requests",
                  level=logging.WARNING, batch_size=self.cfg.batch_size, now=size, server=str(e))
        self._requeue.extend(batch[i:i + size] for i in range(0, len(batch), size))

    def _server_answers_canary(self) -> bool:
        """Is the server healthy? It must classify the last photo it classified in this run, or,
        before it has classified any, a blank 28x28 PNG (so a night whose first photo crashes the
        worker rejects that photo instead of stopping, on every resume, at the same photo)."""
        try:
            return _valid_result(self.client.predict([self._canary or BLANK_PNG]).predictions[0])
        except SubmitError:
            return False

    # ---- recording -----------------------------------------------------------------

    def _record(self, batch: list[Photo], answer: Answer | None) -> None:
        """Write one batch's records durably, then move its photos."""
        cfg = self.cfg
        self._batch_seq += 1
        now = utc_now()
        common = {"run_id": cfg.run_id, "shard": cfg.shard_index, "shard_count": cfg.shard_count,
                  "timestamp": now}
        preds, rejs, moves = [], [], []
        taken: set[str] = set()
        for photo, result in zip(batch, answer.predictions if answer else [], strict=True):
            base = {"path": photo.rel, "sha256": photo.sha256, "size": len(photo.data)}
            meta = {"batch": f"{self.state['invocations']}-{self._batch_seq}",
                    "request_ms": round(answer.latency_s * 1000, 2), "attempts": answer.attempts}
            good = _valid_result(result)
            if good:
                rec = {**base, **{k: result.get(k) for k in RESULT_KEYS}, **common, **meta}
                if cfg.after == "move":
                    rel_dest = f"{self.state['run_date']}/{safe_component(str(result[LABEL]))}/{photo.rel}"
                    rec["archived_to"] = plan(self.archive_root, rel_dest, taken)
                    moves.append((photo.rel, self.archive_root / rec["archived_to"]))
                preds.append(rec)
            else:
                err = result.get("error") if isinstance(result, dict) else None
                err = err if isinstance(err, dict) else {"code": "bad_response",
                                                         "message": f"unexpected answer: {str(result)[:200]}"}
                rejs.append(self._reject(base, str(err.get("code", "error")), str(err.get("message", "")),
                                         "server", {**common, **meta}, taken, moves, photo.rel))
        for u in self._pending_rejects:
            base = {"path": u.rel, "sha256": u.sha256, "size": u.size}
            rejs.append(self._reject(base, u.code, u.message, "submitter", common, taken, moves,
                                     None if u.code == "vanished" else u.rel))
        self._pending_rejects = []
        self.journal.append(preds, rejs)
        fault_point("after_journal_append")  # test-only: returns_submit/faults.py
        for rel, dst in moves:
            if not move(self.inbox, rel, dst):
                self.invocation["move_failed"] += 1
            fault_point("after_move")
        n = len(preds) + len(rejs)
        self.invocation["processed"] += n
        self.progress.update(n, rejected=len(rejs))
        for r in rejs:
            event("rejected", level=logging.WARNING, path=r["path"], code=r["code"], reason=r["message"])

    def _reject(self, base: dict, code: str, message: str, source: str, extra: dict,
                taken: set, moves: list, src: str | None) -> dict:
        rec = {**base, "code": code, "message": message, "source": source, **extra}
        if src is not None:
            rec["quarantined_to"] = plan(self.output, f"quarantine/{self.cfg.run_id}/{base['path']}", taken)
            moves.append((src, self.output / rec["quarantined_to"]))
        return rec

    # ---- the end ---------------------------------------------------------------------

    def _finish(self) -> int:
        cfg = self.cfg
        complete = self.fatal is None and not self.stop.is_set()
        try:
            night = outputs.derive(self.run_dir, [self.journal.predictions_path], [self.journal.rejected_path],
                                   self.reference, cfg.drift_alpha, cfg.on_drift)
        except OSError as e:
            raise OutputNotWritable(f"cannot write the run's files in {self.run_dir}: {e}") from e
        if self.fatal is not None:
            code, status = self.fatal.exit_code, _status_of(self.fatal)
        elif self.stop.is_set():
            code, status = EXIT_TERMINATED, "interrupted"
        elif night.summary.error_rate > cfg.max_error_rate:
            code, status = EXIT_PARTIAL, "partial"
        elif night.off:  # every photo recorded, but the night is unlike the reference: alert
            code, status = EXIT_DRIFT, "failed_drift" if night.action == "failed" else "complete"
        else:
            code, status = EXIT_OK, "complete"
        meta = self._metadata(night, status, code)
        # A night failed for drift is recorded but not published: no _SUCCESS, LATEST unchanged.
        publish = complete and night.action != "failed"
        try:
            outputs.write_json(self.run_dir / self.names["metadata"], meta)
            if publish:
                outputs.write_text(self.run_dir / self.names["success"], self.run_name + "\n")
                if cfg.shard_count == 1:
                    outputs.update_latest(self.output, self.run_name, self.state["started_at"])
                else:
                    outputs.finalize_shards(self.output, self.run_dir, cfg.run_id, cfg.shard_count,
                                            cfg.max_error_rate, cfg.drift_alpha, cfg.on_drift, cfg.as_json(),
                                            self.reference)
        except OSError as e:
            raise OutputNotWritable(f"cannot write the run's metadata in {self.run_dir}: {e}") from e
        level = {EXIT_OK: logging.INFO, EXIT_PARTIAL: logging.WARNING, EXIT_TERMINATED: logging.WARNING,
                 EXIT_DRIFT: logging.WARNING}
        event("done", level=level.get(code, logging.ERROR), status=status,
              exit_code=code, **meta["counts"], error=str(self.fatal) if self.fatal else None)
        return code

    def _metadata(self, night: outputs.Night, status: str, code: int) -> dict:
        cfg = self.cfg
        elapsed = self.progress.elapsed if hasattr(self, "progress") else 0.0
        ended = utc_now()
        extra_counts = {
            "skipped_non_image": self.skipped["non_image"], "skipped_hidden": self.skipped["hidden"],
            "skipped_symlink": self.skipped["symlink"], "skipped_unlistable": self.skipped["unlistable"],
            "other_shards": self.invocation["other_shards"],
            "resumed_skipped": self.invocation["resumed_skipped"],
            "move_failed": self.invocation["move_failed"],
        }
        return outputs.run_metadata(
            night, self.reference, run_id=cfg.run_id, status=status,
            started_at=self.state["started_at"], ended_at=ended, shard_index=cfg.shard_index,
            shard_count=cfg.shard_count, config=cfg.as_json(), extra_counts=extra_counts,
            exit_code=code, invocations=self.state["invocations"],
            throughput={"this_invocation_photos": self.invocation["processed"],
                        "this_invocation_seconds": round(elapsed, 3),
                        "images_per_second": round(self.invocation["processed"] / elapsed, 3)
                        if elapsed > 0 else None},
            error=str(self.fatal) if self.fatal else None,
            invocation={**self.invocation, "ended_at": ended},
            kubernetes=k8s_info.pod_info(),
            files={k: v for k, v in self.names.items() if k != "state"})


def _valid_result(r) -> bool:
    return (isinstance(r, dict) and "error" not in r and isinstance(r.get(LABEL), str)
            and isinstance(r.get(CLASS_ID), int) and isinstance(r.get(CONFIDENCE), (int, float)))


def _blank_png(size: int = 28) -> bytes:
    """A black ``size`` x ``size`` greyscale PNG, built with the standard library (the submitter has no PIL)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(size) for _ in range(size))  # filter byte 0, then the row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


BLANK_PNG = _blank_png()


def _stated_limit(message: str) -> int | None:
    """The photos-per-request limit a `too_many_instances` message states ("the limit is N"; "allowed
    1 to N", the v2 wording of older returns-kserve builds), or None."""
    m = re.search(r"(?:the limit is|allowed 1 to) (\d+)", message)
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


def _status_of(e: SubmitError) -> str:
    return "server_unreachable" if isinstance(e, ServerUnreachable) else "failed"
