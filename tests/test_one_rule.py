"""One owner for the served decision: no product code outside returns_model/rule.py compares a
confidence with a threshold (returns_model.rule.accepted is the one comparison)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("returns_model", "returns_submit", "returns_feedback", "handler", "training", "scripts")
OWNER = REPO / "returns_model" / "rule.py"


def _names(node: ast.AST) -> str:
    """The identifiers an expression mentions, joined (``self.meta.threshold`` -> 'self meta threshold')."""
    return " ".join(n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
                    if isinstance(n, (ast.Name, ast.Attribute)))


def threshold_comparisons(path: Path, root: Path = REPO) -> list[str]:
    """``a < threshold``-like comparisons in a file: one side names a threshold and another does not
    (two thresholds compared with each other are no decision about a photo)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and not all(isinstance(op, (ast.In, ast.NotIn, ast.Is, ast.IsNot, ast.Eq,
                                                                     ast.NotEq)) for op in node.ops):
            sides = [node.left, *node.comparators]
            named = ["threshold" in _names(s).lower() for s in sides]
            if any(named) and not all(named):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_only_the_rule_module_compares_a_confidence_with_a_threshold():
    found = [hit for pkg in PRODUCT for path in sorted((REPO / pkg).glob("*.py")) if path != OWNER
             for hit in threshold_comparisons(path)]
    assert found == []


def test_the_check_finds_a_comparison(tmp_path):
    """The check itself: it finds the comparisons it is meant to, and lets two thresholds be compared."""
    probe = tmp_path / "probe.py"
    probe.write_text("ok = conf >= self.meta.threshold\nlow = c < threshold\nsame = threshold < walked.threshold\n"
                     "edge = threshold >= ACCEPT_NOTHING_THRESHOLD\nlabel = name == threshold\n")
    hits = [h.split(": ", 1)[1] for h in threshold_comparisons(probe, tmp_path)]
    assert hits == ["conf >= self.meta.threshold", "c < threshold"]
    assert threshold_comparisons(OWNER), "the rule module itself must hold the comparison"
