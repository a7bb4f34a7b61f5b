"""DiT: the one transformer backbone of the suite, with adaLN-Zero blocks (https://arxiv.org/abs/2212.09748).

Constructor flags switch the block to LightningDiT's (https://arxiv.org/abs/2501.01423; RMSNorm, SwiGLU,
2-D RoPE, qk-norm), so every method trains the same class; presets for the DiT family are at the bottom,
LightningDiT presets in lightningdit.py. Spec: docs/methods.md §0.2, §5.3, §6.4, §7.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from core.registry import BACKBONES
from core.types import BackboneOut
from backbones.fused_adaln import norm_modulate
from backbones.layers import (
    Attention,
    LabelEmbedder,
    RoPE2D,
    TimestepEmbedder,
    make_ffn,
    make_norm,
    modulate,
    pack_token,
    sincos_pos_embed_2d,
    token_channels,
    unpack_token,
)


#################################################################################
#                              Core DiT blocks                                  #
#################################################################################

class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by c, with gated residuals (adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, *, norm: str, ffn: str, qk_norm: bool, rope: RoPE2D | None,
                 attn_layout: str = "bhsd", kernels: str = "torch") -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, rope=rope, layout=attn_layout, kernels=kernels)
        self.norm2 = make_norm(norm, dim)
        self.mlp = make_ffn(ffn, dim, kernels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # kernels="triton" with RMSNorm: norm1 + modulation, and the attention residual + norm2 + modulation,
        # are Triton kernels (fused_adaln.py); LayerNorm blocks keep the module math.
        self.fused_norms = kernels == "triton" and norm == "rmsnorm"

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (N, T, D), c (N, D) -> (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.fused_norms:
            n1, n2 = self.norm1, self.norm2
            _, h = norm_modulate(x, None, None, n1.weight, shift_msa, scale_msa, n1.eps)
            x, h = norm_modulate(x, gate_msa, self.attn(h), n2.weight, shift_mlp, scale_mlp, n2.eps)
            return x + gate_mlp.unsqueeze(1) * self.mlp(h)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its p·p·C_out patch values.

    extra_token_dim E > 0 (REG): token 0 is an extra token; after the shared norm and modulation it goes
    through its own `linear_cls` Linear(D → E) and the patch tokens 1..T through `linear` (REG models/sit.py).
    """

    def __init__(self, dim: int, patch_size: int, out_channels: int, *, norm: str, extra_token_dim: int = 0) -> None:
        super().__init__()
        self.norm_final = make_norm(norm, dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear_cls = nn.Linear(dim, extra_token_dim) if extra_token_dim else None

    def forward(self, x: Tensor, c: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """x (N, T, D), c (N, D) -> (N, T, p·p·C_out); with an extra token x is (N, 1 + T, D) and the
        result is ((N, T, p·p·C_out), (N, E))."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        h = modulate(self.norm_final(x), shift, scale)
        if self.linear_cls is None:
            return self.linear(h)
        return self.linear(h[:, 1:]), self.linear_cls(h[:, 0])


def split_widths(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` widths as evenly as possible (earlier parts take the remainder)."""
    base, rest = divmod(total, parts)
    return [base + (1 if i < rest else 0) for i in range(parts)]


#################################################################################
#                                 The model                                     #
#################################################################################

class DiT(nn.Module):
    """Class-conditional latent transformer with K timestep embedders (one per channel group).

    Keyword args (no **kwargs sink, so a misspelled config key raises TypeError):
        in_channels/out_channels: latent channels in and out; input_size: latent side H = W.
        num_classes: labels 0..num_classes-1; `num_classes` itself is the null label.
        time_inputs: K embedders, widths summing to hidden_size; time_embed_order: the order in which their
            outputs are concatenated into t_emb (SFD passes (1, 0): semantic half first, docs/methods.md §6.4).
        norm: "layernorm" | "rmsnorm"; ffn: "gelu" | "swiglu"; rope: 2-D RoPE on q, k; qk_norm: RMSNorm on q, k.
        attn_layout: "bhsd" | "bshd", where q, k are normalised and rotated (same result; layers.Attention).
        kernels: "torch" | "triton", the suite's Triton kernels for q/k norm + RoPE, SwiGLU and adaLN's
            residual + norm + modulation (same result; layers.KERNELS). Speed choices only: neither changes
            the state dict.
        extra_token_dim: E > 0 adds one extra token (REG's class token, docs/methods.md §14): the last
            k = ceil(E / H²) input channels carry it packed (layers.pack_token, zero padding ignored); it is
            embedded by Linear(E → D) + LayerNorm(D, affine) as token 0 with a zero position row (identity
            RoPE rotation), seen by every block, returned in `hidden` (T + 1 tokens), read out by the
            zero-initialised `final_layer.linear_cls` and packed back into the same k output channels
            (padding exactly 0). 0 (default) is the plain model, unchanged.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        input_size: int,
        num_classes: int,
        patch_size: int,
        depth: int,
        hidden_size: int,
        num_heads: int,
        time_inputs: int = 1,
        time_embed_order: Sequence[int] | None = None,
        class_dropout: float = 0.1,
        norm: str,
        ffn: str,
        rope: bool,
        qk_norm: bool,
        attn_layout: str = "bhsd",
        kernels: str = "torch",
        extra_token_dim: int = 0,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.extra_token_dim = int(extra_token_dim)
        self.extra_channels = token_channels(self.extra_token_dim, input_size) if self.extra_token_dim else 0
        if self.extra_channels and (in_channels <= self.extra_channels or out_channels != in_channels):
            raise ValueError(f"extra_token_dim {self.extra_token_dim} packs into {self.extra_channels} channel(s) "
                             f"of {input_size}×{input_size}; the latent needs more channels than that (got "
                             f"in_channels {in_channels}) and out_channels == in_channels (got {out_channels})")
        order = tuple(range(time_inputs)) if time_embed_order is None else tuple(int(i) for i in time_embed_order)
        if sorted(order) != list(range(time_inputs)):
            raise ValueError(f"time_embed_order {order} must be a permutation of range({time_inputs})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.input_size, self.patch_size = input_size, patch_size
        self.grid = input_size // patch_size
        self.num_classes, self.null_label = num_classes, num_classes
        self.depth, self.hidden_size, self.num_heads = depth, hidden_size, num_heads
        self.time_inputs, self.time_embed_order = time_inputs, order

        # Patchify as a strided conv: (N, C, H, W) -> (N, D, H/p, W/p); an extra token's channels are not patches.
        self.x_embedder = nn.Conv2d(in_channels - self.extra_channels, hidden_size, kernel_size=patch_size,
                                    stride=patch_size)
        self.t_embedders = nn.ModuleList(TimestepEmbedder(w) for w in split_widths(hidden_size, time_inputs))
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        # Fixed, not trained; non-persistent because it is a pure function of the config.
        pos = sincos_pos_embed_2d(hidden_size, self.grid)                       # (1, T, D)
        extra = 1 if self.extra_token_dim else 0
        if extra:   # REG: c_t -> Linear(E -> D) -> LayerNorm(D, affine, eps 1e-6); a zero position row
            self.extra_embedder = nn.Sequential(nn.Linear(self.extra_token_dim, hidden_size),
                                                nn.LayerNorm(hidden_size, eps=1e-6))
            pos = torch.cat([pos.new_zeros(1, 1, hidden_size), pos], dim=1)     # (1, 1 + T, D)
        self.register_buffer("pos_embed", pos, persistent=False)
        # One RoPE table shared by every block (it has no parameters).
        rope_mod = RoPE2D(hidden_size // num_heads, self.grid, extra_tokens=extra) if rope else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, norm=norm, ffn=ffn, qk_norm=qk_norm, rope=rope_mod,
                     attn_layout=attn_layout, kernels=kernels)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels - self.extra_channels, norm=norm,
                                      extra_token_dim=self.extra_token_dim)
        # dtype of the residual stream. None: whatever type promotion gives, which under bf16 autocast is
        # fp32 (the bf16 patch embedding plus the fp32 position table), as in every reference code.
        # torch.bfloat16 halves the residual's memory traffic (train.precision=bf16-residual, set by the
        # trainer on the training model only; docs/performance.md). Not a parameter: checkpoints ignore it.
        self.residual_dtype: torch.dtype | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init (docs/methods.md §0.2): xavier Linear, patch embed as a Linear, N(0, .02) embedders, zero adaLN/final."""

        def _linear_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_linear_init)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # fans of the equivalent Linear(C·p·p -> D)
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in self.t_embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # Zero adaLN outputs make every block the identity at init (the "Zero" in adaLN-Zero),
        # and the zero final linear makes the initial prediction exactly 0.
        # REG zero-initialises its class-token head too (models/sit.py initialize_weights).
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1],
                      self.final_layer.linear, *([self.final_layer.linear_cls] if self.extra_token_dim else [])]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def time_embedding(self, t: Tensor) -> Tensor:
        """t (N, K) (or (N,) when K = 1), embedded as given -> t_emb (N, D), blocks in `time_embed_order`."""
        if t.ndim == 1:
            t = t.unsqueeze(1)  # (N, 1)
        if t.ndim != 2 or t.shape[1] != self.time_inputs:
            raise ValueError(f"expected t of shape (N, {self.time_inputs}), got {tuple(t.shape)}")
        return torch.cat([self.t_embedders[j](t[:, j]) for j in self.time_embed_order], dim=1)  # (N, D)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p·p·C_out) -> (N, C_out, H, W) (C_out without an extra token's channels)."""
        p, c, g = self.patch_size, self.out_channels - self.extra_channels, self.grid
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, q)
        return x.reshape(x.shape[0], c, g * p, g * p)  # (N, C, H, W)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, *, hidden_at: tuple[int, ...] = ()) -> BackboneOut:
        """Predict (velocity, ε, ...) for a noisy latent.

        Args:
            x: (N, C_in, H, W) noisy latent; t: (N, K) group times (or (N,) when K = 1); y: (N,) int64 labels.
            hidden_at: 1-based block indices whose output tokens (N, T, D) are returned in `hidden`.
        """
        bad = [k for k in hidden_at if not 1 <= k <= self.depth]
        if bad:
            raise ValueError(f"hidden_at {bad} outside blocks 1..{self.depth}")
        if self.extra_token_dim:
            x = self._embed_with_extra_token(x)  # (N, 1 + T, D)
        else:
            x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        c = self.time_embedding(t) + self.y_embedder(y)  # (N, D)
        hidden: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, c)  # (N, T, D)
            if i in hidden_at:
                hidden[i] = x
        if self.extra_token_dim:
            x, tok = self.final_layer(x, c)  # (N, T, p·p·C_tex), (N, E)
            out = torch.cat([self.unpatchify(x), pack_token(tok.to(x.dtype), self.input_size)], dim=1)
            return BackboneOut(out=out, hidden=hidden)
        x = self.final_layer(x, c)  # (N, T, p·p·C_out)
        return BackboneOut(out=self.unpatchify(x), hidden=hidden)

    def _embed_with_extra_token(self, x: Tensor) -> Tensor:
        """(N, C, H, W) with the extra token packed in the last k channels -> tokens (N, 1 + T, D), token 0 first."""
        k = self.extra_channels
        patches = self.x_embedder(x[:, :-k]).flatten(2).transpose(1, 2)           # (N, T, D)
        tok = self.extra_embedder(unpack_token(x[:, -k:], self.extra_token_dim))    # (N, D)
        return torch.cat([tok[:, None].to(patches.dtype), patches], dim=1) + self.pos_embed


