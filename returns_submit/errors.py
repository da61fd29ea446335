"""Exit codes of `returns-submit` and the exceptions that carry them.

A CronJob acts on the exit code alone, so every way the run can end maps to one
documented code (docs/exit-codes.md, docs/submitter.md).

Two kinds of code. An error is raised as one of the classes below, which carries its code
(1, 2, 4, 5, 6). An outcome (0, 3 partial, 7 terminated, 8 drift) has no class because nothing
goes wrong that could be raised: the run's records are complete, or complete up to the batches
in flight when SIGTERM came, and the runner must still derive the run's files, write
run_metadata.json and, for 0, 3 and 8 (unless --on-drift fail), publish the run (`_SUCCESS`,
`LATEST`). `Runner._finish` reads the code off the finished run, in this order: the error that
stopped the batches (its own code), else 7 when a stop was requested, else 3 when rejected/seen
is above --max-error-rate, else 8 when the night is off, else 0.
"""
from __future__ import annotations

# Outcomes: the run was not stopped by an error (Runner._finish decides which).
EXIT_OK = 0
EXIT_PARTIAL = 3  # every photo recorded, but rejected/seen above --max-error-rate
EXIT_TERMINATED = 7  # SIGTERM/SIGINT: the batches in flight were finished and recorded; resumable
EXIT_DRIFT = 8  # every photo recorded, but the night is off (drift); see --on-drift

# Errors: raised as the classes below.
EXIT_INTERNAL = 1
EXIT_BAD_ARGS = 2
EXIT_UNREACHABLE = 4
EXIT_LOCKED = 5
EXIT_OUTPUT = 6


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
