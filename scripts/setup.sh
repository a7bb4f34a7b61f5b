#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: the Fashion-MNIST package, a virtual environment in .venv,
# and this package (editable) with its dependencies and the `dev` extra (pytest, pytest-timeout: the test
# command needs them). A second run takes about a second. What it does and why: docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# 1. Data: Debian's dataset-fashion-mnist puts the IDX files under /usr/share/datasets/fashion-mnist.
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${SEMPRIOR_DATA:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing dataset-fashion-mnist (Debian)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST not found and cannot apt-get it; put the IDX files in \$SEMPRIOR_DATA/fashion-mnist" >&2
  fi
fi

# 2. Virtual environment and the package. The stamp holds a hash of pyproject.toml and of the extras
#    installed: a change to either reinstalls.
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.semprior-installed
extras=dev
want=$({ cat pyproject.toml; echo "extras=$extras"; } | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the package and its dependencies into .venv (first time: about 2 minutes)"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # pyproject.toml caps torch/torchvision at the builds that lie on this disk, so pip does not download them.
  .venv/bin/python -m pip install -q -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, torchvision, timm, diffusers, torch_fidelity, submitit, pytest, pytest_timeout" \
    || { echo "setup: the install did not complete (see pip's output above)" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
