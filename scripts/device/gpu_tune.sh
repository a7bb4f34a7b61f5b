#!/usr/bin/env bash
# Second issue-4 device check: where the SFD XL/1 step's time goes (profiler breakdown by kernel class)
# and what inductor's tuning options gain (coordinate-descent tuning; GEMM autotuning with fused
# epilogues). Same set-up and outputs as gpu_check.sh.
source "$(dirname "$0")/common.sh"
common="backbones=lightningdit-xl-1 batch=128 precision=bf16 compile=blocks steps=20 warmup=5"
speed profile 70 $common methods=sfd profile=1
speed cd 80 $common methods=sfd tune=cd
speed autotune 95 $common methods=sfd tune=autotune
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done
cat "$OUT"/profile/profile_*.txt
