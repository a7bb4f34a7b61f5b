#!/usr/bin/env bash
# Issue-4 device exploration for the next session with a GPU (≤ 9 min; not run yet in this form):
#   1. the attention layout (backbone attn_layout bhsd vs bshd: q/k norm and RoPE without layout copies),
#      SFD XL/1, bf16, compile=regions, training step timed back to back as in training (timing=stream);
#   2. the same bhsd row with a host sync after every step (timing=sync, how sessions 2-3 measured);
#   3. profiler breakdowns (bshd, bf16 and bf16-residual);
#   4. bytes moved and achieved bandwidth of every fused kernel of one step (inductor's
#      TORCHINDUCTOR_PROFILE: each launch is benchmarked on its own, so this stage is slow and last).
# Inductor's coordinate-descent tuning (`tune=cd`) is left out: it did not finish compiling the XL/1 step
# within 80 s (H100) or 120 s (H200); give it ≥ 200 s of its own if it is tried again.
# Same set-up and outputs as gpu_check.sh.
source "$(dirname "$0")/common.sh"
common="backbones=lightningdit-xl-1 batch=128 methods=sfd compile=regions steps=10 warmup=3 sample=0"
speed layout 200 $common precision=bf16 layout=bhsd,bshd
speed sync 60 $common precision=bf16 layout=bhsd timing=sync
speed profile 120 $common precision=bf16,bf16-residual layout=bshd profile=1
mkdir -p "$OUT/bandwidth"
TORCHINDUCTOR_PROFILE=1 TORCHINDUCTOR_PROFILE_OUTPUT="$OUT/bandwidth/kernels.txt" \
  speed bandwidth 150 $common precision=bf16 layout=bshd steps=1 warmup=0
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done
cat "$OUT"/profile/profile_*.txt
