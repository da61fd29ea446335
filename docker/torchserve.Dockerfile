# syntax=docker/dockerfile:1
# The TorchServe serving image of torchserve mode (serving.image), built on the versions the test
# suite runs: Python 3.11, torch and TorchServe 0.12.0 pinned in requirements.txt, Java 17. The
# stock pytorch/torchserve:0.12.0 images run Python 3.9 and torch 2.4, which the suite never runs.
# The layout matches the stock image, so the chart is the same for both: user model-server
# (uid 1000), /home/model-server/{tmp,work} (emptyDirs in the chart), torchserve on the PATH.
#
#   docker build -f docker/torchserve.Dockerfile -t registry.example.com/returns-classifier/torchserve:1.0.0-gpu .
#   # CPU clusters: torch's CPU wheels
#   docker build -f docker/torchserve.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       -t registry.example.com/returns-classifier/torchserve:1.0.0-cpu .
#
# The base is pinned by digest; see docker/predictor.Dockerfile for where it comes from.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm@sha256:081075da77b2b55c23c088251026fb69a7b2bf92471e491ff5fd75c192fd38e5

FROM ${PYTHON_IMAGE}
# GPU by default: torch's PyPI wheels bundle the CUDA runtime (the node provides the driver).
ARG TORCH_INDEX_URL=https://pypi.org/simple
# TorchServe's frontend is Java: the headless JRE 17 that `make setup` also installs.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.txt ./
# torch at the version requirements.txt pins, from TORCH_INDEX_URL (2.14.1 also matches 2.14.1+cpu).
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --index-url "${TORCH_INDEX_URL}" "$(grep -E '^torch==' requirements.txt)"
# TorchServe and what the handler inside the .mar imports (the .mar ships handler/ and
# returns_model/ themselves; onnxruntime runs its model.onnx, openvino its int8 graph), all at requirements.txt's pins; no per-model pip installs at run time.
RUN python -m pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --constraint requirements.txt torchserve PyYAML pillow numpy psutil onnxruntime openvino \
    && python -c "import ts, torch; print('torchserve', ts.__version__, 'torch', torch.__version__)"
RUN groupadd --system --gid 1000 model-server \
    && useradd --system --uid 1000 --gid 1000 --home-dir /home/model-server --create-home \
        --shell /usr/sbin/nologin model-server \
    && install -d -o 1000 -g 1000 /home/model-server/tmp /home/model-server/work \
    && rm -rf /src
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TEMP=/home/model-server/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch
USER 1000:1000
WORKDIR /home/model-server/work
EXPOSE 8080 8082
ENTRYPOINT ["torchserve"]
# The chart passes its own arguments; these serve a model store mounted at /mnt/models.
CMD ["--start", "--foreground", "--ncs", "--disable-token-auth", "--model-store", "/mnt/models/model-store"]
