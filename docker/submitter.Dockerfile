# syntax=docker/dockerfile:1
# The nightly batch submitter (`returns-submit`), also used by the chart's verify-archive
# initContainer (`python -m returns_model.manifest`) and its `helm test` pod.
# Small on purpose: no torch, no CUDA; the submitter needs only requests and kubernetes.
#
#   docker build -f docker/submitter.Dockerfile -t registry.example.com/returns-classifier/submitter:1.0.0 .
#
# Build context: the repository root (docker/submitter.Dockerfile.dockerignore keeps it small).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY requirements.txt pyproject.toml README.md ./
COPY returns_model/ returns_model/
COPY returns_submit/ returns_submit/
COPY returns_feedback/ returns_feedback/
# requirements.txt is a constraints file here: it pins the versions of what gets installed
# (requests, kubernetes and their dependencies) without pulling in torch.
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --prefix=/install --constraint requirements.txt ".[k8s]"

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
RUN groupadd --system --gid 10001 returns \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin returns
# Numeric, so that Kubernetes can enforce runAsNonRoot; the chart runs it with a read-only root.
USER 10001:10001
WORKDIR /tmp
# Configured through RETURNS_* environment variables (see docs/interfaces.md); flags may follow.
ENTRYPOINT ["returns-submit"]
