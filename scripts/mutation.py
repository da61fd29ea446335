"""`make mutation`: mutmut over the modules that carry the product's promises, with the kill rate
per module.

    python -m scripts.mutation                      # every module in pyproject's [tool.mutmut] only_mutate
    python -m scripts.mutation returns_submit/drift.py returns_model/manifest.py
    python -m scripts.mutation --report-only        # the table from the verdicts already in mutants/

mutmut (pinned in requirements.txt) copies the tree to mutants/, records which unit tests reach each
function (the selection in [tool.mutmut]), and runs only those tests against each mutant of it. The
report counts killed (a test failed), survived, timeout (counted as killed: the mutant hung) and the
rest (no test reaches it, suspicious, skipped). docs/testing.md lists the survivors judged equivalent.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT = [sys.executable, "-m", "mutmut"]
KILLED = {"killed", "timeout"}


def configured_modules() -> list[str]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    return list(cfg["only_mutate"])


def module_of(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def statuses() -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true` ("name: status" lines)."""
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    result = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            result[name] = status.strip()
    return result


def report(modules: list[str], found: dict[str, str]) -> dict[str, dict]:
    per: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for name, status in found.items():
        mod = next((m for m in modules if name.startswith(module_of(m) + ".")), None)
        if mod is None:
            continue
        per[mod][status] += 1
        if status not in KILLED:
            survivors[mod].append(f"{name}: {status}")
    table = {}
    for mod in modules:
        c = per[mod]
        total = sum(c.values())
        killed = sum(c[s] for s in KILLED)
        table[mod] = {"mutants": total, "killed": killed, "kill_rate": round(killed / total, 4) if total else None,
                      "by_status": dict(c), "not_killed": sorted(survivors[mod])}
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.mutation", description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help="source files (default: [tool.mutmut] only_mutate)")
    p.add_argument("--max-children", type=int, default=2, help="parallel mutants (default: %(default)s)")
    p.add_argument("--report", type=Path, default=REPO / "mutants" / "kill_rates.json")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report the verdicts mutmut already holds in mutants/")
    args = p.parse_args(argv)
    modules = args.modules or configured_modules()
    names = [f"{module_of(m)}.*" for m in modules]
    started = time.monotonic()
    if not args.report_only:
        r = subprocess.run([*MUTMUT, "run", "--max-children", str(args.max_children), *names], cwd=REPO)
        if r.returncode != 0:
            print(f"mutmut run failed with exit code {r.returncode}", file=sys.stderr)
            return r.returncode
    table = report(modules, statuses())
    args.report.parent.mkdir(exist_ok=True)
    args.report.write_text(json.dumps(table, indent=2) + "\n")
    total = sum(t["mutants"] for t in table.values())
    killed = sum(t["killed"] for t in table.values())
    print(f"\n{'module':34} {'mutants':>8} {'killed':>7} {'rate':>7}")
    for mod, t in table.items():
        rate = f"{t['kill_rate']:.1%}" if t["kill_rate"] is not None else "-"
        print(f"{mod:34} {t['mutants']:>8} {t['killed']:>7} {rate:>7}")
    print(f"{'all':34} {total:>8} {killed:>7} {killed / total if total else 0:>7.1%}")
    if not args.report_only:
        print(f"wall time: {(time.monotonic() - started) / 60:.1f} min")
    print(f"survivors per module: {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
