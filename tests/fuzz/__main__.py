"""`make fuzz`: run the fuzz targets of tests/fuzz/targets.py for a fixed time.

    python -m tests.fuzz --seconds 600      # FUZZ_SECONDS in the Makefile; default 10 minutes

Each round runs every target for a batch of fresh random examples (no example database, a new seed
each round); a finding is shrunk by hypothesis and printed, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import random
import time
import warnings

from hypothesis import HealthCheck, given, seed, settings

from tests.fuzz.targets import check_decode, check_parse, content_types, photo_bytes, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0, help="how long to fuzz (default: %(default)s)")
    p.add_argument("--examples-per-round", type=int, default=500, help="examples per target per round")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF and the like: not findings
    cfg = settings(max_examples=args.examples_per_round, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))
    decode = cfg(given(photo_bytes)(check_decode))
    parse = cfg(given(rows, content_types)(check_parse))
    end = time.monotonic() + args.seconds
    rounds = 0
    rng = random.Random()
    while time.monotonic() < end:
        for name, target in (("decode", decode), ("parse_request", parse)):
            s = rng.getrandbits(64)
            try:
                seed(s)(target)()
            except Exception as e:  # noqa: BLE001 - the finding itself is what we report
                print(f"FUZZ FINDING in {name} (round {rounds}, seed {s}): {type(e).__name__}: {e}")
                return 1
        rounds += 1
        print(f"fuzz: round {rounds} clean, {rounds * args.examples_per_round} examples per target, "
              f"{max(0.0, end - time.monotonic()):.0f} s left", flush=True)
    print(f"fuzz: clean after {rounds} rounds ({rounds * args.examples_per_round} examples per target) "
          f"in {args.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
