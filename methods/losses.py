"""The flow-matching loss family: velocity MSE with the knobs of SiT (arXiv 2401.08740), ReDi
(arXiv 2504.16064), LightningDiT (arXiv 2501.01423), REPA (arXiv 2410.06940) and SFD (arXiv 2512.04926).

Every knob defaults to off, and then the loss is the plain SiT velocity MSE bit for bit.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.registry import LOSSES
from core.types import BackboneOut, Batch, Groups, LossOut
from methods.base import Loss, LossCtx

REPA_MODES = ("cos", "neg-cos")


@dataclass(frozen=True)
class RepaCfg:
    """The `repa:` block of a flow loss; an unknown key raises TypeError. Defaults are REPA's."""

    depth: int                      # 1-based block whose output is aligned (REPA XL: 8, SFD: 2)
    weight: float = 0.5             # REPA proj_coeff 0.5; SFD repa_weight 1.0
    mode: str = "neg-cos"           # REPA/ReDi "neg-cos"; SFD "cos"
    projector_dim: int = 2048       # REPA/SFD projector width
    target_key: str = "tokens"      # batch.aux key of the (N, T, E) encoder tokens

    def __post_init__(self) -> None:
        if self.mode not in REPA_MODES:
            raise ValueError(f"unknown repa mode {self.mode!r}; valid: {', '.join(REPA_MODES)}")
        if self.depth < 1:
            raise ValueError(f"repa.depth is a 1-based block number, got {self.depth}")


@dataclass(frozen=True)
class DropCfg:
    """The `drop:` block (ReDi DINO-drop); an unknown key raises TypeError."""

    group: str                      # channel group to drop (ReDi: the DINO-PCA group)
    prob: float = 0.2               # ReDi README suggests 0.2


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every non-batch dim: (N, ...) -> (N,) (docs/methods.md §0.2)."""
    return x.flatten(1).mean(1)


def _wide(a: Tensor, b: Tensor) -> torch.dtype:
    # cosines of bf16 outputs lose too much precision; compute them in at least float32
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def cosine_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean over positions of 1 − cos along the channel dim (LightningDiT/SFD, docs/methods.md §5.4, §11.8).

    Args: pred, target (N, C, H, W), all C channels taken jointly. Returns a scalar.
    """
    dt = _wide(pred, target)
    return (1 - F.cosine_similarity(pred.to(dt), target.to(dt), dim=1)).mean()


def repa_alignment(z: Tensor, target: Tensor, mode: str) -> Tensor:
    """Token-wise alignment loss between projected hidden states and encoder tokens (docs/methods.md §3, §6.5).

    "neg-cos" (REPA/ReDi): −mean cos, range [−1, 1]; "cos" (SFD): 1 − mean cos. Same gradient.
    Args: z, target (N, T, D). Returns a scalar (mean over batch and tokens).
    """
    dt = _wide(z, target)
    cos = F.cosine_similarity(z.to(dt), target.to(dt), dim=-1)          # (N, T)
    if mode == "neg-cos":
        return -cos.mean()
    if mode == "cos":
        return (1 - cos).mean()
    raise ValueError(f"unknown repa mode {mode!r}; valid: {', '.join(REPA_MODES)}")


def build_projector(hidden_size: int, projector_dim: int, encoder_dim: int) -> nn.Sequential:
    """Per-token MLP D → P → SiLU → P → SiLU → E (REPA `build_mlp`)."""
    mlp = nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                        nn.Linear(projector_dim, encoder_dim))
    # REPA's SiT applies its xavier-uniform / zero-bias init to every Linear, the projector included.
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return mlp


