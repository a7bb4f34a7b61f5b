#!/usr/bin/env bash
# Issue-4 device run for the next session with a GPU (≤ 9½ min; not run yet in this form). Every row is
# SFD (or sit) on LightningDiT-XL/1, batch 128, compile=regions, steps timed back to back as in training
# (timing=stream), no sampling column; short and essential stages first, rows written as they finish:
#   1. the suite's Triton kernels on the card (tests/test_fused_{qk,swiglu,adaln}.py) and the
#      compiled model with them against eager fp32 (tests/test_speed_numerics.py -k triton); if these
#      fail, the kernels=triton rows below mean nothing;
#   2. A/B/C on one machine, bf16: attn_layout bhsd (the default), bshd (no layout copies),
#      and backbone kernels=triton (q/k norm + RoPE, SwiGLU's SiLU·gate, adaLN residual + norm +
#      modulation as Triton kernels);
#   3. the best candidate configuration for both methods: kernels=triton + bf16-residual, SFD and sit;
#   4. the profiler breakdown of that configuration (what is left);
#   5. with the time left, bytes moved and achieved bandwidth of every inductor kernel of one step
#      (TORCHINDUCTOR_PROFILE: each launch is benchmarked on its own, so it is slow and last).
# Inductor's coordinate-descent tuning (`tune=cd`) is left out: it did not finish compiling the XL/1 step
# within 80 s (H100) or 120 s (H200). Same set-up and outputs as gpu_check.sh.
source "$(dirname "$0")/common.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"
stamp "suite Triton kernels on the GPU"
SEMPRIOR_TEST_DEVICE=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_fused_qk.py \
  tests/test_fused_swiglu.py tests/test_fused_adaln.py tests/test_speed_numerics.py -k "kernels or triton" 2>&1 | tee -a "$LOG" | tail -3
common="backbones=lightningdit-xl-1 batch=128 compile=regions steps=10 warmup=3 sample=0"
speed layout 160 $common methods=sfd precision=bf16 layout=bhsd,bshd
speed kernels 90 $common methods=sfd precision=bf16 kernels=triton
speed residual 110 $common methods=sfd,sit precision=bf16-residual kernels=triton
speed profile 80 $common methods=sfd precision=bf16-residual kernels=triton profile=1 steps=5
left=$(( 580 - ($(date +%s) - t0) ))
if [ "$left" -gt 40 ]; then
  mkdir -p "$OUT/bandwidth"
  TORCHINDUCTOR_PROFILE=1 TORCHINDUCTOR_PROFILE_OUTPUT="$OUT/bandwidth/kernels.txt" \
    speed bandwidth "$left" $common methods=sfd precision=bf16-residual kernels=triton steps=1 warmup=0
fi
stamp "done"
for f in "$OUT"/*/speed.md; do echo "$f"; cat "$f"; rm -f "$f"; done
cat "$OUT"/profile/profile_*.txt 2>/dev/null
