#!/usr/bin/env bash
# README command 1: set everything up and run the main job on the default (CPU, Fashion-MNIST) profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m benchmarks.run grid=sfd_vs_redi "$@"
