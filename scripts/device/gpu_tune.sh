#!/usr/bin/env bash
# Issue-4 device check of where the SFD XL/1 step's time goes (profiler breakdown by kernel class, with the
# defaults and with the bf16 residual stream) and what inductor's tuning options gain (coordinate-descent
# tuning of the fused kernels; GEMM autotuning with fused epilogues: minutes of compilation each).
# Same set-up and outputs as gpu_check.sh.
source "$(dirname "$0")/common.sh"
common="backbones=lightningdit-xl-1 batch=128 methods=sfd compile=regions steps=10 warmup=3 sample=0"
speed profile 150 $common precision=bf16,bf16-residual profile=1
speed cd 200 $common precision=bf16 tune=cd
speed autotune 200 $common precision=bf16 tune=autotune
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done
cat "$OUT"/profile/profile_*.txt
