# syntax=docker/dockerfile:1
# The optional training Job: `python -m training.train` then `python -m training.archive`
# (see the chart's training.* values). PyTorch comes from the pinned wheels in requirements.txt
# (they bundle the CUDA runtime; the node provides the driver), Fashion-MNIST from Debian.
#
#   docker build -f docker/training.Dockerfile -t registry.example.com/returns-classifier/training:1.0.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE}
# Fashion-MNIST as IDX files under /usr/share/datasets/fashion-mnist (training's default data);
# g++ lets torch.compile build the training step's kernels (without it training runs eager, slower).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.txt pyproject.toml README.md ./
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        -r requirements.txt
COPY returns_model/ returns_model/
COPY returns_submit/ returns_submit/
COPY returns_feedback/ returns_feedback/
COPY training/ training/
COPY handler/ handler/
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --no-deps .
# training/ and handler/ are source-tree packages (see pyproject.toml): the console scripts find them here.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/src \
    HOME=/tmp
RUN groupadd --system --gid 10001 returns \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin returns
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["returns-train"]
