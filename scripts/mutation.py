"""`make mutation`: mutmut over the modules that carry the product's promises, with the kill rate
per module.

    python -m scripts.mutation                      # every mutant of [tool.mutmut] only_mutate
    python -m scripts.mutation --sample 100         # 100 mutants per module, drawn at random (seeded)
    python -m scripts.mutation returns_submit/drift.py returns_model/manifest.py
    python -m scripts.mutation --report-only        # the table from the verdicts already in mutants/

mutmut (pinned in requirements.txt) copies the tree to mutants/, records which unit tests reach each
function (the selection in [tool.mutmut]), and runs only those tests against each mutant of it. The
report counts killed (a test failed), survived, timeout (counted as killed: the mutant hung) and the
rest (no test reaches it, suspicious, skipped). docs/testing.md lists the survivors judged equivalent.

A killed mutant costs about a second (the quickest test that notices it runs first); a survivor runs
every test that reaches it, some 20 s for the runner's (real submitter processes, killed at the
durability points). All the mutants take well over an hour on 2 cores, so ``make mutation`` passes
``--sample 100``: 100 mutants per module, drawn uniformly with a fixed seed (``--record`` keeps each
run's wall time beside its kill rates). The kill rate is then an estimate and the report gives its
exact 95% (Clopper-Pearson) interval. The draw is kept in mutants/sample.json, so ``--report-only`` reports the same mutants.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

from returns_model.fileio import write_json

REPO = Path(__file__).resolve().parents[1]
MUTANTS = REPO / "mutants"
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


def mutant_names(module_path: str) -> list[str]:
    """Every mutant mutmut generated for one source file (from its mutants/<file>.meta)."""
    meta = MUTANTS / f"{module_path}.meta"
    return sorted(json.loads(meta.read_text())["exit_code_by_key"])


def draw(modules: list[str], n: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    out = {}
    for mod in modules:
        names = mutant_names(mod)
        out[mod] = sorted(rng.sample(names, n)) if 0 < n < len(names) else names
    return out


def interval(killed: int, n: int) -> tuple[float, float]:
    """Exact two-sided 95% (Clopper-Pearson) interval for a kill rate estimated from n sampled mutants:
    the certificate's one-sided bound (training/certify.py) at 2.5% on each side."""
    from training.certify import clopper_pearson_upper

    return 1 - clopper_pearson_upper(n - killed, n, 0.025), clopper_pearson_upper(killed, n, 0.025)


def report(names_by_module: dict[str, list[str]], found: dict[str, str], totals: dict[str, int]) -> dict[str, dict]:
    table = {}
    for mod, names in names_by_module.items():
        c = Counter(found.get(n, "not run") for n in names)
        n = len(names)
        killed = sum(c[s] for s in KILLED)
        row = {"mutants": totals[mod], "tested": n, "killed": killed,
               "kill_rate": round(killed / n, 4) if n else None, "by_status": dict(c),
               "not_killed": sorted(f"{x}: {found.get(x, 'not run')}" for x in names if found.get(x) not in KILLED)}
        if n < totals[mod]:
            lo, hi = interval(killed, n)
            row["kill_rate_95"] = [round(lo, 4), round(hi, 4)]
        table[mod] = row
    return table


def record(path: Path, table: dict[str, dict], sample: int, seed: int, children: int, minutes: float | None) -> None:
    """The kill rates as a self-describing artifact: what was run, where, and how long it took."""
    from scripts.machine import machine

    run = {"date": time.strftime("%Y-%m-%d", time.gmtime()), **machine(), "sample_per_module": sample, "seed": seed,
           "max_children": children, "wall_minutes": minutes}
    write_json(path, {"run": run, "modules": table})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.mutation", description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="*", help="source files (default: [tool.mutmut] only_mutate)")
    p.add_argument("--sample", type=int, default=0, help="mutants per module, drawn at random (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (default: %(default)s)")
    p.add_argument("--max-children", type=int, default=2, help="parallel mutants (default: %(default)s)")
    p.add_argument("--report", type=Path, default=MUTANTS / "kill_rates.json")
    p.add_argument("--record", type=Path, default=None,
                   help="also write the table with the run's machine, sample and wall time here (make mutation: "
                        "bench/mutation.json, the artifact docs/testing.md's table is generated from)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report the verdicts mutmut already holds in mutants/")
    args = p.parse_args(argv)
    modules = args.modules or configured_modules()
    started = time.monotonic()
    sample_file = MUTANTS / "sample.json"
    if not args.report_only:
        if not all((MUTANTS / f"{m}.meta").exists() for m in modules):
            # generate the mutants (and mutmut's test map) without testing any: a name that matches none
            subprocess.run([*MUTMUT, "run", "--max-children", str(args.max_children),
                            f"{module_of(modules[0])}.x_generate_only__mutmut_0"], cwd=REPO)
        chosen = draw(modules, args.sample, args.seed)
        sample_file.write_text(json.dumps({"sample": args.sample, "seed": args.seed, "mutants": chosen}, indent=1))
        names = [n for mod in modules for n in chosen[mod]]
        r = subprocess.run([*MUTMUT, "run", "--max-children", str(args.max_children), *names], cwd=REPO)
        if r.returncode != 0:
            print(f"mutmut run failed with exit code {r.returncode}", file=sys.stderr)
            return r.returncode
    elif sample_file.exists():
        chosen = {m: v for m, v in json.loads(sample_file.read_text())["mutants"].items() if m in modules}
    else:
        chosen = draw(modules, 0, 0)
    totals = {m: len(mutant_names(m)) for m in modules}
    table = report(chosen, statuses(), totals)
    args.report.parent.mkdir(exist_ok=True)
    args.report.write_text(json.dumps(table, indent=2) + "\n")
    print(f"\n{'module':34} {'mutants':>8} {'tested':>7} {'killed':>7} {'rate':>7}  95% interval (sampled)")
    for mod, t in table.items():
        rate = f"{t['kill_rate']:.1%}" if t["kill_rate"] is not None else "-"
        ci = "{:.1%}-{:.1%}".format(*t["kill_rate_95"]) if "kill_rate_95" in t else "all tested"
        print(f"{mod:34} {t['mutants']:>8} {t['tested']:>7} {t['killed']:>7} {rate:>7}  {ci}")
    tested = sum(t["tested"] for t in table.values())
    killed = sum(t["killed"] for t in table.values())
    print(f"{'all tested':34} {sum(totals.values()):>8} {tested:>7} {killed:>7} {killed / tested if tested else 0:>7.1%}")
    minutes = None if args.report_only else round((time.monotonic() - started) / 60, 1)
    if minutes is not None:
        print(f"wall time: {minutes:.1f} min")
    if args.record and sorted(modules) != sorted(configured_modules()):
        print(f"not recording {args.record}: it holds the run over every configured module, not a subset",
              file=sys.stderr)
    elif args.record:
        record(args.record, table, args.sample, args.seed, args.max_children, minutes)
    print(f"survivors per module: {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
