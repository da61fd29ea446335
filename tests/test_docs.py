"""The docs a user reads: a short README, figure tables generated from their artifacts (never
retyped), and links that lead somewhere."""
from __future__ import annotations

import re
from pathlib import Path

from scripts import docs_tables

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md")),
         REPO / "helm" / "returns-classifier" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The headings' anchors of a page (outside code blocks), and its explicit ``<a id="...">`` ones."""
    found, fenced = set(), False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if line.startswith("#") and not fenced:
            found.add(slug(line.lstrip("#")))
        found.update(re.findall(r'<a id="([^"]+)"', line))
    return found


def test_the_readme_is_a_short_guide_without_commit_hashes():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    assert not re.findall(r"\b[0-9a-f]{7,40}\b", text)


def test_every_figure_table_is_generated_from_its_artifact_and_current(capsys):
    assert docs_tables.main(["--check"]) == 0, capsys.readouterr().err
    for page, tables in docs_tables.PAGES.items():
        text = (REPO / page).read_text()
        for name in tables:  # each table sits in its page, filled
            body = text.split(f"<!-- generated:{name} -->")[1].split(f"<!-- /generated:{name} -->")[0]
            assert body.strip(), (page, name)


def test_a_stale_table_is_caught(tmp_path):
    page = "<!-- generated:t -->\nold\n<!-- /generated:t -->\n"
    assert docs_tables.render(page, {"t": lambda: "new"}, "p") == "<!-- generated:t -->\nnew\n<!-- /generated:t -->\n"
    try:
        docs_tables.render("no markers", {"t": lambda: "new"}, "p.md")
    except ValueError as exc:
        assert "p.md: no <!-- generated:t -->" in str(exc)
    else:
        raise AssertionError("a page without its markers must be refused")


def test_every_relative_link_in_the_docs_leads_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_the_slug_follows_githubs_rule():
    assert slug("Reviewers' decisions (format version 1; `returns_feedback/decisions.py`)") == \
        "reviewers-decisions-format-version-1-returns_feedbackdecisionspy"


def readme_command(name: str) -> list[str]:
    """The README's first ``name ...`` command, its continuation lines joined, split into words."""
    text = (REPO / "README.md").read_text()
    line = re.search(rf"^{re.escape(name)} .*?(?<!\\)$", text, re.M | re.S).group(0)
    return line.replace("\\\n", " ").split()


def test_the_readme_helm_install_renders_what_the_quick_start_goes_on_to_use():
    """The platform engineer's `helm install` line, rendered by Helm's engine with its own --set flags:
    valid objects, the images from the registry the block pushed to, and the CronJob the next line runs."""
    from scripts import helm_render as hr
    from tests.test_helm_chart import containers, pod_specs

    words = readme_command("helm install")
    namespace = words[words.index("-n") + 1]
    values: dict = {}
    for flag, setting in zip(words, words[1:]):
        if flag == "--set":
            key, value = setting.split("=", 1)
            value = {"false": False, "true": True}.get(value, value.replace("$", "").lower())
            node = values
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    values["model"]["sha256"] = "0" * 64  # the block's $SHA
    rendered = hr.render(values, namespace=namespace)
    assert hr.validate_objects(rendered.objects) == []
    images = {c["image"] for _, pod in pod_specs(rendered) for c in containers(pod) if "image" in c}
    assert "registry/returns-classifier/predictor:1.0.0" in images, images
    assert "registry/returns-classifier/submitter:1.0.0" in images, images
    job = readme_command("kubectl create job")
    cronjob = job[job.index(next(w for w in job if w.startswith("--from=cronjob/")))].split("/", 1)[1]
    assert cronjob in {o["metadata"]["name"] for o in rendered.objects if o["kind"] == "CronJob"}
    assert job[job.index("-n") + 1] == namespace
    assert {"--set", "gpu.enabled=false"} <= set(words), "the predictor built with CPU wheels needs no GPU"
