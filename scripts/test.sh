#!/usr/bin/env bash
# README command 2: set everything up (venv, package, data, a single-node SLURM) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
if [ -x scripts/slurm/start.sh ] && [ "${SEMPRIOR_NO_SLURM:-0}" != 1 ]; then
  if bash scripts/slurm/start.sh; then
    trap 'bash scripts/slurm/stop.sh >/dev/null 2>&1 || true' EXIT
  else
    echo "test: SLURM could not be started; the slurm-marked tests will skip" >&2
  fi
fi
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
