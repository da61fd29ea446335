"""The container images cannot be built here: their Dockerfiles are checked as text
(pinned base images, non-root numeric user, entry points, no torch in the submitter)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
VALUES = REPO / "helm" / "returns-classifier" / "values.yaml"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def build_args(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(arg.split("=", 1) for kw, arg in steps if kw == "ARG" and "=" in arg)


def base_images(steps: list[tuple[str, str]]) -> list[str]:
    args, stages, images = build_args(steps), set(), []
    for kw, arg in steps:
        if kw != "FROM":
            continue
        parts = arg.split()
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0])
        if image not in stages:
            images.append(image)
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
    return images


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


def test_there_is_a_submitter_and_a_training_image() -> None:
    assert {p.name for p in DOCKERFILES} == {"submitter.Dockerfile", "training.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    images = base_images(instructions(dockerfile))
    assert images
    for image in images:
        name, _, digest = image.partition("@")
        assert ":" in name, f"{image}: no tag"
        tag = name.rsplit(":", 1)[1]
        assert tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"{image}: tag is not a full version"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_numeric_non_root_user(dockerfile: Path) -> None:
    final = final_stage(instructions(dockerfile))
    users = [arg for kw, arg in final if kw == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000, "USER must be numeric (runAsNonRoot checks it)"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    # Nothing after the USER switch needs root again.
    assert [kw for kw, _ in final if kw in ("USER", "RUN")][-1] == "USER"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_has_a_dockerignore_that_keeps_the_context_small(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    lines = [line.strip() for line in ignore.read_text(encoding="utf-8").splitlines()]
    assert "*" in lines  # everything excluded, then the sources re-included
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for kw, arg in instructions(dockerfile):
        if kw == "COPY" and not arg.startswith("--from"):
            copied |= {src.rstrip("/") for src in arg.split()[:-1] if not src.startswith("--")}
    assert copied and copied <= included
    assert not included & {".venv", "data", "models", "dist"}


def test_submitter_image() -> None:
    path = DOCKER / "submitter.Dockerfile"
    steps = instructions(path)
    final = final_stage(steps)
    entrypoint = [arg for kw, arg in final if kw == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["returns-submit"]
    assert not [arg for kw, arg in final if kw == "CMD"], "a CMD would become returns-submit's arguments"
    copies = " ".join(arg for kw, arg in steps if kw == "COPY")
    # returns-submit and returns-verify-archive: the contract and the submitter, nothing with torch
    assert "returns_model/" in copies and "returns_submit/" in copies
    assert not re.search(r"\b(training|handler|scripts)/", copies), "the submitter image ships no torch code"
    runs = " ".join(arg for kw, arg in steps if kw == "RUN")
    assert "--constraint requirements.txt" in runs and '".[k8s]"' in runs
    assert not re.search(r"\btorch\b|\[model\]|\[serve\]|-r requirements", runs), "the submitter must not install torch"
    assert ("ENV", "PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1") in [
        (kw, re.sub(r"\s+", " ", arg)) for kw, arg in final]
    requirements = (REPO / "requirements.txt").read_text(encoding="utf-8")
    for package in ("requests", "kubernetes"):
        assert re.search(rf"^{package}==\S+$", requirements, flags=re.M), f"{package} is not pinned"


def test_training_image() -> None:
    steps = instructions(DOCKER / "training.Dockerfile")
    runs = " ".join(arg for kw, arg in steps if kw == "RUN")
    assert "-r requirements.txt" in runs  # the same pinned torch as `make train`
    assert "dataset-fashion-mnist" in runs
    entrypoint = [arg for kw, arg in final_stage(steps) if kw == "ENTRYPOINT"]
    assert json.loads(entrypoint[-1]) == ["returns-train"]


def test_chart_runs_the_images_as_their_users() -> None:
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    for dockerfile, component in (("submitter.Dockerfile", "nightly"), ("training.Dockerfile", "training")):
        user = [arg for kw, arg in final_stage(instructions(DOCKER / dockerfile)) if kw == "USER"][-1]
        uid, _, gid = user.partition(":")
        context = values[component]["podSecurityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid))
    # The stock TorchServe image runs as model-server, uid 1000.
    assert values["serving"]["podSecurityContext"]["runAsUser"] == 1000
    assert values["serving"]["image"]["repository"] == "pytorch/torchserve"
    assert re.fullmatch(r"\d+\.\d+\.\d+-(gpu|cpu)", values["serving"]["image"]["tag"])
