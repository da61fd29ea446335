"""Progress of the submitter: a bar on a terminal, structured JSON log lines otherwise.

Log lines go to stderr, one JSON object each: {"ts", "level", "logger", "msg", ...fields}.
tqdm is imported lazily: the submitter image may not have it (then no bar, only lines).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone

log = logging.getLogger("returns_submit")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str, bar: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if bar:  # the bar owns the terminal; keep lines short and human
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    # The submitter's own loggers only ("returns_submit.*"): main() may run inside another
    # program (the tests, the demo) whose root logger is not ours to rewire.
    ours = logging.getLogger("returns_submit")
    for h in list(ours.handlers):
        ours.removeHandler(h)
    ours.addHandler(handler)
    ours.setLevel(level.upper())
    ours.propagate = False


def event(msg: str, level: int = logging.INFO, **fields) -> None:
    """Log one structured event: `fields` become keys of the JSON line."""
    log.log(level, msg, extra={"fields": {"event": msg, **fields}})


def want_bar(mode: str) -> bool:
    if mode == "log":
        return False
    if mode == "bar":
        return True
    return sys.stderr.isatty()


class Progress:
    """Counts photos done; draws a tqdm bar, or logs a `progress` line every `every_s`."""

    def __init__(self, bar: bool, total: int | None = None, every_s: float = 10.0):
        self._bar = None
        if bar:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="photo", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass
        self.every_s = every_s
        self.done = 0
        self.t0 = self._last = time.monotonic()

    def update(self, n: int, **fields) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            event("progress", done=self.done, images_per_second=round(self.rate, 2), **fields)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
