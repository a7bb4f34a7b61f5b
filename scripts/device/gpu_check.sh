#!/usr/bin/env bash
# The issue-4 device check, one prepared script (≤ 8 min of device time including every compilation),
# short cases first, rows written as they finish:
#   1. SFD LightningDiT-XL/1, batch 128: the old default (bf16, per-block compile) against the new one
#      (compile=regions: + final layer and loss), then the bf16 residual stream and the FlashAttention-2
#      kernel, for SFD and the flow baseline (sit);
#   2. the numerics test on the GPU (compiled / bf16 / bf16-residual against eager fp32);
#   3. a profiler breakdown of the fastest configuration, and inductor's coordinate-descent tuning of it;
#   4. LightningDiT-B/1 rows.
# Run on the lent GPU machine from the repository root, with the missing pure-Python wheels in .whl/
# (docs/performance.md says which); writes gpu.txt, log.txt and <stage>/speed.csv under $OUT
# (default results/device), so a stage cut by its timeout keeps what it measured.
source "$(dirname "$0")/common.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
xl="backbones=lightningdit-xl-1 batch=128 steps=15 warmup=5"
best="precision=bf16-residual compile=regions sdpa=flash"
speed compile 100 $xl methods=sfd precision=bf16 compile=blocks,regions
speed options 160 $xl methods=sfd,sit precision=bf16-residual compile=regions sdpa=auto,flash
speed flow 45 $xl methods=sit precision=bf16 compile=regions
stamp "numerics on the GPU"
SEMPRIOR_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_speed_numerics.py 2>&1 \
  | tee -a "$LOG" | tail -5
speed profile 50 $xl methods=sfd $best profile=1 steps=5 warmup=3
speed cd 120 $xl methods=sfd $best tune=cd
speed b1 60 backbones=lightningdit-b-1 batch=128 steps=15 warmup=5 methods=sfd,sit $best
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done   # the CSVs come back
cat "$OUT"/profile/profile_*.txt 2>/dev/null | head -40
