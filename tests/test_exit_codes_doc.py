"""docs/exit-codes.md stays true to the code where the code names its exit codes (the submitter's,
the model fetch's and the training commands') and covers exactly the commands pyproject.toml
declares; it and docs/glossary.md link only to files that exist."""
from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

import returns_submit.errors as submit_errors
import scripts.localserve as localserve
import training.compare as compare
import training.quantize as quantize
import training.report as report
import training.retrain as retrain
import training.train as train
from returns_model import fetch

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "exit-codes.md"


def table() -> dict[str, set[int]]:
    """Command -> the codes the table has rows for (rows look like "| `command` | code | ...")."""
    rows = defaultdict(set)
    for line in PAGE.read_text().splitlines():
        if line.startswith("| `"):
            command, code = (cell.strip() for cell in line.strip("|").split("|")[:2])
            rows[command.strip("`")].add(int(code))
    return rows


def named(module) -> set[int]:
    return {value for name, value in vars(module).items() if name.startswith("EXIT_")}


def fetch_codes() -> set[int]:
    return {0, fetch.FetchError.exit_code} | {c.exit_code for c in fetch.FetchError.__subclasses__()}


def test_the_table_names_exactly_the_declared_commands():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(table()) == set(scripts)


def test_the_table_agrees_with_the_named_exit_codes():
    rows = table()
    # These modules name every code their command returns.
    assert rows["returns-submit"] == named(submit_errors)
    assert rows["returns-fetch-model"] == fetch_codes()
    # The training commands name each code they choose; besides those only success (0) and, where 1
    # means nothing else, a traceback.
    assert rows["returns-train"] == named(train) | {0}
    assert rows["returns-report"] == named(report) | {0}
    assert rows["returns-quantize"] == named(quantize) | {0, 1}
    assert rows["returns-retrain"] == named(retrain) | {0}
    assert rows["returns-compare"] == named(compare) | {1}
    assert rows["returns-serve"] == named(localserve) | {0}


def test_the_table_agrees_with_the_kserve_predictors_codes():
    """returns-kserve names its own codes; 0 is a stopped server and 1 a traceback."""
    predictor = pytest.importorskip("handler.kserve_predictor")
    assert table()["returns-kserve"] == named(predictor) | {0, 1}
    assert predictor.ModelRefused.exit_code in named(predictor)


def test_the_reference_pages_link_to_files_that_exist():
    for page in (PAGE, REPO / "docs" / "glossary.md"):
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"
