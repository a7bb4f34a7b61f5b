"""LightningDiT presets (https://arxiv.org/abs/2501.01423): the DiT class with RMSNorm, SwiGLU and 2-D RoPE.

Same class as backbones/dit.py, configured by flags (docs/methods.md §5.3). qk-norm is off, as in LightningDiT's configs;
SFD (https://arxiv.org/abs/2512.04926) turns it on with a `qk_norm: true` backbone override (docs/methods.md §6.7).
"""
from __future__ import annotations

from backbones.dit import DIT_SIZES, register_family

# "1p0b" is SFD's "XXL" (≈1.03 B parameters, docs/methods.md §7).
LIGHTNINGDIT_SIZES: dict[str, tuple[int, int, int]] = {**DIT_SIZES, "1p0b": (24, 1536, 24)}

register_family("lightningdit", LIGHTNINGDIT_SIZES, {"norm": "rmsnorm", "ffn": "swiglu", "rope": True})
