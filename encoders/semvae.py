"""Artifact "semvae": SFD's transformer VAE on semantic-encoder tokens (https://arxiv.org/abs/2512.04926, §6.2).

Tokens (N, T, D) -> a c-channel diagonal Gaussian per token on the token grid (N, c, h, w) -> tokens again.
The official code is unreleased; this follows the spec's reading of the fork `BartekPog/sfd-encoder`.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.registry import ENCODERS
from core.seed import seeded_init
from core.types import ImageData, to_unit
from encoders.base import ModuleArtifact, batched

log = logging.getLogger(__name__)

LOGVAR_RANGE = (-30.0, 20.0)   # docs/methods.md §6.2, as LDM's DiagonalGaussianDistribution


def _blocks(width: int, depth: int, heads: int) -> nn.Module:
    """Pre-LN transformer blocks (MLP ratio 4, GELU, no dropout): torch's own layer is exactly that block."""
    layer = lambda: nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
    return nn.Sequential(*[layer() for _ in range(depth)])


class SemVAENet(nn.Module):
    """Encoder Linear(D→W) → blocks → LN → Linear(W→2c); decoder Linear(c→W) → blocks → LN → Linear(W→D).

    pos_embed: a learned position embedding added after each input projection. The spec's fork lists none;
    without one the decoder cannot tell where a token sits once the c-channel latent has dropped the
    encoder's own positional content, and the semantic latent is meant to keep the spatial layout.
    """

    def __init__(self, dim: int, width: int, channels: int, depth: int, heads: int,
                 grid: tuple[int, int] | list[int], pos_embed: bool = True) -> None:
        super().__init__()
        self.grid, self.channels = (int(grid[0]), int(grid[1])), channels
        num_tokens = self.grid[0] * self.grid[1]
        self.enc_in, self.enc_blocks = nn.Linear(dim, width), _blocks(width, depth, heads)
        self.enc_norm, self.enc_out = nn.LayerNorm(width), nn.Linear(width, 2 * channels)
        self.dec_in, self.dec_blocks = nn.Linear(channels, width), _blocks(width, depth, heads)
        self.dec_norm, self.dec_out = nn.LayerNorm(width), nn.Linear(width, dim)
        shape = (1, num_tokens, width)
        self.enc_pos = nn.Parameter(torch.randn(shape) * 0.02) if pos_embed else None
        self.dec_pos = nn.Parameter(torch.randn(shape) * 0.02) if pos_embed else None

    def moments(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (N, T, D) -> mean, logvar, each (N, c, h, w) (token t -> grid cell t, row-major)."""
        h = self.enc_in(tokens)
        h = h + self.enc_pos if self.enc_pos is not None else h
        h = self.enc_out(self.enc_norm(self.enc_blocks(h)))                  # (N, T, 2c)
        h = h.transpose(1, 2).reshape(h.shape[0], 2 * self.channels, *self.grid)   # (N, 2c, h, w)
        mean, logvar = h.chunk(2, dim=1)                                      # 2 × (N, c, h, w)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """z (N, c, h, w) -> reconstructed tokens (N, T, D)."""
        h = self.dec_in(z.flatten(2).transpose(1, 2))                         # (N, T, W)
        h = h + self.dec_pos if self.dec_pos is not None else h
        return self.dec_out(self.dec_norm(self.dec_blocks(h)))


def sample(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Reparameterisation trick: mean + exp(logvar / 2)·ε with ε ~ N(0, I) drawn from `generator`."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def semvae_loss(recon: Tensor, target: Tensor, mean: Tensor, logvar: Tensor, *, cos_weight: float,
                kl_weight: float, cos_axis: str) -> tuple[Tensor, dict[str, float]]:
    """MSE + cos_weight·(1 − cos) + kl_weight·KL; recon/target (N, T, D), mean/logvar (N, c, h, w).

    cos_axis="feature" (default): cosine between the D-dim recon and target of each token, averaged over
    tokens: "preserve the semantics of every patch", which is what a per-token feature vector encodes.
    cos_axis="token": the fork's cosine along dim 1 of (N, T, D), i.e. between T-long columns per feature
    (docs/methods.md §6.2 [AMBIGUOUS]); kept to reproduce it.
    """
    if cos_axis not in ("feature", "token"):
        raise ValueError(f"cos_axis must be 'feature' or 'token', got {cos_axis!r}")
    mse = F.mse_loss(recon, target)
    cos = F.cosine_similarity(recon, target, dim=-1 if cos_axis == "feature" else 1).mean()
    # KL(q || N(0, I)) summed over the latent (c·h·w), averaged over the batch.
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
    total = mse + cos_weight * (1 - cos) + kl_weight * kl
    return total, dict(mse=float(mse.detach()), cos=float(cos.detach()), kl=float(kl.detach()))


def train_semvae(net: SemVAENet, tokens: Tensor, *, steps: int, batch_size: int, lr: float, warmup: int,
                 weight_decay: float, cos_weight: float, kl_weight: float, cos_axis: str, seed: int,
                 device: torch.device | str) -> dict[str, float]:
    """AdamW, linear warm-up then constant lr (the spec's 500-step warm-up + long constant phase, scaled down).

    Args:
        tokens: (M, T, D) frozen encoder tokens (CPU); each step draws a random batch of them.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    terms: dict[str, float] = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        f = tokens[torch.randint(0, tokens.shape[0], (batch_size,), generator=gen)].to(device)   # (B, T, D)
        mean, logvar = net.moments(f)
        eps_gen = torch.Generator(device=f.device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        recon = net.decode(sample(mean, logvar, eps_gen))
        loss, terms = semvae_loss(recon, f, mean, logvar, cos_weight=cos_weight, kl_weight=kl_weight,
                                  cos_axis=cos_axis)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return terms


@ENCODERS.register("semvae")
class SemVAE(ModuleArtifact):
    """SFD's semantic VAE as an artifact: `encode(tokens, generator) -> (N, c, h, w)` (a posterior sample,
    as SFD extracts its training latents), `encode_mean`, `decode(latent) -> tokens (N, T, D)`."""

    net_cls = SemVAENet

    requires: tuple[str, ...] = ("semantic-encoder",)

    def __init__(self, net: SemVAENet, config: dict, summary: dict) -> None:
        self.net = net.eval().requires_grad_(False)
        self.config, self._summary = config, summary

    @property
    def latent_channels(self) -> int:
        return self.net.channels

    @property
    def grid(self) -> tuple[int, int]:
        return self.net.grid

    @property
    def device(self) -> torch.device:
        return self.net.enc_in.weight.device

    @torch.no_grad()
    def encode(self, tokens: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """tokens (N, T, D) -> posterior sample (N, c, h, w)."""
        return sample(*self.net.moments(tokens.to(self.device, torch.float32)), generator)

    @torch.no_grad()
    def encode_mean(self, tokens: Tensor) -> Tensor:
        """tokens (N, T, D) -> posterior mean (N, c, h, w)."""
        return self.net.moments(tokens.to(self.device, torch.float32))[0]

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """latent (N, c, h, w) -> tokens (N, T, D)."""
        return self.net.decode(latent.to(self.device, torch.float32))

    @classmethod
    def fit(cls, data: ImageData, deps: dict, device: torch.device | str = "cpu", *, channels: int = 2,
            width: int = 64, depth: int = 2, heads: int = 4, pos_embed: bool = True, steps: int = 150,
            batch_size: int = 128, lr: float = 2e-3, warmup: int = 15, weight_decay: float = 0.0,
            cos_weight: float = 1.0, kl_weight: float = 1e-7, cos_axis: str = "feature",
            fit_images: int = 10000, eval_images: int = 2000, seed: int = 0) -> "SemVAE":
        """Train on the frozen tokens of `fit_images` random training images (no labels).

        Tiny defaults: c = 2 keeps SFD's 2:1 texture:semantic channel ratio (32:16) next to a 4-channel
        texture latent; width 64 and 2 blocks instead of 768 and 4; lr 2e-3 instead of 5e-5 because the run
        is 150 steps (≈ 25 s on 2 CPU cores), not 1M. kl_weight 1e-7 and cos_weight 1 as in the spec.
        """
        start = time.perf_counter()
        encoder = deps["semantic-encoder"]
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(data.train_x.shape[0], generator=gen)[:fit_images]
        tokens = batched(lambda u8: encoder.tokens(to_unit(u8)), data.train_x[idx], device=device)  # (M, T, D)
        config = dict(dim=encoder.dim, width=width, channels=channels, depth=depth, heads=heads,
                      grid=list(encoder.grid), pos_embed=pos_embed)
        with seeded_init(seed):   # seeded, thread-safe, the caller's RNG state untouched
            net = SemVAENet(**config).to(device)
        terms = train_semvae(net, tokens, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                             weight_decay=weight_decay, cos_weight=cos_weight, kl_weight=kl_weight,
                             cos_axis=cos_axis, seed=seed, device=device)
        vae = cls(net, config, {})
        vae._summary = dict(kind="semvae", train_terms={k: round(v, 5) for k, v in terms.items()},
                            train_seconds=round(time.perf_counter() - start, 1), cos_axis=cos_axis)
        vae._summary.update(vae.evaluate(encoder, data.test_x[:eval_images], device))
        vae._summary["seconds"] = round(time.perf_counter() - start, 1)
        log.info("semvae: %s", vae._summary)
        return vae

    def evaluate(self, encoder, images_u8: Tensor, device: torch.device | str, seed: int = 0) -> dict[str, float]:
        """Token reconstruction on held-out images: per-token feature-axis cosine and MSE, sampled and mean."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        out: dict[str, list[Tensor]] = {"cos": [], "cos_mean": [], "mse": []}
        for i in range(0, images_u8.shape[0], 1000):
            f = encoder.tokens(to_unit(images_u8[i:i + 1000].to(device)))                 # (B, T, D)
            recon = self.decode(self.encode(f, gen))
            recon_mean = self.decode(self.encode_mean(f))
            out["cos"].append(F.cosine_similarity(recon, f, dim=-1).flatten())
            out["cos_mean"].append(F.cosine_similarity(recon_mean, f, dim=-1).flatten())
            out["mse"].append((recon - f).pow(2).mean(-1).flatten())
        return {f"test_recon_{k}": round(float(torch.cat(v).mean()), 4) for k, v in out.items()}

