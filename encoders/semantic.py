"""Semantic encoders: patch tokens that play DINOv2's role (REPA target, ReDi PCA input, SFD SemVAE input).

"semantic-encoder": a small self-supervised stand-in trained in `prepare` for the offline profiles (the weak
prior; the default stand-in is encoders/supervised.py's), and the token interface every trained stand-in shares
(`TokenArtifact`), the linear probe and the pixel probe. The pretrained DINOv2 is in encoders/dinov2.py.
All expose `tokens(images in [-1, 1]) -> (N, T, D)` final-normalised patch tokens, row-major over `grid`,
and `encode_with_cls(images) -> (cls (N, D), patch tokens (N, T, D))` from the same forward. With the
knob `cls_token=true` (REG, docs/methods.md §14) `tokens` returns (N, 1 + T, D), the class token first, so the
suite's token caches carry it; the default (false) keeps every output and cached artifact as before.
"""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.progress import track
from core.registry import ENCODERS
from core.seed import seeded_init
from core.types import ImageData, to_unit
from encoders.base import ModuleArtifact, batched

log = logging.getLogger(__name__)


#################################################################################
#                       The stand-in network (MLP-Mixer)                        #
#################################################################################

class MixerBlock(nn.Module):
    """MLP-Mixer block (https://arxiv.org/abs/2105.01601): token-mixing MLP, then channel-mixing MLP, pre-LN."""

    def __init__(self, dim: int, num_tokens: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(num_tokens, num_tokens)
        self.token_fc2 = nn.Linear(num_tokens, num_tokens)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.chan_fc1 = nn.Linear(dim, hidden)
        self.chan_fc2 = nn.Linear(hidden, dim)

    def forward(self, h: Tensor) -> Tensor:
        mixed = self.norm1(h).transpose(1, 2)                                  # (N, D, T)
        h = h + self.token_fc2(F.gelu(self.token_fc1(mixed))).transpose(1, 2)  # (N, T, D)
        return h + self.chan_fc2(F.gelu(self.chan_fc1(self.norm2(h))))


class TokenNet(nn.Module):
    """Image (N, C, H, W) in [-1, 1] -> final-LayerNorm patch tokens (N, (H/p)·(W/p), D).

    The stem is two strided convs (2×2, then (p/2)×(p/2)) with a GELU between: a 4×4 patch embedding with one
    non-linearity, as cheap as a linear patchify. A learned position embedding is added, like a ViT's.
    """

    def __init__(self, in_channels: int, image_size: int, patch: int, dim: int, depth: int, mlp_ratio: float) -> None:
        super().__init__()
        if patch % 2 or image_size % patch:
            raise ValueError(f"patch must be even and divide image_size, got patch={patch}, image_size={image_size}")
        self.grid, self.dim = (image_size // patch, image_size // patch), dim
        num_tokens = self.grid[0] * self.grid[1]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dim // 2, 2, 2), nn.GELU(),
                                  nn.Conv2d(dim // 2, dim, patch // 2, patch // 2))
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        # Replaces masked patch embeddings for the masked-token term (iBOT/SimMIM style input masking).
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[MixerBlock(dim, num_tokens, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (N, C, H, W); mask (N, T) bool, True = replace that patch by the mask token -> (N, T, D)."""
        h = self.stem(x).flatten(2).transpose(1, 2)                           # (N, T, D), row-major grid
        if mask is not None:
            h = torch.where(mask[..., None], self.mask_token.to(h.dtype).expand_as(h), h)
        return self.norm(self.blocks(h + self.pos_embed))


#################################################################################
#                        Self-supervised training (SimCLR)                      #
#################################################################################

def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """One random view of x (N, C, H, W) in [-1, 1]: zoom-in crop, shift, h-flip, contrast/brightness.

    The random numbers come from a CPU generator so a fit is reproducible on any device.
    """
    n = x.shape[0]
    rnd = torch.rand(n, 6, generator=gen).to(x.device)                          # (N, 6) uniform [0, 1)
    scale = 0.75 + 0.25 * rnd[:, 0]                                               # keep 75-100 % of the side
    flip = torch.where(rnd[:, 1] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = (rnd[:, 2:4] - 0.5) * 0.3                                    # shift up to ±7.5 % of the side
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Sample x + 1 so that out-of-image pixels pad with -1 (black background), not 0 (mid grey).
    view = F.grid_sample(x + 1, grid, align_corners=False) - 1
    contrast = (0.6 + 0.8 * rnd[:, 4]).view(n, 1, 1, 1)
    bright = (0.6 * rnd[:, 5] - 0.3).view(n, 1, 1, 1)
    return view * contrast + bright


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's NT-Xent loss: row i of z1 must pick row i of z2 among all 2N − 1 others. z1, z2 (N, E)."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=-1)                                  # (2N, E)
    sim = (z @ z.t() / temperature).fill_diagonal_(float("-inf"))                # (2N, 2N), self excluded
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _head(dim: int, hidden: int, out: int) -> nn.Module:
    """SimCLR projection head (BN as in SimCLR v2); thrown away after training."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out))


def train_ssl(net: TokenNet, images_u8: Tensor, *, steps: int, batch_size: int, lr: float, weight_decay: float,
              temperature: float, warmup: int, mask_ratio: float, dense_weight: float, seed: int,
              device: torch.device | str) -> float:
    """Train `net` in place with NT-Xent on mean-pooled tokens of two views (+ a masked-token term); no labels.

    Args:
        images_u8: (N, C, H, W) uint8 training images (labels are never seen).
    Returns the last loss value.
    """
    gen = torch.Generator().manual_seed(seed)
    dim = net.norm.normalized_shape[0]
    with seeded_init(seed + 1):   # seeded, thread-safe, the caller's RNG state untouched
        global_head, dense_head = _head(dim, 8 * dim, 128).to(device), _head(dim, 4 * dim, 128).to(device)
    params = [*net.parameters(), *global_head.parameters(), *dense_head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    num_tokens = net.pos_embed.shape[1]
    loss = torch.zeros(())
    for step in track("semantic-encoder training", range(steps), values=lambda: {"loss": float(loss.detach())}):
        # Linear warm-up, then cosine decay to 0: the usual SimCLR schedule, squeezed into `steps`.
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(0, images_u8.shape[0], (batch_size,), generator=gen)
        x = to_unit(images_u8[idx].to(device))                                    # (B, C, H, W)
        views = torch.cat([augment(x, gen), augment(x, gen)])                      # (2B, C, H, W)
        mask = (torch.rand(2 * batch_size, num_tokens, generator=gen) < mask_ratio).to(device)
        tokens = net(views, mask if dense_weight > 0 else None)                   # (2B, T, D)
        z = global_head(tokens.mean(1))                                           # (2B, 128)
        loss = nt_xent(z[:batch_size], z[batch_size:], temperature)
        if dense_weight > 0:
            loss = loss + dense_weight * _masked_token_loss(net, dense_head, views, tokens, mask, temperature, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


def _masked_token_loss(net: TokenNet, head: nn.Module, views: Tensor, tokens: Tensor, mask: Tensor,
                       temperature: float, gen: torch.Generator, max_rows: int = 1024) -> Tensor:
    """Masked-token prediction, contrastive: a masked token must identify the unmasked token at its place.

    The targets come from the same network without the mask and without gradient (a stop-gradient teacher,
    data2vec/iBOT-like but with the teacher = the student to save the EMA copy). Rows are subsampled so the
    (rows × rows) similarity matrix stays small.
    """
    with torch.no_grad():
        target = net(views)[mask]                                                 # (M, D)
    pred = tokens[mask]                                                           # (M, D)
    keep = torch.randperm(pred.shape[0], generator=gen)[:max_rows].to(pred.device)
    return nt_xent(head(pred[keep]), head(target[keep]).detach(), temperature)


#################################################################################
#                           Linear probe (report only)                          #
#################################################################################

def linear_probe(train_feats: Tensor, train_y: Tensor, test_feats: Tensor, test_y: Tensor,
                 num_classes: int, iters: int = 100) -> float:
    """Multinomial logistic regression (L-BFGS) on standardised features; returns test accuracy.

    Args: train_feats (N, F), train_y (N,), test_feats (M, F), test_y (M,).
    """
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    a, b = (train_feats - mean) / std, (test_feats - mean) / std
    weight = torch.zeros(a.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        # A small L2 term keeps L-BFGS from running the weights off to infinity on separable data.
        loss = F.cross_entropy(a @ weight + bias, train_y) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((b @ weight + bias).argmax(1) == test_y).float().mean())


def pixel_probe(data: ImageData, max_train: int) -> float:
    """The same probe on raw pixels in [-1, 1] (C·H·W features): what an encoder must beat to carry semantics
    the generator does not see directly (Fashion-MNIST 32×32, 20 000 images: 0.824)."""
    flat = lambda u8: to_unit(u8).flatten(1).float()                              # (N, C·H·W)
    return linear_probe(flat(data.train_x[:max_train]), data.train_y[:max_train].cpu(), flat(data.test_x),
                        data.test_y.cpu(), data.num_classes)


def probe_tokens(encoder, data: ImageData, max_train: int, device: torch.device | str) -> float:
    """Linear-probe accuracy of mean-pooled frozen tokens; labels are used here and nowhere else."""
    pool = lambda u8: encoder.tokens(to_unit(u8)).mean(1)                         # (B, D)
    train_feats = batched(pool, data.train_x[:max_train], device=device).float()
    test_feats = batched(pool, data.test_x, device=device).float()
    return linear_probe(train_feats, data.train_y[:max_train].cpu(), test_feats, data.test_y.cpu(),
                        data.num_classes)


#################################################################################
#                     Artifact "semantic-encoder" (stand-in)                    #
#################################################################################

class TokenArtifact(ModuleArtifact):
    """A trained stand-in's token interface: `net(images) -> (N, T, D)` final-normalised patch tokens.

    Shared by every stand-in trained in `prepare` (this module's SSL Mixer, encoders/supervised.py's CNN,
    the FD-network oracle). `config` holds the network's constructor keywords, plus `cls_token` when set.
    """

    requires: tuple[str, ...] = ()

    def __init__(self, net: nn.Module, config: dict, summary: dict) -> None:
        self.net = net.eval().requires_grad_(False)
        self.config = config
        self._summary = summary
        # An output layout knob, not a network knob: artifacts saved before it existed load with False.
        self.cls_token = bool(config.get("cls_token", False))

    @classmethod
    def net_config(cls, config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "cls_token"}

    @property
    def grid(self) -> tuple[int, int]:
        return self.net.grid

    @property
    def dim(self) -> int:
        return int(self.net.dim)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def encode_with_cls(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) in [-1, 1] -> (cls (N, D), patch tokens (N, T, D)), one forward.

        These stand-ins have no learned class token; their global image embedding is the mean of the final
        patch tokens, the very vector their training loss reads (SimCLR's projection head, the supervised
        classifier's head), as DINO's loss trains DINOv2's class token. So that mean is the class token.
        """
        patches = self.net(images.to(self.device, torch.float32))              # (N, T, D)
        return patches.mean(1), patches

    @torch.no_grad()
    def tokens(self, images: Tensor) -> Tensor:
        """images (N, C, H, W) in [-1, 1] -> (N, T, D) final-LayerNorm patch tokens, row-major over `grid`;
        (N, 1 + T, D) with the class token first when `cls_token` is set."""
        if not self.cls_token:
            return self.net(images.to(self.device, torch.float32))
        cls, patches = self.encode_with_cls(images)
        return torch.cat([cls[:, None], patches], dim=1)

    @classmethod
    def trained(cls, net: nn.Module, config: dict, cls_token: bool, kind: str, data: ImageData, probe_images: int,
                device: torch.device | str, start: float, final_loss: float) -> "TokenArtifact":
        """The artifact of a freshly trained `net`, its probes and timings in the summary (start: perf_counter)."""
        train_seconds = time.perf_counter() - start
        encoder = cls(net, {**config, **({"cls_token": True} if cls_token else {})}, {})
        encoder._summary = dict(kind=kind, **encoder.probe_summary(data, probe_images, device),
                                final_loss=round(final_loss, 4), train_seconds=round(train_seconds, 1),
                                seconds=round(time.perf_counter() - start, 1),
                                params=sum(p.numel() for p in net.parameters()))
        log.info("%s: %s", kind, encoder._summary)
        return encoder

    def probe_summary(self, data: ImageData, probe_images: int, device: torch.device | str) -> dict:
        """Linear probe of the mean-pooled tokens next to the same probe on raw pixels (the bar to clear)."""
        return dict(linear_probe_acc=round(probe_tokens(self, data, probe_images, device), 4),
                    pixel_probe_acc=round(pixel_probe(data, probe_images), 4),
                    probe_train_images=min(probe_images, data.train_x.shape[0]))


@ENCODERS.register("semantic-encoder")
class SemanticEncoder(TokenArtifact):
    """Self-supervised stand-in for DINOv2 on small images: an MLP-Mixer trained with SimCLR, no labels.

    Why this network and objective: on 2 CPU cores the budget is ≈ 60 s, i.e. a few hundred steps. In that
    budget the NT-Xent contrastive loss (SimCLR, https://arxiv.org/abs/2002.05709) gets a useful gradient from
    the first step, while an EMA teacher (BYOL/DINO) must improve before its targets mean anything. Measured on
    Fashion-MNIST (linear probe on mean-pooled tokens): untrained net 0.755; SimCLR, 400 steps of batch 128,
    0.80 (≈ 40 s); a ViT of the same cost 0.75 (the Mixer's GEMM-only blocks are the fastest per FLOP on CPU);
    on that ViT at 150 steps VICReg gave 0.71 against SimCLR's 0.73. The optional masked-token term
    (`dense_weight` > 0) asks each masked token to identify its unmasked self; it is off by default: in the
    same budget it cost 40 % more time and gave 0.79.
    A different network (Mixer, self-supervised) from the FD feature net (a supervised CNN).
    Its probe (0.80) is below raw pixels' (0.824): the *weak* prior of the strength ablation
    (docs/proxy.md); the default stand-in is encoders/supervised.py's.
    """

    net_cls = TokenNet

    @classmethod
    def fit(cls, data: ImageData, deps: dict, device: torch.device | str = "cpu", *, patch: int = 4,
            dim: int = 64, depth: int = 3, mlp_ratio: float = 2.0, steps: int = 400, batch_size: int = 128,
            lr: float = 2e-3, weight_decay: float = 0.05, temperature: float = 0.2, warmup: int = 20,
            mask_ratio: float = 0.3, dense_weight: float = 0.0, seed: int = 0,
            probe_images: int = 20000, train_half: int | None = None, cls_token: bool = False) -> "SemanticEncoder":
        """Train on data.train_x without labels; `patch` must equal the texture VAE's downsample factor.

        cls_token: `tokens` prepends the class token (REG); the network and its training do not change.

        train_half: None uses every training image; 0 / 1 only the even / odd indices, so that the
        profile can train this encoder and the FD network on disjoint halves (docs/architecture.md, "Profiles").
        """
        if train_half not in (None, 0, 1):
            raise ValueError(f"train_half must be None, 0 or 1, got {train_half!r}")
        start = time.perf_counter()
        config = dict(in_channels=data.channels, image_size=data.image_size, patch=patch, dim=dim, depth=depth,
                      mlp_ratio=mlp_ratio)
        with seeded_init(seed):   # seeded, thread-safe, the caller's RNG state untouched
            net = TokenNet(**config).to(device)
        images = data.train_x if train_half is None else data.train_x[train_half::2]
        final_loss = train_ssl(net, images, steps=steps, batch_size=batch_size, lr=lr,
                               weight_decay=weight_decay, temperature=temperature, warmup=warmup,
                               mask_ratio=mask_ratio, dense_weight=dense_weight, seed=seed, device=device)
        return cls.trained(net, config, cls_token, "semantic-encoder", data, probe_images, device, start, final_loss)
