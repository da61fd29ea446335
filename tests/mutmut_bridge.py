"""Run a module as ``python -m`` would, reporting mutmut's coverage hits from this process.

mutmut (``make mutation``) learns which tests reach which function by recording calls in the
test process; a test that runs the submitter as a subprocess (a SIGKILL at a durability point, a
SIGTERM, exit codes) would otherwise reach nothing, and its function's mutants would never meet
the tests that can kill them. Only during mutmut's stats run (``MUTANT_UNDER_TEST=stats``) does
``tests/submit_fixtures.submit_cmd`` start the submitter through this module; each function name
is appended to ``$RETURNS_MUTMUT_HITS`` as soon as it is first reached (a SIGKILL loses nothing),
and ``tests/conftest.py`` hands the names to mutmut after the test.

    python -m tests.mutmut_bridge returns_submit.cli [arguments...]
"""
from __future__ import annotations

import os
import runpy
import sys

HITS_ENV = "RETURNS_MUTMUT_HITS"


def main() -> None:
    from mutmut.mutation import trampoline

    fd = os.open(os.environ[HITS_ENV], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    seen: set[str] = set()

    def hit(name: str, caller: str | None = None) -> None:
        if name not in seen:
            seen.add(name)
            os.write(fd, name.encode() + b"\n")

    trampoline.record_trampoline_hit = hit
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
