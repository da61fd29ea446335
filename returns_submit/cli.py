"""`returns-submit`: the nightly batch job that classifies the inbox's photos.

    returns-submit --inbox /data/inbox --output /data/results [--after move] ...

Every flag can also be set by an environment variable (RETURNS_<FLAG>, e.g.
RETURNS_BATCH_SIZE); see docs/submitter.md for the output layout and the exactly-once
design. Imports no torch: the submitter image has only the stdlib and requests.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Sequence

from returns_submit.runner import Runner
from returns_submit.config import ENV_VARS, SubmitConfig, default_run_id, env_defaults
from returns_submit.errors import (
    EXIT_BAD_ARGS,
    EXIT_DRIFT,
    EXIT_INTERNAL,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_OUTPUT,
    EXIT_PARTIAL,
    EXIT_TERMINATED,
    EXIT_UNREACHABLE,
    BadArguments,
    SubmitError,
)
from returns_submit.log import event, setup_logging, want_bar

log = logging.getLogger("returns_submit")

EPILOG = f"""\
exit codes:
  {EXIT_OK}  success: every photo recorded, error rate within --max-error-rate
  {EXIT_INTERNAL}  internal error (a bug, or a server answer that breaks the contract)
  {EXIT_BAD_ARGS}  bad arguments (also: --batch-size above the server's limit)
  {EXIT_PARTIAL}  partial: all photos recorded, but the error rate is above --max-error-rate
  {EXIT_UNREACHABLE}  inference server unreachable (after the retries); resumable
  {EXIT_LOCKED}  another run holds the lock on this output and shard
  {EXIT_OUTPUT}  output not writable or full
  {EXIT_TERMINATED}  stopped by SIGTERM/SIGINT after finishing the batches in flight; resumable
  {EXIT_DRIFT}  every photo recorded, but the night is off: unlike the model's drift reference (--on-drift)
Re-running with the same --run-id resumes: recorded photos are skipped.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def get_args_parser(environ=None) -> argparse.ArgumentParser:
    env = env_defaults(environ)
    d = SubmitConfig(run_id="")

    def default(name: str):
        return env.get(name, getattr(d, name))

    def h(text: str, name: str) -> str:
        var = ENV_VARS[name] + (" or JOB_COMPLETION_INDEX" if name == "shard_index" else "")
        return f"{text} [env {var}; default: %(default)s]"

    p = argparse.ArgumentParser(
        prog="returns-submit", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("where")
    g.add_argument("--inbox", type=Path, default=default("inbox"),
                   help=h("folder of the night's photos, walked recursively", "inbox"))
    g.add_argument("--output", type=Path, default=default("output"),
                   help=h("results volume; the run writes <output>/run_<run-id>/", "output"))
    g.add_argument("--run-id", default=env.get("run_id"),
                   help=h("id of the run; the same id resumes it (default: the UTC date-time)", "run_id"))
    g.add_argument("--after", choices=("keep", "move"), default=default("after"),
                   help=h("what happens to classified photos: left in the inbox, or moved to "
                          "<archive-dir>/<run-date>/<label>/ once recorded", "after"))
    g.add_argument("--archive-dir", type=Path, default=default("archive_dir"),
                   help=h("archive root for --after move (default <output>/archive)", "archive_dir"))
    g.add_argument("--reference", type=Path, default=default("reference"),
                   help=h("artifact_manifest.json or model.json with the validation reference, for the "
                          "drift summary", "reference"))
    s = p.add_argument_group("server")
    s.add_argument("--endpoint", default=default("endpoint"), help=h("inference base URL", "endpoint"))
    s.add_argument("--api", choices=("predictions", "v1", "v2"), default=default("api"),
                   help=h("predictions: POST /predictions/<model> (TorchServe); v1: POST "
                          "/v1/models/<model>:predict (KServe); v2: POST /v2/models/<model>/infer "
                          "(Open Inference Protocol, the returns-kserve predictor)", "api"))
    s.add_argument("--model", default=default("model"), help=h("model name", "model"))
    s.add_argument("--token-file", type=Path, default=default("token_file"),
                   help=h("file holding the inference API token (sent as a Bearer token, re-read on 401)",
                          "token_file"))
    s.add_argument("--batch-size", type=_positive_int, default=default("batch_size"),
                   help=h("photos per request (keep under the handler's max instances)", "batch_size"))
    s.add_argument("--concurrency", type=_positive_int, default=default("concurrency"),
                   help=h("requests in flight", "concurrency"))
    s.add_argument("--timeout", type=float, default=default("timeout"),
                   help=h("seconds per HTTP request", "timeout"))
    s.add_argument("--retries", type=int, default=default("retries"),
                   help=h("retries per request (connection errors, timeouts, 404, 5xx), exponential "
                          "backoff with full jitter", "retries"))
    s.add_argument("--backoff", type=float, default=default("backoff"),
                   help=h("first retry delay in seconds (doubles each retry)", "backoff"))
    s.add_argument("--backoff-max", type=float, default=default("backoff_max"),
                   help=h("longest retry delay in seconds", "backoff_max"))
    s.add_argument("--connect-deadline", type=float, default=default("connect_deadline"),
                   help=h("seconds to wait for the server to answer at start before exit 4",
                          "connect_deadline"))
    s.add_argument("--max-image-bytes", type=_positive_int, default=default("max_image_bytes"),
                   help=h("larger photos are rejected as too_large without being sent", "max_image_bytes"))
    s.add_argument("--max-request-bytes", type=_positive_int, default=default("max_request_bytes"),
                   help=h("photo bytes per request before base64 (under the server's max_request_size)",
                          "max_request_bytes"))
    k = p.add_argument_group("sharding (Kubernetes Indexed Job)")
    k.add_argument("--shard-index", type=int, default=default("shard_index"),
                   help=h("this pod's shard", "shard_index"))
    k.add_argument("--shard-count", type=_positive_int, default=default("shard_count"),
                   help=h("number of shards; above 1 needs an explicit --run-id shared by all pods",
                          "shard_count"))
    r = p.add_argument_group("outcome")
    r.add_argument("--max-error-rate", type=float, default=default("max_error_rate"),
                   help=h("rejected/seen above this exits 3 (partial)", "max_error_rate"))
    r.add_argument("--drift-alpha", type=float, default=default("drift_alpha"),
                   help=h("significance level of the drift tests", "drift_alpha"))
    r.add_argument("--on-drift", choices=("record", "review", "fail"), default=default("on_drift"),
                   help=h("a night whose confidences or unfamiliar share drift from the reference exits 8; "
                          "record: only flag it, review: send all its photos to review, fail: publish nothing",
                          "on_drift"))
    r.add_argument("--progress", choices=("auto", "bar", "log"), default=default("progress"),
                   help=h("auto: a bar on a terminal, JSON log lines otherwise", "progress"))
    r.add_argument("--log-level", default=default("log_level"),
                   choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                   help=h("log level", "log_level"))
    return p


def config_from_args(args: argparse.Namespace) -> SubmitConfig:
    values = vars(args).copy()
    run_id = values.pop("run_id")
    if not run_id:
        if values["shard_count"] > 1:
            raise BadArguments("--shard-count above 1 needs --run-id (RETURNS_RUN_ID) shared by every shard, "
                               "e.g. the Job's name from the downward API")
        run_id = default_run_id()
    return SubmitConfig(run_id=run_id, **values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag argparse refused (2)
        return int(e.code or 0)
    setup_logging(args.log_level, want_bar(args.progress))
    try:
        cfg = config_from_args(args).validate()
    except BadArguments as e:
        return _fail(e)
    stop = threading.Event()

    def on_signal(signum, _frame):
        event("stop requested: finishing the batches in flight", level=logging.WARNING,
              signal=signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return Runner(cfg, stop).run()
    except SubmitError as e:
        return _fail(e)
    except Exception as e:  # noqa: BLE001 - the CronJob needs an exit code, not a traceback only
        log.exception("internal error")
        return _fail(SubmitError(f"internal error: {type(e).__name__}: {e}"))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _fail(e: SubmitError) -> int:
    event("error", level=logging.ERROR, exit_code=e.exit_code, error=str(e), kind=type(e).__name__)
    if sys.stderr.isatty():
        print(f"returns-submit: {e}", file=sys.stderr)
    return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
