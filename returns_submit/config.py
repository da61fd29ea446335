"""`SubmitConfig`: every setting of the nightly submitter in one place.

Each field has a flag (`--batch-size`) and an environment variable
(`RETURNS_BATCH_SIZE`) so the CronJob can configure the run without a command line;
a flag beats its variable, which beats the default here.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from returns_model.names import MAX_INSTANCES, MODEL_NAME
from returns_submit.errors import BadArguments

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MiB = 1024 * 1024


def default_run_id() -> str:
    """The UTC date-time: sortable, and unique for a nightly job."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


@dataclass
class SubmitConfig:
    inbox: Path | None = None
    output: Path | None = None
    endpoint: str = "http://127.0.0.1:8080"
    api: str = "predictions"  # or "v1" (KServe), "v2" (Open Inference Protocol, returns-kserve)
    model: str = MODEL_NAME
    # Photos per request and requests in flight: 256 (the handler's MAX_INSTANCES) x 4 was the fastest point
    # of two bench sweeps on a quiet host, ahead of 64 and 128 (TorchServe batch 1; each request costs the
    # frontend and the worker a fixed overhead, so fewer, fuller requests win). --max-request-bytes still
    # splits a batch of large photos.
    batch_size: int = MAX_INSTANCES
    concurrency: int = 4
    timeout: float = 60.0  # seconds per HTTP request
    retries: int = 8  # retries per request after the first attempt
    backoff: float = 0.5  # first retry delay; doubles, capped by backoff_max, full jitter
    backoff_max: float = 30.0
    connect_deadline: float = 300.0  # seconds to wait for the server at start
    token_file: Path | None = None
    shard_index: int = 0
    shard_count: int = 1
    run_id: str = field(default_factory=default_run_id)
    after: str = "keep"  # or "move"
    archive_dir: Path | None = None  # default <output>/archive
    max_error_rate: float = 0.05
    reference: Path | None = None  # artifact_manifest.json or model.json with a `reference`
    drift_alpha: float = 0.01
    # What a drifting night (confidence or unfamiliar share unlike the reference) does to its
    # auto-accepts. "review": the guarantee assumes photos like the calibration set, which such a
    # night is not, so nothing of it is auto-accepted; "record": only flag it; "fail": publish nothing.
    on_drift: str = "review"
    max_image_bytes: int = 32 * MiB
    max_request_bytes: int = 40 * MiB  # raw bytes per request; base64 adds a third
    progress: str = "auto"  # auto: a bar on a terminal, JSON log lines otherwise
    log_level: str = "INFO"

    def validate(self) -> "SubmitConfig":
        """Raise BadArguments naming what is wrong and what is allowed."""
        problems = []
        if self.inbox is None or self.output is None:
            problems.append("--inbox and --output are required (or RETURNS_INBOX / RETURNS_OUTPUT)")
        elif not self.inbox.is_dir():
            problems.append(f"--inbox {self.inbox} is not a directory")
        elif self.inbox.resolve() == self.output.resolve():
            problems.append("--output must not be the inbox itself (a folder inside it is fine)")
        if self.api not in ("predictions", "v1", "v2"):
            problems.append(f"--api must be 'predictions', 'v1' or 'v2', not {self.api!r}")
        if self.after not in ("keep", "move"):
            problems.append(f"--after must be 'keep' or 'move', not {self.after!r}")
        if not self.endpoint.startswith(("http://", "https://")):
            problems.append(f"--endpoint must be an http(s) URL, not {self.endpoint!r}")
        for name in ("batch_size", "concurrency", "shard_count", "max_image_bytes", "max_request_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("timeout", "backoff", "backoff_max", "connect_deadline"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive")
        if self.batch_size > MAX_INSTANCES:
            problems.append(f"--batch-size {self.batch_size} is above the server's {MAX_INSTANCES} photos per request")
        if self.retries < 0:
            problems.append("--retries must be 0 or more")
        if not 0 <= self.shard_index < max(self.shard_count, 1):
            problems.append(f"--shard-index {self.shard_index} must be in [0, {self.shard_count})")
        if not 0.0 <= self.max_error_rate <= 1.0:
            problems.append("--max-error-rate must be in [0, 1]")
        if not 0.0 < self.drift_alpha < 1.0:
            problems.append("--drift-alpha must be in (0, 1)")
        if self.on_drift not in ("record", "review", "fail"):
            problems.append(f"--on-drift must be 'record', 'review' or 'fail', not {self.on_drift!r}")
        if not RUN_ID_PATTERN.match(self.run_id):
            problems.append(f"--run-id {self.run_id!r} must match {RUN_ID_PATTERN.pattern}")
        if self.token_file is not None and not self.token_file.is_file():
            problems.append(f"--token-file {self.token_file} is not a file")
        if self.reference is not None and not self.reference.exists():
            problems.append(f"--reference {self.reference} does not exist")
        if self.progress not in ("auto", "bar", "log"):
            problems.append(f"--progress must be auto, bar or log, not {self.progress!r}")
        if problems:
            raise BadArguments("; ".join(problems))
        return self

    @property
    def shard_label(self) -> str:
        return f"shard-{self.shard_index}-of-{self.shard_count}"

    def as_json(self) -> dict[str, Any]:
        """The resolved config for run_metadata.json (paths as strings, no secrets)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


# field name -> environment variable; shard_index also falls back to JOB_COMPLETION_INDEX,
# which Kubernetes sets in the pods of an Indexed Job.
ENV_VARS = {f.name: "RETURNS_" + f.name.upper() for f in dataclasses.fields(SubmitConfig)}


def env_defaults(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Field name -> raw string value, from the environment (flags parse and check them)."""
    environ = os.environ if environ is None else environ
    values = {name: environ[var] for name, var in ENV_VARS.items() if environ.get(var, "") != ""}
    if "shard_index" not in values and environ.get("JOB_COMPLETION_INDEX", "") != "":
        values["shard_index"] = environ["JOB_COMPLETION_INDEX"]
    return values
