"""Building blocks shared by the DiT and LightningDiT backbones (norms, FFNs, positions, attention, embedders).

DiT: https://arxiv.org/abs/2212.09748 (adaLN-Zero, sin-cos positions, timestep/label embedders).
LightningDiT: https://arxiv.org/abs/2501.01423 (RMSNorm, SwiGLU, 2-D RoPE from EVA-02 https://arxiv.org/abs/2303.11331).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.fused_qk import apply_rope, qk_norm_rope, rms_norm
from backbones.fused_swiglu import silu_mul

# backbone.kernels: "torch" = the module math (compiled by inductor on a GPU); "triton" = the suite's own
# Triton kernels for q/k RMSNorm + RoPE (fused_qk.py), SwiGLU's SiLU·gate (fused_swiglu.py) and, in
# RMSNorm blocks, adaLN's gated residual + norm + modulation (fused_adaln.py, used by dit.DiTBlock), with
# the module math wherever Triton cannot run. Same model, same state dict (docs/performance.md).
KERNELS = ("torch", "triton")


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"unknown backbone kernels {kernels!r}; valid: {', '.join(KERNELS)}")
    return kernels


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x·(1 + scale) + shift; x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                                  Norms                                        #
#################################################################################

class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in fp32 so bf16 activations do not lose the mean square."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Cast back to the input dtype so the output dtype never depends on the weight's dtype.
        return rms_norm(x, self.weight, self.eps)


def make_norm(kind: str, dim: int) -> nn.Module:
    """"layernorm": DiT's affine-free LayerNorm (adaLN supplies scale/shift); "rmsnorm": LightningDiT's."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")


#################################################################################
#                               Feed-forward                                    #
#################################################################################

