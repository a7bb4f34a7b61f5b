#!/usr/bin/env bash
# The issue-4 device check, one prepared script (≤ 8 min of device time including compilation):
#   1. the speed table: LightningDiT-XL/1 and B/1 × SFD and flow (sit), batch 128, bf16, per-block compile;
#      REPA on XL/1; SFD XL/1 eager for the compile gain;
#   2. the numerics test on the GPU (compiled bf16 and eager fp32 give the same loss to bf16 tolerance).
# Run on the lent GPU machine from the repository root, with the missing pure-Python wheels in .whl/
# (see docs/performance.md for how to fetch them); writes under $OUT (default results/device).
set -uo pipefail
OUT=${OUT:-results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"

stamp "speed: XL/1 and B/1 x SFD, flow"
timeout 330 python3 -m benchmarks.speed backbones=lightningdit-xl-1,lightningdit-b-1 methods=sfd,sit batch=128 \
  precision=bf16 compile=auto steps=30 warmup=10 out="$OUT/speed" 2>&1 | tee "$OUT/speed.log" | grep -v "^|"
stamp "speed: XL/1 REPA; XL/1 SFD eager"
timeout 90 python3 -m benchmarks.speed backbones=lightningdit-xl-1 methods=repa batch=128 precision=bf16 \
  compile=auto steps=20 warmup=5 out="$OUT/speed_repa" 2>&1 | tee "$OUT/speed_repa.log" | grep -v "^|"
timeout 60 python3 -m benchmarks.speed backbones=lightningdit-xl-1 methods=sfd batch=128 precision=bf16 \
  compile=off steps=10 warmup=3 out="$OUT/speed_eager" 2>&1 | tee "$OUT/speed_eager.log" | grep -v "^|"
stamp "numerics on the GPU"
SEMPRIOR_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_speed_numerics.py 2>&1 \
  | tee "$OUT/numerics.log" | tail -5
stamp "done"
for f in "$OUT"/speed*/speed.md; do echo "$f"; cat "$f"; done
