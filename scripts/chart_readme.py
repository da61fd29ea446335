"""Write the chart README's parameters table from the `## @param` comments in values.yaml.

values.yaml is the one owner of every value's description and default; the table between the
README's `<!-- parameters:start -->` and `<!-- parameters:end -->` markers is generated from it,
one table per `## @section`. `--check` writes nothing and exits 1 when the README is stale.

    python -m scripts.chart_readme            # rewrite helm/returns-classifier/README.md
    python -m scripts.chart_readme --check    # exit 1 if the table is out of date
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "returns-classifier"
START, END = "<!-- parameters:start -->", "<!-- parameters:end -->"
_COMMENT = re.compile(r"^\s*## @(section|param) (.+?)\s*$")


def _lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for key in dotted.split("."):
        node = node[key]
    return node


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def parameters_table(chart_dir: Path = CHART_DIR) -> str:
    """Markdown: a `### <section>` heading and a Name / Description / Default table per section."""
    text = (chart_dir / "values.yaml").read_text(encoding="utf-8")
    values = yaml.safe_load(text)
    out: list[str] = []
    for line in text.splitlines():
        match = _COMMENT.match(line)
        if not match:
            continue
        kind, rest = match.groups()
        if kind == "section":
            out += ["", f"### {rest}", "", "| Name | Description | Default |", "|---|---|---|"]
            continue
        key, _, description = rest.partition(" ")
        default = json.dumps(_lookup(values, key), separators=(", ", ": "))
        out.append(f"| `{key}` | {_cell(description)} | `{_cell(default)}` |")
    return "\n".join(out).strip() + "\n"


def update(readme: str, table: str) -> str:
    """The README with the text between the markers replaced by ``table``."""
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.chart_readme",
                                description="Generate the chart README's parameters table from values.yaml.")
    p.add_argument("--chart", type=Path, default=CHART_DIR, help="chart folder (default: helm/returns-classifier)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the README is out of date")
    args = p.parse_args(argv)
    path = args.chart / "README.md"
    current = path.read_text(encoding="utf-8")
    wanted = update(current, parameters_table(args.chart))
    if args.check:
        if wanted != current:
            print(f"{path}: parameters table out of date; run python -m scripts.chart_readme", file=sys.stderr)
            return 1
        print(f"{path}: up to date")
        return 0
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".README.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(wanted)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
