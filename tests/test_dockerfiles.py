"""The container images cannot be built here: their Dockerfiles are checked as text
(pinned base images, non-root numeric user, entry points, no torch in the submitter, the pinned
torch and TorchServe of requirements.txt in the serving images)."""

from __future__ import annotations

import json
import re
import tomllib
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


def test_there_is_a_submitter_a_training_and_two_serving_images() -> None:
    assert {p.name for p in DOCKERFILES} == {"submitter.Dockerfile", "training.Dockerfile",
                                             "predictor.Dockerfile", "torchserve.Dockerfile"}


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


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_an_image_that_installs_the_project_copies_every_package_it_declares(dockerfile: Path) -> None:
    """pip refuses to build the distribution when one of pyproject.toml's packages is missing."""
    steps = instructions(dockerfile)
    installs = [arg for kw, arg in steps if kw == "RUN" and re.search(r"pip install .*(\s\.|\"\.\[\w+\]\")(\s|$)", arg)]
    if not installs:
        return  # the TorchServe image installs requirements only; the .mar ships the code
    packages = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    copied = {src.rstrip("/") for kw, arg in steps if kw == "COPY" and not arg.startswith("--from")
              for src in arg.split()[:-1]}
    assert set(packages) <= copied, f"{dockerfile.name} installs the project without {set(packages) - copied}"


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


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    """ENV key=value pairs of some instructions (the later wins)."""
    out: dict[str, str] = {}
    for kw, arg in steps:
        if kw == "ENV":
            out.update(pair.split("=", 1) for pair in arg.split())
    return out


def requirement(package: str) -> str:
    text = (REPO / "requirements.txt").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(package)}==(\S+)$", text, flags=re.M)
    assert match, f"{package} is not pinned in requirements.txt"
    return match.group(1)


@pytest.mark.parametrize("name", ["predictor.Dockerfile", "torchserve.Dockerfile"])
def test_serving_images_pin_the_base_by_digest_and_torch_by_requirements(name: str) -> None:
    steps = instructions(DOCKER / name)
    (image,) = base_images(steps)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    runs = " ".join(arg for kw, arg in steps if kw == "RUN")
    # torch comes from the TORCH_INDEX_URL build argument at requirements.txt's version (CPU or CUDA wheels).
    assert '--index-url "${TORCH_INDEX_URL}" "$(grep -E \'^torch==\' requirements.txt)"' in runs
    assert requirement("torch")
    assert build_args(steps)["TORCH_INDEX_URL"] in ("https://download.pytorch.org/whl/cpu", "https://pypi.org/simple")
    assert "--constraint requirements.txt" in runs  # everything else at the suite's versions


def test_predictor_image() -> None:
    steps = instructions(DOCKER / "predictor.Dockerfile")
    final = final_stage(steps)
    assert build_args(steps)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # CPU wheels by default
    runs = " ".join(arg for kw, arg in steps if kw == "RUN")
    assert "--no-deps -r requirements-kserve.txt" in runs  # kserve as scripts/setup.sh installs it
    assert re.search(r"^kserve==0\.21\.0$", (REPO / "requirements-kserve.txt").read_text(), flags=re.M)
    assert "sed -n '/^# The KServe predictor/,$p' requirements.txt" in runs
    assert "# The KServe predictor" in (REPO / "requirements.txt").read_text(encoding="utf-8")
    assert not re.search(r"\btorchserve\b|-r requirements\.txt", runs), "the predictor needs no TorchServe"
    copies = [arg for kw, arg in steps if kw == "COPY"]
    assert "handler/ handler/" in copies and "returns_model/ returns_model/" in copies
    assert not any(re.search(r"\b(training|scripts)/", c) for c in copies)
    env = env_of(final)
    # handler/ is a source-tree package; a read-only root: HOME and caches in /tmp, no bytecode writes.
    assert env["PYTHONPATH"] == "/src" and [a for kw, a in final if kw == "WORKDIR"][-1] == "/tmp"
    assert env["HOME"] == "/tmp" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert all(env[k].startswith("/tmp/") for k in ("XDG_CACHE_HOME", "TORCH_HOME"))
    entrypoint = [arg for kw, arg in final if kw == "ENTRYPOINT"]
    assert json.loads(entrypoint[-1]) == ["returns-kserve"]
    assert not [arg for kw, arg in final if kw == "CMD"]
    assert [a for kw, a in final if kw == "USER"][-1] == "10001:10001"


def test_torchserve_image() -> None:
    steps = instructions(DOCKER / "torchserve.Dockerfile")
    final = final_stage(steps)
    runs = " ".join(arg for kw, arg in steps if kw == "RUN")
    assert "openjdk-17-jre-headless" in runs  # TorchServe 0.12's frontend, as `make setup` installs it
    assert re.search(r"--constraint requirements\.txt torchserve\b", runs)
    assert requirement("torchserve") == "0.12.0"
    env = env_of(final)
    # The stock image's layout, which the chart's Deployment relies on (uid 1000, TEMP, working dir).
    assert [a for kw, a in final if kw == "USER"][-1] == "1000:1000"
    assert env["TEMP"] == "/home/model-server/tmp"
    assert [a for kw, a in final if kw == "WORKDIR"][-1] == "/home/model-server/work"
    assert "/home/model-server/tmp /home/model-server/work" in runs
    assert json.loads([a for kw, a in final if kw == "ENTRYPOINT"][-1]) == ["torchserve"]
    deployment = (REPO / "helm" / "returns-classifier" / "templates" / "deployment.yaml").read_text(encoding="utf-8")
    assert "workingDir: /home/model-server/work" in deployment and "value: /home/model-server/tmp" in deployment


def test_chart_runs_the_images_as_their_users() -> None:
    values = yaml.safe_load(VALUES.read_text(encoding="utf-8"))
    for dockerfile, context in (("submitter.Dockerfile", values["nightly"]["podSecurityContext"]),
                                ("training.Dockerfile", values["training"]["podSecurityContext"]),
                                ("predictor.Dockerfile", values["serving"]["kserve"]["podSecurityContext"]),
                                ("torchserve.Dockerfile", values["serving"]["podSecurityContext"])):
        user = [arg for kw, arg in final_stage(instructions(DOCKER / dockerfile)) if kw == "USER"][-1]
        uid, _, gid = user.partition(":")
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid)), dockerfile
    # Our own serving images (the stock pytorch/torchserve runs Python 3.9 and torch 2.4, untested here).
    assert values["serving"]["image"]["repository"] == "returns-classifier/torchserve"
    assert re.fullmatch(r"\d+\.\d+\.\d+-(gpu|cpu)", values["serving"]["image"]["tag"])
    assert values["serving"]["kserve"]["image"]["repository"] == "returns-classifier/predictor"
