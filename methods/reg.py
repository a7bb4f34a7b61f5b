"""REG, Representation Entanglement for Generation (https://arxiv.org/abs/2507.01467, docs/methods.md §14):
REPA on SiT plus the encoder's class token, noised with the latent (same t, own noise) and denoised jointly.

The class token is one more channel group ("cls", latent builder "vae-cls"), so the path, the schedule, every
sampler and CFG treat it like any other channels; this file adds only the loss.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from backbones.layers import token_channels, unpack_token
from core.registry import LOSSES
from core.types import BackboneOut, Groups, LossOut
from methods.base import Loss, LossCtx
from methods.losses import RepaCfg, build_projector, mean_flat, pool_tokens, repa_alignment

CLS_GROUP = "cls"


@LOSSES.register("reg")
class RegLoss(Loss):
    """total = mse(v̂, v) over the latent groups + cls_weight · mse(ĉ, c target) over the E real class-token
    elements + repa.weight · alignment over the 1 + T tokens (REG loss.py / train.py).

    Args:
        groups: latent channel groups (dependency); with a "cls" group its channels hold the packed class
            token (backbones.layers.pack_token) and the aux tokens carry it first (N, 1 + T, E).
        cls_weight: REG `--cls` 0.03; the class-token MSE is the mean over its E elements (padding excluded).
        repa: the REPA block (methods.losses.RepaCfg): depth 8, weight 0.5 (`--proj-coeff`), mode neg-cos.
        hidden_size, encoder_dim: backbone width D and encoder width E (dependencies).
    Without a "cls" group and with cls_weight 0 this is REPA's flow loss bit for bit (tests/test_reg.py).
    Terms: "mse", "cls" (when the group exists), "repa"; each already weighted; total = their sum.
    """

    def __init__(self, groups: Groups, repa: dict[str, Any], cls_weight: float = 0.03,
                 hidden_size: int | None = None, encoder_dim: int | None = None) -> None:
        super().__init__()
        self.groups, self.cls_weight = groups, float(cls_weight)
        self.has_cls = CLS_GROUP in groups.names
        cfg = RepaCfg(**repa)          # checks mode and depth
        if not hidden_size or not encoder_dim:                 # the builder passes 0 when unknown
            raise ValueError("loss reg needs the hidden_size and encoder_dim dependencies")
        if self.has_cls and groups.names[-1] != CLS_GROUP:
            raise ValueError(f"loss reg needs the {CLS_GROUP!r} group last; groups: {', '.join(groups.names)}")
        self.repa_depth, self.repa_weight = int(cfg.depth), float(cfg.weight)
        self.repa_mode, self.repa_key = cfg.mode, cfg.target_key
        self.encoder_dim = int(encoder_dim)
        self.hidden_at = (self.repa_depth,)
        self.projector = build_projector(hidden_size, int(cfg.projector_dim), encoder_dim)
        # channels of the latent groups (everything before "cls")
        self.latent_channels = groups.channels - (groups.sizes[-1] if self.has_cls else 0)

    def _cls_mse(self, pred: Tensor, target: Tensor) -> Tensor:
        """Mean over the E real elements of the packed class token, then over the batch (REG mean_flat)."""
        k, size = self.groups.sizes[-1], target.shape[-1]
        if token_channels(self.encoder_dim, size) != k:
            raise ValueError(f"loss reg: the {CLS_GROUP!r} group has {k} channel(s) but a {self.encoder_dim}-d "
                             f"token on {size}×{size} packs into {token_channels(self.encoder_dim, size)}")
        c_hat = unpack_token(pred[:, -k:], self.encoder_dim)               # (N, E)
        c_tgt = unpack_token(target[:, -k:], self.encoder_dim)             # (N, E)
        return mean_flat((c_hat - c_tgt) ** 2).mean()

    def _alignment(self, out: BackboneOut, ctx: LossCtx) -> Tensor:
        """REPA over every token the backbone returns: (1 + T) with the class token, T without."""
        if self.repa_depth not in out.hidden:
            raise KeyError(f"backbone returned no hidden state for block {self.repa_depth}; "
                           f"got blocks {sorted(out.hidden)}")
        h = out.hidden[self.repa_depth]                                    # (N, [1 +] T, D)
        if self.repa_key not in ctx.batch.aux:
            raise KeyError(f"repa target {self.repa_key!r} missing from batch.aux (keys: {sorted(ctx.batch.aux)})")
        y = ctx.batch.aux[self.repa_key]                                   # (N, [1 +] T', E)
        lead = 1 if self.has_cls else 0
        if self.has_cls and h.shape[1] - 1 != round((h.shape[1] - 1) ** 0.5) ** 2:
            raise ValueError(f"loss reg: the backbone returned {h.shape[1]} tokens, not 1 + a square grid; "
                             "build it with extra_token_dim = the encoder width (method.backbone.extra_token_dim)")
        if y.shape[1] != h.shape[1]:                                       # pool the patch part only
            patches = pool_tokens(y[:, lead:], h.shape[1] - lead, self.repa_depth)   # (N, T, E)
            y = torch.cat([y[:, :lead], patches], dim=1) if lead else patches
        return repa_alignment(self.projector(h), y, self.repa_mode)

    def forward(self, out: BackboneOut, target: Tensor, ctx: LossCtx) -> LossOut:
        pred = out.out[:, :target.shape[1]]                                 # (N, C, H, W)
        c = self.latent_channels
        err = (pred[:, :c] - target[:, :c]) ** 2 if self.has_cls else (pred - target) ** 2
        terms = {"mse": mean_flat(err).mean()}
        if self.has_cls:
            terms["cls"] = self.cls_weight * self._cls_mse(pred, target)
        terms["repa"] = self.repa_weight * self._alignment(out, ctx)
        return LossOut.of(terms)                                            # mse + cls + repa, in that order
