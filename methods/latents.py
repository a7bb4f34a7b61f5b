"""Latent builders: image -> clean latent x1 (channel groups, texture first) -> image (docs/architecture.md).

"vae" (DiT/SiT, REPA with aux tokens, VA-VAE with tokenizer="vavae"), "vae-pca" (ReDi,
https://arxiv.org/abs/2504.16064, docs/methods.md §4) and "vae-semvae" (SFD, https://arxiv.org/abs/2512.04926, docs/methods.md §6.1).
Built as `LATENTS.build(cfg, artifacts={kind: loaded artifact})`; `requires_for(**cfg)` lists the kinds.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from core.config import ConfigError
from core.registry import LATENTS
from core.types import Groups

ENCODER = "semantic-encoder"   # the artifact kind whose tokens feed PCA, SemVAE and REPA (stand-in or DINOv2)


def _artifact(artifacts: dict[str, Any], kind: str) -> Any:
    if kind not in artifacts:
        raise KeyError(f"latent builder needs artifact {kind!r}; got {', '.join(sorted(artifacts)) or 'none'}")
    return artifacts[kind]


class LatentBuilder:
    """Common part: the texture tokenizer, optional extra (semantic) groups, per-channel stats, decode.

    Subclasses set `groups` and `normalized` (one bool per group; a False group gets stats (0, 1), i.e. is fed
    un-normalised), and override `_extra(tokens, size, generator) -> [(N, C_extra, h, w)]` and
    `_requires`; `needs_tokens` says whether `_extra` uses the semantic encoder's tokens.
    """

    aux_keys: tuple[str, ...] = ()
    needs_tokens: bool = False
    group_names: tuple[str, ...] = ("texture",)     # known before any artifact exists (config validation)

    def __init__(self, artifacts: dict[str, Any], tokenizer: str, aux_tokens: bool) -> None:
        self.tokenizer, self._tokenizer_kind = _artifact(artifacts, tokenizer), tokenizer
        self.aux_keys = ("tokens",) if aux_tokens else ()
        self.encoder = _artifact(artifacts, ENCODER) if aux_tokens or self.needs_tokens else None
        self.groups = Groups(("texture",), (int(self.tokenizer.latent_channels),))
        self.normalized: tuple[bool, ...] = (True,)
        self.mean: Tensor | None = None     # (1, C, 1, 1) set by set_stats
        self.std: Tensor | None = None

    #------------------------------- requirements ------------------------------#
    @classmethod
    def requires_for(cls, **cfg: Any) -> tuple[str, ...]:
        """Artifact kinds prepare must build for this config (called before any artifact exists).

        Takes the builder's config keys (without "name"); an unknown key raises TypeError like `build`.
        """
        bound = inspect.signature(cls.__init__).bind_partial(None, None, **cfg)   # self, artifacts
        bound.apply_defaults()
        args = {k: v for k, v in bound.arguments.items() if k not in ("self", "artifacts")}
        return cls._requires(args)

    @staticmethod
    def _requires(args: dict[str, Any]) -> tuple[str, ...]:
        return (args["tokenizer"],) + ((ENCODER,) if args["aux_tokens"] else ())

    @property
    def requires(self) -> tuple[str, ...]:
        return self._requires(dict(tokenizer=self._tokenizer_kind, aux_tokens=bool(self.aux_keys)))

    #--------------------------------- encode ----------------------------------#
    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """images (N, C_img, H, W) in [-1, 1] -> {"x1": raw latent (N, C, h, w), **aux}; aux "tokens" (N, T, D)."""
        x_tex = self.tokenizer.encode(images, generator=generator)               # (N, c_tex, h, w) sample
        tokens = self.encoder.tokens(images) if self.encoder is not None else None
        out = self.compose(x_tex, tokens, generator)
        if "tokens" in self.aux_keys:
            out["tokens"] = tokens
        return out

    @property
    def tokenizer_kind(self) -> str:
        return self._tokenizer_kind

    @property
    def uses_tokens(self) -> bool:
        """Whether the latent or its aux targets need the semantic encoder's tokens."""
        return self.encoder is not None

    @torch.no_grad()
    def compose(self, x_tex: Tensor, tokens: Tensor | None, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """The latent from already computed parts: texture latent (N, c_tex, h, w) and encoder tokens (N, T, D).

        `prepare` encodes the texture latents and the tokens once per tokenizer / encoder and composes every
        latent builder's cache from them, instead of running the frozen networks once per builder.
        """
        parts = [x_tex] + self._extra(tokens, x_tex.shape[-2:], generator)
        return {"x1": torch.cat([p.to(x_tex.device, x_tex.dtype) for p in parts], dim=1)}   # (N, C, h, w)

    def _extra(self, tokens: Tensor | None, size: torch.Size, generator: torch.Generator | None) -> list[Tensor]:
        return []

    #------------------------------ normalisation ------------------------------#
    def stats_from(self, x_raw: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std over (N, H, W) of raw latents (N, C, H, W) -> two (1, C, 1, 1) tensors.

        Accumulated in float64. Channels of a group with normalized=False get (0, 1): identity.
        """
        x = x_raw.double()
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)          # unbiased, as LightningDiT's latent stats
        keep = torch.tensor(self.normalized, device=x.device)[None].to(x.dtype)    # (1, G)
        keep = self.groups.expand(keep)                                            # (1, C, 1, 1)
        mean, std = mean * keep, std * keep + (1 - keep)
        return mean.to(x_raw.dtype), std.to(x_raw.dtype)

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        """Per-channel stats, each (1, C, 1, 1); every group is normalised with its own channels' stats."""
        shape = (1, self.groups.channels, 1, 1)
        if tuple(mean.shape) != shape or tuple(std.shape) != shape:
            raise ValueError(f"stats must have shape {shape}, got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.mean, self.std = mean, std

    def _stats(self, x: Tensor, channels: slice = slice(None)) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("latent stats are not set: call set_stats(*stats_from(x_raw)) first")
        return self.mean[:, channels].to(x.device, x.dtype), self.std[:, channels].to(x.device, x.dtype)

    def normalize(self, x: Tensor) -> Tensor:
        """Raw (N, C, h, w) -> (x − μ_c) / σ_c."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised (N, C, h, w) -> x·σ_c + μ_c."""
        mean, std = self._stats(x)
        return x * std + mean

    #--------------------------------- decode ----------------------------------#
    @torch.no_grad()
    def decode(self, x1: Tensor) -> Tensor:
        """Normalised latent (N, C, h, w) -> images (N, C_img, H, W) in [-1, 1], from the texture group only.

        As SFD's inference (docs/methods.md §11.15): drop the other groups, then undo the texture channels' stats.
        """
        tex = self.groups.slice_of("texture")
        mean, std = self._stats(x1, tex)
        return self.tokenizer.decode(x1[:, tex] * std + mean)


def _to_grid(x: Tensor, size: torch.Size) -> Tensor:
    """(N, c, h', w') -> (N, c, h, w): bilinear when the token grid differs from the latent grid (ReDi: 16 -> 32)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


#################################################################################
#                                  Builders                                     #
#################################################################################

@LATENTS.register("vae")
class VAELatent(LatentBuilder):
    """Texture tokenizer latent only. tokenizer: "texture-vae" (DiT/SiT/REPA) or "vavae" (LightningDiT).

    aux_tokens: also return the semantic encoder's patch tokens as aux "tokens" (REPA's target).
    """

    def __init__(self, artifacts: dict[str, Any], tokenizer: str = "texture-vae", aux_tokens: bool = False) -> None:
        super().__init__(artifacts, tokenizer, aux_tokens)


@LATENTS.register("vae-pca")
class VAEPCALatent(LatentBuilder):
    """ReDi: texture ⊕ PCA(tokens)[:rank], VAE channels first; groups ("texture", "semantic").

    rank 8: the paper's r with a 4-channel VAE latent, so the tiny profile keeps ReDi's 4 + 8 channel layout.
    normalize_semantic: ReDi feeds the PCA coefficients un-normalised (docs/methods.md §4), so False (stats 0/1) is the
    faithful default; True gives them their own per-channel stats like every other group.
    """

    needs_tokens = True
    group_names = ("texture", "semantic")

    def __init__(self, artifacts: dict[str, Any], tokenizer: str = "texture-vae", rank: int = 8,
                 normalize_semantic: bool = False, aux_tokens: bool = False) -> None:
        self.rank, self.normalize_semantic = rank, normalize_semantic
        self.pca = _artifact(artifacts, "pca")
        if not 1 <= rank <= self.pca.dim:
            raise ValueError(f"vae-pca rank must be in [1, {self.pca.dim}] (the token dim), got {rank}")
        super().__init__(artifacts, tokenizer, aux_tokens)
        self.groups = Groups(("texture", "semantic"), (self.groups.sizes[0], rank))
        self.normalized = (True, normalize_semantic)

    @staticmethod
    def _requires(args: dict[str, Any]) -> tuple[str, ...]:
        return (args["tokenizer"], ENCODER, "pca")

    def _extra(self, tokens: Tensor | None, size: torch.Size, generator: torch.Generator | None) -> list[Tensor]:
        return [_to_grid(self.pca.project(tokens, self.rank), size)]             # (N, r, h, w)


@LATENTS.register("vae-semvae")
class VAESemVAELatent(LatentBuilder):
    """SFD: texture ⊕ SemVAE(tokens) sample, semantic LAST; each group normalised with its own per-channel
    stats; aux "tokens" on by default (REPA target). tokenizer="vavae" gives VA-VAE ⊕ SemVAE.
    """

    needs_tokens = True
    group_names = ("texture", "semantic")

    def __init__(self, artifacts: dict[str, Any], tokenizer: str = "texture-vae", aux_tokens: bool = True) -> None:
        self.semvae = _artifact(artifacts, "semvae")
        super().__init__(artifacts, tokenizer, aux_tokens)
        self.groups = Groups(("texture", "semantic"), (self.groups.sizes[0], int(self.semvae.latent_channels)))
        self.normalized = (True, True)

    @staticmethod
    def _requires(args: dict[str, Any]) -> tuple[str, ...]:
        return (args["tokenizer"], ENCODER, "semvae")

    def _extra(self, tokens: Tensor | None, size: torch.Size, generator: torch.Generator | None) -> list[Tensor]:
        # SFD's grids match (16×16 texture and token grid); the resize only matters for mismatched ablations.
        return [_to_grid(self.semvae.encode(tokens, generator), size)]           # (N, c_sem, h, w)


@LATENTS.register("vae-cls")
class VAEClsLatent(LatentBuilder):
    """REG (https://arxiv.org/abs/2507.01467, docs/methods.md §14): texture latent ⊕ the encoder's class token,
    packed into k = ceil(E / (h·w)) channels (zero padding at the end; backbones.layers.pack_token); groups
    ("texture", "cls"). The class token is fed un-normalised (REG adds no normalisation), so the "cls" group
    gets stats (0, 1) and its padding stays exactly 0 in x1. Aux "tokens" (N, 1 + T, E): the class token
    first, then the patch tokens, REG's alignment target.

    Needs the semantic encoder built with `cls_token: true` (its `tokens` then return the class token first).
    """

    needs_tokens = True
    group_names = ("texture", "cls")

    def __init__(self, artifacts: dict[str, Any], tokenizer: str = "texture-vae", aux_tokens: bool = True,
                 latent_size: int | None = None) -> None:
        """latent_size: side h = w of the texture latent the token is packed beside; None = the encoder's
        token grid (the stand-in's grid is the latent grid by construction; DINOv2's is 16 at 224 px, so
        paper-scale profiles set it: 32 for SD-VAE f8 at 256 px)."""
        super().__init__(artifacts, tokenizer, aux_tokens)
        if not getattr(self.encoder, "cls_token", False):
            raise ConfigError("latent vae-cls needs the semantic encoder's class token: set "
                              "prepare.semantic-encoder.cls_token=true (the reg preset's profiles do)")
        from backbones.layers import token_channels

        self.cls_dim = int(self.encoder.dim)
        self.size = int(latent_size) if latent_size else int(self.encoder.grid[0])
        self.groups = Groups(("texture", "cls"), (self.groups.sizes[0], token_channels(self.cls_dim, self.size)))
        self.normalized = (True, False)

    @staticmethod
    def _requires(args: dict[str, Any]) -> tuple[str, ...]:
        return (args["tokenizer"], ENCODER)

    def _extra(self, tokens: Tensor | None, size: torch.Size, generator: torch.Generator | None) -> list[Tensor]:
        from backbones.layers import pack_token

        if tokens is None or math.isqrt(tokens.shape[1] - 1) ** 2 != tokens.shape[1] - 1:
            raise ValueError(f"vae-cls expects (N, 1 + T, E) tokens with the class token first and T a square; "
                             f"got {None if tokens is None else tuple(tokens.shape)} (set "
                             "prepare.semantic-encoder.cls_token=true)")
        if tuple(size) != (self.size, self.size):
            raise ConfigError(f"vae-cls was built for a {self.size}×{self.size} latent but the texture latent is "
                              f"{tuple(size)}; set method.latent.latent_size={size[-1]}")
        return [pack_token(tokens[:, 0], self.size)]                                  # (N, k, h, w)
