#!/usr/bin/env bash
# The issue-4 device check, one prepared script (≈ 8 min of device time including every compilation),
# short and essential cases first, rows written as they finish:
#   1. the speed table with the defaults (bf16 autocast, compile=regions, torch's attention kernel):
#      LightningDiT-XL/1 × SFD and the flow baseline (sit), batch 128, with the sampling forward;
#   2. the same two with the bf16 residual stream (train.precision=bf16-residual), training step only;
#   3. the numerics test on the GPU (compiled / bf16 / bf16-residual against eager fp32);
#   4. LightningDiT-B/1 × SFD and sit with the defaults.
# Stage limits come from session 3 on an H200: a fresh machine needs ≈ 100 s for the first XL row
# (ceiling, FLOP count, 25-35 s of compilation, fp32 sampling graph) and ≈ 40-60 s for each further row.
# Run on the lent GPU machine from the repository root, with the missing pure-Python wheels in .whl/
# (docs/performance.md says which); writes gpu.txt, log.txt and <stage>/speed.csv under $OUT
# (default results/device), so a stage cut by its limit keeps the rows it finished.
# The profiler breakdown and inductor's tuning options are in gpu_tune.sh, the attention kernels in
# gpu_attention.sh.
source "$(dirname "$0")/common.sh"
card | tee "$OUT/gpu.txt"
xl="backbones=lightningdit-xl-1 batch=128 methods=sfd,sit compile=auto sdpa=auto"
speed main 200 $xl precision=bf16 steps=15 warmup=5
speed residual 110 $xl precision=bf16-residual steps=15 warmup=5 sample=0
stamp "numerics on the GPU"
SEMPRIOR_TEST_DEVICE=cuda SEMPRIOR_TRITON_TUNE=0 timeout 100 python3 -m pytest -q -p no:cacheprovider \
  tests/test_speed_numerics.py tests/test_fused_qk.py tests/test_fused_swiglu.py tests/test_fused_adaln.py 2>&1 \
  | tee -a "$LOG" | tail -3
speed b1 90 backbones=lightningdit-b-1 batch=128 methods=sfd,sit precision=bf16 steps=15 warmup=5
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done   # the CSVs come back
