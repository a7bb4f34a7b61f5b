#!/usr/bin/env bash
# Second issue-4 device check of session 3 (≈ 2 min 15 s of device time): SFD LightningDiT-XL/1 at batch 128
# with the new default (bf16, compile=regions) against FlashAttention-2 (train.sdpa=flash), and flash with
# the bf16 residual stream. Training step only (sample=0). Same set-up and outputs as gpu_check.sh.
source "$(dirname "$0")/common.sh"
c="backbones=lightningdit-xl-1 batch=128 steps=10 warmup=3 sample=0 methods=sfd compile=regions"
speed attn 122 $c precision=bf16 sdpa=auto,flash
speed res 70 $c precision=bf16-residual sdpa=flash
stamp done
cat "$OUT"/*/speed.md | cut -c1-210