#################################################################################
#                                   Presets                                     #
#################################################################################

# size -> (depth, hidden size, heads), docs/methods.md §7. "tiny" is calibrated for a 2-core CPU test/profile run.
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 128, 4),
    "s": (12, 384, 6),
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (28, 1152, 16),
}


def make_preset(name: str, depth: int, hidden_size: int, num_heads: int, patch_size: int,
                family: dict[str, object]) -> Callable[..., DiT]:
    """A preset: its fixed args cannot be overridden (duplicate keyword -> TypeError); qk_norm defaults off."""

    def preset(**kw: object) -> DiT:
        return DiT(patch_size=patch_size, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                   **family, **{"qk_norm": False, **kw})

    preset.__name__ = preset.__qualname__ = name.replace("-", "_")
    preset.__doc__ = f"{name}: depth {depth}, width {hidden_size}, {num_heads} heads, patch {patch_size}, {family}."
    return preset


def register_family(prefix: str, sizes: dict[str, tuple[int, int, int]], family: dict[str, object]) -> None:
    """Register `{prefix}-{size}-{1,2}` for every size, plus `{prefix}-tiny` (patch 2) for tests."""
    for size, (depth, width, heads) in sizes.items():
        for patch in (1, 2):
            name = f"{prefix}-{size}-{patch}"
            BACKBONES.register(name)(make_preset(name, depth, width, heads, patch, family))
    BACKBONES.register(f"{prefix}-tiny")(make_preset(f"{prefix}-tiny", *sizes["tiny"], 2, family))


# DiT / SiT / REPA / ReDi block: affine-free LayerNorm, GELU-tanh MLP, absolute positions only.
register_family("dit", DIT_SIZES, {"norm": "layernorm", "ffn": "gelu", "rope": False})
