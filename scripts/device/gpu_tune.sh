#!/usr/bin/env bash
# Second issue-4 device check: where the SFD XL/1 step's time goes (profiler breakdown by kernel class)
# and what inductor's tuning options gain (coordinate-descent tuning; GEMM autotuning with fused
# epilogues). Same set-up and outputs as gpu_check.sh.
set -uo pipefail
OUT=${OUT:-results/device}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)" | tee -a "$LOG"; }
speed() {  # stage timeout args...
  local stage=$1 limit=$2; shift 2
  stamp "speed $stage: $*"
  timeout "$limit" python3 -m benchmarks.speed "$@" out="$OUT/$stage" 2>&1 | tee -a "$LOG" | grep -v "^|"
}
common="backbones=lightningdit-xl-1 batch=128 precision=bf16 compile=blocks steps=20 warmup=5"
speed profile 70 $common methods=sfd profile=1
speed cd 80 $common methods=sfd tune=cd
speed autotune 95 $common methods=sfd tune=autotune
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done
cat "$OUT"/profile/profile_*.txt
