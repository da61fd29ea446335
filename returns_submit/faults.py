"""Test-only fault injection at the durability points of a run (docs/submitter.md, "Exactly once").

    RETURNS_SUBMIT_FAULT=after_journal_append:2 returns-submit ...

kills the submitter with SIGKILL the 2nd time it reaches that point, so a test can place a crash
exactly between two steps of the durability order instead of hoping a random kill lands in a
millisecond window. Points: ``after_journal_append`` (a batch's records are fsynced, none of its
photos moved yet), ``after_move`` (one photo moved, the batch's next moves not done) and
``during_manifest_rewrite`` (a derived file such as predictions.csv half-written to its temporary
file). Without the variable, ``fault_point`` is a dictionary lookup and nothing else. Production
never sets it; the chart does not either.
"""
from __future__ import annotations

import os
import signal
from collections import Counter

FAULT_ENV = "RETURNS_SUBMIT_FAULT"
POINTS = ("after_journal_append", "after_move", "during_manifest_rewrite")
_reached: Counter = Counter()


def fault_point(name: str) -> None:
    """SIGKILL this process if RETURNS_SUBMIT_FAULT names this point (``name`` or ``name:N``,
    the N-th time it is reached; N defaults to 1)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
