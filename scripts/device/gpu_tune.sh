#!/usr/bin/env bash
# Issue-4 device run for the next session with a GPU (≤ 9½ min, not run yet in this form; stage limits
# 150 + 230 + 70 + 70 s, then what is left of 570 s). Every row is LightningDiT-XL/1, batch 128,
# compile=regions, steps timed back to back as in training (timing=stream), no sampling column; short and
# essential stages first, rows written as they finish (a configuration that fails gets a row with its
# error and the others still run):
#   1. on the card (each kernel with its first tuning candidate, SEMPRIOR_TRITON_TUNE=0: one compile per
#      specialisation, not one per candidate): the suite's Triton kernels
#      (tests/test_fused_{qk,swiglu,adaln}.py), the compiled model
#      with them against eager fp32 (tests/test_speed_numerics.py -k triton), and train.cuda_graph's real
#      capture against the eager step (tests/test_graphs.py); if these fail, the matching rows mean nothing;
#   2. SFD, bf16-residual: kernels torch/triton × cuda_graph off/on, on one machine (the first row is the
#      session-3 configuration, 494-498 img/s on an H200, so it ties this machine to the committed table);
#   3. the flow baseline (sit) and the default precision (bf16) with kernels=triton and the graph;
#   4. the profiler breakdown of the best candidate (what is left);
#   5. with the time left: attn_layout=bshd against bhsd (kernels=torch, bf16), then bytes moved and
#      achieved bandwidth of every inductor kernel of one step (TORCHINDUCTOR_PROFILE; slow, so last).
# Inductor's coordinate-descent tuning (`tune=cd`) is left out: it did not finish compiling the XL/1 step
# within 80 s (H100) or 120 s (H200). Same set-up and outputs as gpu_check.sh.
source "$(dirname "$0")/common.sh"
card | tee "$OUT/gpu.txt"
stamp "suite Triton kernels and the CUDA graph step on the GPU"
SEMPRIOR_TEST_DEVICE=cuda SEMPRIOR_TRITON_TUNE=0 timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/test_fused_qk.py tests/test_fused_swiglu.py tests/test_fused_adaln.py tests/test_graphs.py \
  tests/test_speed_numerics.py -k "kernels or triton or graph" 2>&1 | tee -a "$LOG" | tail -4
common="backbones=lightningdit-xl-1 batch=128 compile=regions steps=10 warmup=3 sample=0"
speed sfd 230 $common methods=sfd precision=bf16-residual kernels=torch,triton graph=0,1
speed sit 70 $common methods=sit precision=bf16-residual kernels=triton graph=1
speed bf16 70 $common methods=sfd precision=bf16 kernels=triton graph=1
left() { echo $(( 570 - ($(date +%s) - t0) )); }
[ "$(left)" -gt 75 ] && speed profile 75 $common methods=sfd precision=bf16-residual kernels=triton graph=1 \
  profile=1 steps=5
[ "$(left)" -gt 90 ] && speed layout 85 $common methods=sfd precision=bf16 layout=bhsd,bshd
left=$(left)
if [ "$left" -gt 40 ]; then
  mkdir -p "$OUT/bandwidth"
  TORCHINDUCTOR_PROFILE=1 TORCHINDUCTOR_PROFILE_OUTPUT="$OUT/bandwidth/kernels.txt" \
    speed bandwidth "$left" $common methods=sfd precision=bf16-residual kernels=triton steps=1 warmup=0
fi
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done
cat "$OUT"/profile/profile_*.txt 2>/dev/null
