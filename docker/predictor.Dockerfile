# syntax=docker/dockerfile:1
# The KServe predictor (`returns-kserve`): KServe's Python ModelServer over the same core as the
# TorchServe handler. The chart runs it as the InferenceService's container
# (serving.mode=kserve, serving.kserve.runtime=predictor) with a read-only root filesystem.
#
#   docker build -f docker/predictor.Dockerfile -t registry.example.com/returns-classifier/predictor:1.0.0 .
#   # GPU nodes: torch's own PyPI wheels bundle the CUDA runtime (the node provides the driver)
#   docker build -f docker/predictor.Dockerfile --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
#       -t registry.example.com/returns-classifier/predictor:1.0.0-gpu .
#
# Build context: the repository root (docker/predictor.Dockerfile.dockerignore keeps it small).
# The base is pinned by digest (a tag can be re-pushed): the multi-arch index digest of
# python:3.11.11-slim-bookworm as pinned in public Dockerfiles; confirm it with
# `docker buildx imagetools inspect python:3.11.11-slim-bookworm` before a release.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

FROM ${PYTHON_IMAGE}
# CPU wheels by default: a third of the size of the CUDA ones, and what the CPU benchmark measures.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY requirements.txt requirements-kserve.txt pyproject.toml README.md ./
# torch at the version requirements.txt pins, from TORCH_INDEX_URL (2.14.1 matches 2.14.1+cpu).
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --index-url "${TORCH_INDEX_URL}" "$(grep -E '^torch==' requirements.txt)"
# What the predictor imports, at requirements.txt's pins: the model contract's pillow, numpy and
# PyYAML, and kserve's dependencies (the block of requirements.txt that starts at "# The KServe
# predictor"). No torchserve, training or test packages.
RUN sed -n '/^# The KServe predictor/,$p' requirements.txt | grep -v '^#' > /tmp/kserve-deps.txt \
    && python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --constraint requirements.txt -r /tmp/kserve-deps.txt pillow numpy PyYAML requests onnxruntime openvino \
    && rm /tmp/kserve-deps.txt
# kserve itself with --no-deps, as scripts/setup.sh does (requirements.txt says why).
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-deps -r requirements-kserve.txt
COPY returns_model/ returns_model/
COPY returns_submit/ returns_submit/
COPY returns_feedback/ returns_feedback/
COPY handler/ handler/
# The distribution (returns_model, returns_submit, returns_feedback) and the console scripts, returns-kserve among them.
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-deps . \
    && python -c "import handler.kserve_predictor" \
    && rm -rf /src/build /src/*.egg-info
# handler/ is a source-tree package (see pyproject.toml): PYTHONPATH lets returns-kserve find it.
# HOME and the caches point into /tmp, the only writable path under a read-only root filesystem;
# no bytecode is written at run time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/src \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch
RUN groupadd --system --gid 10001 returns \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin returns
# Numeric, so that Kubernetes can enforce runAsNonRoot.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081 8082
# KServe's ModelServer flags follow, e.g. --model_dir /mnt/models --http_port 8080 --grpc_port 8081.
ENTRYPOINT ["returns-kserve"]