class GeluMlp(nn.Module):
    """DiT's MLP: Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """LightningDiT's FFN: fused w12 (gate and value), SiLU(gate)·value, then w3.

    hidden = int(2/3 · 4D) keeps the FFN at ≈ 8D² parameters, like the 4D GELU MLP it replaces.
    """

    def __init__(self, dim: int, ratio: float = 4.0, kernels: str = "torch") -> None:
        super().__init__()
        hidden = int(2 / 3 * int(dim * ratio))
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.kernels = check_kernels(kernels)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernels == "triton":  # the w12 bias is added (and its gradient summed) in the kernels
            return self.w3(silu_mul(F.linear(x, self.w12.weight), self.w12.bias))
        u = self.w12(x)  # (N, T, 2·hidden): [gate | value]
        gate, value = u.chunk(2, dim=-1)  # 2 x (N, T, hidden)
        return self.w3(F.silu(gate) * value)


def make_ffn(kind: str, dim: int, kernels: str = "torch") -> nn.Module:
    """"gelu" (DiT's MLP; `kernels` does not apply to it) or "swiglu"."""
    if kind == "gelu":
        return GeluMlp(dim)
    if kind == "swiglu":
        return SwiGLU(dim, kernels=kernels)
    raise ValueError(f"unknown ffn {kind!r}; valid: gelu, swiglu")


#################################################################################
#                                 Positions                                     #
#################################################################################

def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(L,) positions -> (L, dim) features [sin, cos] with frequencies 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    angles = pos.double()[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sin-cos embedding (1, grid², dim): first half encodes the column, second half the row.

    Tokens are row-major (token r·grid + c), matching Conv2d patchify followed by flatten.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden size divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64, device=device)
    rows = coords.repeat_interleave(grid)  # (T,)
    cols = coords.repeat(grid)  # (T,)
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (T, dim)
    return emb.float().unsqueeze(0)  # (1, T, dim)


#################################################################################
#              One extra token packed into trailing latent channels              #
#################################################################################
# REG (docs/methods.md §14) diffuses the encoder's class token (N, E) jointly with the latent. The suite's
# state is one (N, C, H, W) tensor, so the token rides in k = ceil(E / (H·W)) extra channels, row-major,
# zero-padded at the end; the backbone reads only the first E elements and writes 0 to the padding.

def token_channels(dim: int, size: int) -> int:
    """Channels needed to pack a dim-E vector on a size×size grid: ceil(E / size²)."""
    if dim < 1 or size < 1:
        raise ValueError(f"token packing needs dim ≥ 1 and size ≥ 1, got dim={dim}, size={size}")
    return -(-dim // (size * size))


def pack_token(v: Tensor, size: int) -> Tensor:
    """(N, E) -> (N, k, size, size), k = token_channels(E, size); elements E.. are zero padding."""
    n, dim = v.shape
    k = token_channels(dim, size)
    return F.pad(v, (0, k * size * size - dim)).reshape(n, k, size, size)


def unpack_token(x: Tensor, dim: int) -> Tensor:
    """(N, k, H, W) packed channels -> (N, E): the first E elements, row-major; the padding is ignored."""
    if x.shape[1:].numel() < dim:
        raise ValueError(f"{x.shape[1]} packed channels of {x.shape[2]}×{x.shape[3]} hold fewer than {dim} elements")
    return x.flatten(1)[:, :dim]


class RoPE2D(nn.Module):
    """EVA-02-style 2-D axial rotary embedding on a grid×grid token grid, applied to q and k.

    The first head_dim/2 channels rotate with the token's row, the last head_dim/2 with its column; each
    axis uses frequencies theta^(-2i/(head_dim/2)). Rotations compose, so q·k depends only on the offset.
    `extra_tokens` leading tokens (e.g. REG's class token) get the identity rotation (cos 1, sin 0), the
    rotary counterpart of a zero row in a sin-cos position table.
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0, extra_tokens: int = 0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        axis_dim = head_dim // 2
        freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)  # (axis_dim/2,)
        coords = torch.arange(grid, dtype=torch.float64)
        rows = coords.repeat_interleave(grid)[:, None] * freqs  # (T, axis_dim/2)
        cols = coords.repeat(grid)[:, None] * freqs  # (T, axis_dim/2)
        # Each frequency drives one interleaved (even, odd) channel pair, hence repeat_interleave(2).
        angles = torch.cat([rows, cols], dim=1).repeat_interleave(2, dim=1)  # (T, head_dim)
        if extra_tokens:
            angles = torch.cat([angles.new_zeros(extra_tokens, head_dim), angles])  # (E + T, head_dim)
        # Non-persistent: derived from the config, so checkpoints need not carry them.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, token_dim: int = -2) -> Tensor:
        """x (N, H, T, head_dim) (token_dim=-2) or (N, T, H, head_dim) (token_dim=-3) -> same shape and dtype."""
        cos, sin = (self.cos, self.sin) if token_dim == -2 else (self.cos[:, None], self.sin[:, None])
        return apply_rope(x, cos, sin)  # in x's dtype: fp32 tables would otherwise promote bf16 q/k


#################################################################################
#                                 Attention                                     #
#################################################################################

ATTN_LAYOUTS = ("bhsd", "bshd")


class Attention(nn.Module):
    """Multi-head self-attention (qkv bias on) through SDPA, with optional qk-RMSNorm and 2-D RoPE.

    `layout` is where q and k are normalised and rotated, a speed choice with the same result:
    "bhsd" permutes the qkv projection to (N, H, T, hd) first (the reference codes' order); "bshd" works
    on (N, T, H, hd) slices of the projection itself and hands SDPA transposed views, so neither q, k, v
    nor the attention output are copied into another layout. kernels="triton" replaces both: the split, both
    norms and both rotations are one Triton kernel forward and one backward (fused_qk.py), and SDPA gets
    transposed views as in "bshd". docs/performance.md.
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool, rope: RoPE2D | None,
                 layout: str = "bhsd", kernels: str = "torch") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        if layout not in ATTN_LAYOUTS:
            raise ValueError(f"unknown attention layout {layout!r}; valid: {', '.join(ATTN_LAYOUTS)}")
        self.num_heads, self.layout, self.kernels = num_heads, layout, check_kernels(kernels)
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.rope = rope  # shared module (one table per model), or None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        shape = (n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, hd)
        if self.kernels == "triton":  # bias, split, norms and rotations in one kernel each way
            norm, rope = isinstance(self.q_norm, RMSNorm), self.rope
            q, k, v = qk_norm_rope(F.linear(x, self.qkv.weight).reshape(shape), self.qkv.bias,
                                   self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                                   rope.cos if rope else None, rope.sin if rope else None,
                                   self.q_norm.eps if norm else 0.0)  # 3 x (N, T, H, hd)
        else:
            qkv = self.qkv(x).reshape(shape)
            if self.layout == "bhsd":
                q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, hd)
            else:
                q, k, v = qkv.unbind(2)  # 3 x (N, T, H, hd)
            token_dim = -2 if self.layout == "bhsd" else -3
            # LightningDiT order: normalise q, k first, then rotate, so the norm sees unrotated features.
            q, k = self.q_norm(q), self.k_norm(k)
            if self.rope is not None:
                q, k = self.rope(q, token_dim), self.rope(k, token_dim)
        if self.kernels == "triton" or self.layout == "bshd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # views (N, H, T, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


#################################################################################
#                          Timestep and label embedders                          #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Scalar time -> 256-d sinusoidal features [cos, sin] -> MLP(256 -> width -> width) with SiLU."""

    def __init__(self, width: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """t (N,) float, embedded as given (no ×1000) -> (N, dim) fp32 features [cos, sin]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)  # (N, width)


class LabelEmbedder(nn.Module):
    """Class label -> vector; row `num_classes` is the null (unconditional) label used for CFG.

    In training mode each label is replaced by the null label with probability `dropout`, drawn from the
    global torch RNG so the run's seed controls it.
    """

    def __init__(self, num_classes: int, width: int, dropout: float) -> None:
        super().__init__()
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"class_dropout must be in [0, 1], got {dropout}")
        self.num_classes = num_classes
        self.dropout = dropout
        # Always num_classes + 1 rows, so an unconditional (null) pass exists even with dropout 0.
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: Tensor) -> Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout  # (N,) bool
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)  # (N, width)
