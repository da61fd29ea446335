#!/usr/bin/env bash
# Installs what the project needs: Java 17, Fashion-MNIST, g++ and qemu-user (Debian packages, as root),
# then .venv with the pinned Python dependencies and the project itself (editable).
# Idempotent: a stamp keyed by the dependency files makes a second run quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STAMP=.venv/.setup-done
want=$(cat requirements.txt requirements-kserve.txt requirements-moto.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

need_apt=()
if ! java -version 2>&1 | grep -q 'version "17'; then need_apt+=(openjdk-17-jre-headless); fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then need_apt+=(dataset-fashion-mnist); fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${need_apt[*]} with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing ${need_apt[*]}. Install them first, e.g.: sudo apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
fi
# Optional: torch.compile needs a C++ compiler for the faster training step (eager without it).
if ! command -v g++ >/dev/null && ! command -v c++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing g++ with apt-get (for torch.compile in training)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
  else
    echo "setup: note: no g++; training will run in eager mode (slower). sudo apt-get install g++ fixes that" >&2
  fi
fi

# Test-only: QEMU's user-mode emulator, with which tests/test_int8_portable.py starts the server on an
# emulated AVX2-only CPU (the test skips, saying why, without it).
if ! command -v qemu-x86_64 >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing qemu-user with apt-get (for the int8 portability test)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
  else
    echo "setup: note: no qemu-x86_64; tests/test_int8_portable.py will skip. sudo apt-get install qemu-user fixes that" >&2
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
# kserve without its declared dependencies: requirements.txt pins them and explains the two it overrides.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-kserve.txt
# Test-only S3 server; --no-deps because botocore and kubernetes disagree on python-dateutil (see the file).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r requirements-moto.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
# training/, handler/ and scripts/ are source-tree packages (see pyproject.toml): put the checkout
# on the venv's path so that their console scripts (returns-train, returns-archive, ...) work anywhere.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pwd > "$site/returns-classifier-source-tree.pth"
echo "$want" > "$STAMP"
echo "setup: done ($(.venv/bin/python -c 'import torch, ts; print("torch", torch.__version__, "torchserve", ts.__version__)'))"
