"""Exit codes of `returns-submit` and the exceptions that carry them.

A CronJob acts on the exit code alone, so every way the run can end maps to one
documented code (docs/interfaces.md, docs/submitter.md).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_ARGS = 2
EXIT_PARTIAL = 3
EXIT_UNREACHABLE = 4
EXIT_LOCKED = 5
EXIT_OUTPUT = 6
EXIT_TERMINATED = 7
EXIT_DRIFT = 8  # every photo recorded, but the night is off (drift); see --on-drift


class SubmitError(RuntimeError):
    """Base class: a run that cannot go on; `exit_code` says why."""

    exit_code = EXIT_INTERNAL


class BadArguments(SubmitError):
    """A flag or environment variable has a value the submitter cannot use (exit 2)."""

    exit_code = EXIT_BAD_ARGS


class ServerUnreachable(SubmitError):
    """The inference server did not answer within the retry budget (exit 4)."""

    exit_code = EXIT_UNREACHABLE


class LockHeld(SubmitError):
    """Another submitter holds the lock for this output and shard (exit 5)."""

    exit_code = EXIT_LOCKED


class OutputNotWritable(SubmitError):
    """The output volume is read-only, full or missing (exit 6)."""

    exit_code = EXIT_OUTPUT


class RequestRejected(SubmitError):
    """HTTP 400 with a request-level error: the request itself was wrong (exit 2 for
    `too_many_instances`, a configuration error; exit 1 otherwise, a bug)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"server rejected the request ({code}): {message}")
        self.code = code
        self.exit_code = EXIT_BAD_ARGS if code == "too_many_instances" else EXIT_INTERNAL


class ProtocolError(SubmitError):
    """The server answered something that breaks the inference contract (exit 1)."""