def pool_tokens(y: Tensor, n_tokens: int, depth: int) -> Tensor:
    """Average-pool square-grid target tokens (N, T', E) onto the backbone's square token grid (N, T, E).

    In the papers the encoder grid equals the backbone grid (DINOv2 16×16 = 256 tokens = SiT-XL/2 on 32×32
    latents = LightningDiT/1 on 16×16), so this is a no-op there. On small profiles the encoder's patch grid
    matches the *latent* grid while a patch-2 backbone has 4× fewer tokens; each backbone token then aligns
    with the mean of the encoder tokens it covers (decision: docs/decisions.md).
    """
    src, dst = math.isqrt(y.shape[1]), math.isqrt(n_tokens)
    if src * src != y.shape[1] or dst * dst != n_tokens or src % dst:
        raise ValueError(f"repa: backbone has {n_tokens} tokens after block {depth} but the target has "
                         f"{y.shape[1]}; token grids must be squares and the target grid a multiple of the backbone's")
    grid = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], src, src)   # (N, E, s, s)
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid.float(), dst)   # (N, E, d, d)
    return pooled.flatten(2).transpose(1, 2).to(y.dtype)                  # (N, T, E)


@LOSSES.register("flow")
class FlowLoss(Loss):
    """Velocity MSE with optional group weights, per-group means, cosine term, REPA and ReDi DINO-drop.

    Args:
        groups: latent channel groups (dependency)
        group_weights: {group: weight}, unnamed groups 1. Without per_group_mean (SFD, docs/methods.md §6.5):
            per-element error × its group's weight, then the mean over ALL elements (SFD semantic 2.0).
        per_group_mean: ReDi (docs/methods.md §4): L = Σ_g w_g · mean over group g's own elements.
        cosine_weight: weight of mean(1 − cos_c(v̂, u)) (LightningDiT/SFD 1.0), 0 = off.
        repa: None = off, or {depth (1-based block), weight, mode "cos" | "neg-cos", projector_dim
            (2048), target_key ("tokens")}; REPA: depth 8, 0.5, neg-cos; SFD: depth 2, 1.0, cos.
        drop: None = off, or ReDi's DINO-drop {group, prob}: with probability prob per batch the
            group's clean channels are zeroed and its loss weight is 0 for that batch.
        hidden_size: backbone width D (dependency, needed with repa)
        encoder_dim: target token width E (dependency, needed with repa)
    Terms: "mse", plus "cos" / "repa" when on, each already weighted; total = their sum.
    """

    def __init__(self, groups: Groups, group_weights: dict[str, float] | None = None,
                 per_group_mean: bool = False, cosine_weight: float = 0.0,
                 repa: dict[str, Any] | None = None, drop: dict[str, Any] | None = None,
                 hidden_size: int | None = None, encoder_dim: int | None = None) -> None:
        super().__init__()
        self.groups = groups
        weights = dict(group_weights or {})
        for name in weights:
            groups.index(name)                                  # KeyError naming valid groups
        self.weights = tuple(float(weights.get(n, 1.0)) for n in groups.names)
        self.per_group_mean = bool(per_group_mean)
        self.cosine_weight = float(cosine_weight)
        self._init_drop(drop)
        self._init_repa(repa, hidden_size, encoder_dim)

    def _init_drop(self, drop: dict[str, Any] | None) -> None:
        self.drop_group: int | None = None
        self.drop_prob = 0.0
        if drop is None:
            return
        cfg = DropCfg(**drop)
        if not 0.0 <= cfg.prob <= 1.0:
            raise ValueError(f"drop.prob must be in [0, 1], got {cfg.prob}")
        self.drop_group, self.drop_prob = self.groups.index(cfg.group), float(cfg.prob)

    def _init_repa(self, repa: dict[str, Any] | None, hidden_size: int | None, encoder_dim: int | None) -> None:
        self.projector: nn.Module | None = None
        if repa is None:
            return
        cfg = RepaCfg(**repa)          # checks mode and depth
        if not hidden_size or not encoder_dim:                 # the builder passes 0 when unknown
            raise ValueError("repa needs the hidden_size and encoder_dim dependencies")
        self.repa_depth, self.repa_weight = int(cfg.depth), float(cfg.weight)
        self.repa_mode, self.repa_key = cfg.mode, cfg.target_key
        self.hidden_at = (self.repa_depth,)
        self.projector = build_projector(hidden_size, int(cfg.projector_dim), encoder_dim)

    # -- ReDi DINO-drop ---------------------------------------------------------------------------
    def pre_path(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[Batch, dict[str, Any]]:
        """One coin per batch (ReDi `--dino-drop-prob`, docs/methods.md §4): zero the group's clean channels.

        No coin is drawn when prob is 0, so the random stream (x0, t) equals the run without drop.
        The coin stays a tensor so that no device sync is needed.
        """
        if self.drop_group is None or self.drop_prob == 0.0:
            return batch, {}
        x1 = batch.x1
        dropped = torch.rand((), device=x1.device, generator=generator) < self.drop_prob   # () bool
        sl = self.groups.slices[self.drop_group]
        x1 = x1.clone()
        x1[:, sl] = torch.where(dropped, torch.zeros_like(x1[:, sl]), x1[:, sl])
        return Batch(x1, batch.y, batch.aux), {"dropped": dropped}

    # -- terms ------------------------------------------------------------------------------------
    def _group_weights(self, ctx: LossCtx, like: Tensor) -> list[Tensor | float]:
        """Per-group weights for this batch; the dropped group's weight becomes 0 (as a tensor)."""
        w: list[Tensor | float] = list(self.weights)
        if "dropped" in ctx.state:
            g = self.drop_group
            w[g] = torch.where(ctx.state["dropped"], like.new_zeros(()), like.new_full((), w[g]))
        return w

    def _mse(self, pred: Tensor, target: Tensor, ctx: LossCtx) -> Tensor:
        err = (pred - target) ** 2                                         # (N, C, H, W)
        w = self._group_weights(ctx, err)
        if self.per_group_mean:
            per_sample = sum(wg * mean_flat(err[:, sl]) for wg, sl in zip(w, self.groups.slices))
            return per_sample.mean()
        if any(isinstance(wg, Tensor) or wg != 1.0 for wg in w):
            scale = torch.cat([torch.as_tensor(wg, dtype=err.dtype, device=err.device).reshape(1).expand(n)
                               for wg, n in zip(w, self.groups.sizes)])    # (C,)
            err = err * scale[None, :, None, None]
        return mean_flat(err).mean()

    def _repa(self, out: BackboneOut, ctx: LossCtx) -> Tensor:
        if self.repa_depth not in out.hidden:
            raise KeyError(f"backbone returned no hidden state for block {self.repa_depth}; "
                           f"got blocks {sorted(out.hidden)}")
        h = out.hidden[self.repa_depth]                                    # (N, T, D)
        if self.repa_key not in ctx.batch.aux:
            raise KeyError(f"repa target {self.repa_key!r} missing from batch.aux (keys: {sorted(ctx.batch.aux)})")
        y = ctx.batch.aux[self.repa_key]                                   # (N, T', E)
        if y.shape[1] != h.shape[1]:
            y = pool_tokens(y, h.shape[1], self.repa_depth)               # (N, T, E)
        z = self.projector(h)                                              # (N, T, E)
        return repa_alignment(z, y, self.repa_mode)

    def forward(self, out: BackboneOut, target: Tensor, ctx: LossCtx) -> LossOut:
        # SiT keeps learn_sigma outputs and discards the second half (docs/methods.md §2): use the first C.
        pred = out.out[:, :target.shape[1]]                                 # (N, C, H, W)
        terms = {"mse": self._mse(pred, target, ctx)}
        if self.cosine_weight:
            terms["cos"] = self.cosine_weight * cosine_loss(pred, target)
        if self.projector is not None:
            # SFD's train.py adds REPA only in the branch where the cosine term exists, so REPA on
            # with cosine off is computed and silently dropped (docs/methods.md §6.5 AMBIGUOUS). We do not
            # reproduce that: a configured REPA term is always part of the total.
            terms["repa"] = self.repa_weight * self._repa(out, ctx)
        return LossOut.of(terms)                                            # mse + cos + repa, in that order
