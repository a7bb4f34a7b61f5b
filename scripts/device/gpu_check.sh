#!/usr/bin/env bash
# The issue-4 device check, one prepared script (≤ 8 min of device time including compilation):
#   1. the speed table: LightningDiT-XL/1 and B/1 × SFD and flow (sit), batch 128, bf16, per-block compile;
#   2. the numerics test on the GPU (compiled bf16 and eager fp32 give the same loss to bf16 tolerance);
#   3. REPA on XL/1, and SFD XL/1 eager (what the per-block compile gains).
# Run on the lent GPU machine from the repository root, with the missing pure-Python wheels in .whl/
# (docs/performance.md says which); writes gpu.txt, log.txt and <stage>/speed.csv under $OUT
# (default results/device), rows as they finish, so a stage cut by its timeout keeps what it measured.
source "$(dirname "$0")/common.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
speed main 300 backbones=lightningdit-xl-1,lightningdit-b-1 methods=sfd,sit batch=128 precision=bf16 compile=auto \
  steps=30 warmup=10
stamp "numerics on the GPU"
SEMPRIOR_TEST_DEVICE=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_speed_numerics.py 2>&1 \
  | tee -a "$LOG" | tail -5
speed repa 75 backbones=lightningdit-xl-1 methods=repa batch=128 precision=bf16 compile=auto steps=20 warmup=5
speed eager 50 backbones=lightningdit-xl-1 methods=sfd batch=128 precision=bf16 compile=off steps=10 warmup=3
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done   # the CSVs come back; 8 files at most
