"""VA-VAE: the texture VAE's KL-autoencoder trained with the vision-foundation (VF) alignment loss of
LightningDiT (Yao et al., arXiv 2501.01423; docs/methods.md §5.1) against the semantic encoder's patch tokens.

The latent z is mapped by a bias-free 1×1 conv ("reverse_proj") to the encoder's width and pulled towards
its tokens with two margin losses; their sum is weighted adaptively by the ratio of gradient norms at the
encoder's last conv, times vf_weight. The artifact encodes/decodes exactly like texture-vae.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.registry import ENCODERS
from core.types import ImageData, to_unit
from encoders.texture_vae import TextureVAE

# ---------------------------------------------------------------------------------------------------
# Pure loss functions (docs/methods.md §5.1)
# ---------------------------------------------------------------------------------------------------


def vf_losses(z_proj: Tensor, feats: Tensor, m1: float = 0.5, m2: float = 0.25) -> tuple[Tensor, Tensor]:
    """Marginal cosine and marginal distance-matrix losses.

    Args:
        z_proj: (N, T, D) projected latent per position; feats: (N, T, D) encoder tokens on the same grid.
        m1: cosine margin: a position with cos(z', f) ≥ 1 − m1 costs nothing.
        m2: distance margin: a pair whose similarity differs by ≤ m2 between the two spaces costs nothing.
    Returns: (mean over positions of ReLU(1 − m1 − cos(z'_i, f_i)),
              mean over all position pairs (i, j) of ReLU(|cos(z'_i, z'_j) − cos(f_i, f_j)| − m2)).
    """
    z = F.normalize(z_proj, dim=-1)  # (N, T, D)
    f = F.normalize(feats, dim=-1)  # (N, T, D)
    cos = (z * f).sum(dim=-1)  # (N, T)
    loss_cos = F.relu(1.0 - m1 - cos).mean()
    sim_z = z @ z.transpose(1, 2)  # (N, T, T)
    sim_f = f @ f.transpose(1, 2)  # (N, T, T)
    loss_dist = F.relu((sim_z - sim_f).abs() - m2).mean()
    return loss_cos, loss_dist


def adaptive_weight(rec_loss: Tensor, vf_loss: Tensor, last_layer: Tensor,
                    eps: float = 1e-4, max_weight: float = 1e8) -> Tensor:
    """‖∇_w L_rec‖ / (‖∇_w L_vf‖ + eps) at the weight w of the encoder's last conv, detached.

    eps = 1e-4 and the clamp to [0, 1e8] are LightningDiT's: they keep the ratio finite when the VF
    gradient vanishes (every position inside the margins). The weighted VF gradient then has a norm of at
    most ‖∇_w L_rec‖, whatever the ratio.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(vf_loss, last_layer, retain_graph=True, allow_unused=True)[0]
    if g_vf is None:  # the VF loss does not depend on the layer at all
        return rec_loss.new_tensor(max_weight)
    return (g_rec.norm() / (g_vf.norm() + eps)).clamp(0.0, max_weight).detach()


def tokens_on_grid(tokens: Tensor, h: int, w: int) -> Tensor:
    """(N, T, D) row-major tokens -> (N, h·w, D); a square grid of another size is resized bilinearly."""
    n, t, d = tokens.shape
    if t == h * w:
        return tokens
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"semantic tokens ({t} per image) are not a square grid and do not match the "
                         f"{h}×{w} latent grid")
    grid = tokens.transpose(1, 2).reshape(n, d, side, side)  # (N, D, s, s)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)  # (N, D, h, w)
    return grid.flatten(2).transpose(1, 2)  # (N, h·w, D)


# ---------------------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------------------


@ENCODERS.register("vavae")
class VAVAE(TextureVAE):
    """Texture VAE + reverse_proj (1×1 conv, latent -> encoder width); encode/decode as TextureVAE."""

    kind = "vavae"
    requires: tuple[str, ...] = ("semantic-encoder",)

    def __init__(self, vae_config: dict[str, Any], fit_args: dict[str, Any]) -> None:
        super().__init__(vae_config, fit_args)
        # encoder_dim is measured from the semantic encoder in fit and stored with the fit args.
        self.reverse_proj = nn.Conv2d(self.latent_channels, int(fit_args["encoder_dim"]), 1, bias=False)

    @classmethod
    def fit(cls, data: ImageData, deps: dict[str, Any], device: torch.device | str, *,
            latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 32, 32),
            layers_per_block: int = 1, norm_num_groups: int = 8, mid_attention: bool = False,
            steps: int = 600, batch_size: int = 16, lr: float = 4e-3, kl_weight: float = 1e-6,
            vf_weight: float = 0.1, margin_cos: float = 0.5, margin_dist: float = 0.25,
            bf16: bool = True, seed: int = 0, eval_images: int = 2000) -> "VAVAE":
        """Train like texture-vae (same architecture knobs and defaults) plus the VF loss against
        deps["semantic-encoder"].tokens(images in [-1, 1]) -> (N, T, D), T row-major on the latent grid.

        Args: vf_weight 0.1 and margins 0.5 / 0.25 are the released model's final stage (docs/methods.md §5.1).
        """
        encoder = deps["semantic-encoder"]
        probe = to_unit(data.train_x[:2].to(device))  # (2, C, H, W)
        with torch.no_grad():
            encoder_dim = int(encoder.tokens(probe).shape[-1])
        fit_args = dict(latent_channels=latent_channels, block_out_channels=list(block_out_channels),
                        layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                        mid_attention=mid_attention, steps=steps, batch_size=batch_size, lr=lr,
                        kl_weight=kl_weight, vf_weight=vf_weight, margin_cos=margin_cos, margin_dist=margin_dist,
                        bf16=bf16, seed=seed, eval_images=eval_images, encoder_dim=encoder_dim)
        model = cls.seeded(data, fit_args)
        model.train_on(data, device, extra_loss=model._vf_term(encoder))
        model._summary.update(model.alignment(data.test_x[:eval_images], encoder))
        return model

    def _vf_term(self, encoder: Any):
        """The hook `train_on` calls each step: (z, images, rec_loss) -> (weighted VF loss, logged terms)."""
        a = self.fit_args

        def vf_term(z: Tensor, x: Tensor, rec: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                feats = encoder.tokens(x).float()  # (B, T, D), the frozen encoder in fp32
            h, w = z.shape[-2:]
            feats = tokens_on_grid(feats, h, w)  # (B, h·w, D)
            z_proj = self.reverse_proj(z.float()).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h·w, D)
            loss_cos, loss_dist = vf_losses(z_proj, feats, a["margin_cos"], a["margin_dist"])
            vf = loss_cos + loss_dist
            weight = adaptive_weight(rec, vf, self.vae.encoder.conv_out.weight)
            terms = {"vf_cos": loss_cos.detach(), "vf_dist": loss_dist.detach(), "vf_adaptive": weight}
            return a["vf_weight"] * weight * vf, terms

        return vf_term

    @torch.no_grad()
    def alignment(self, images_u8: Tensor, encoder: Any, batch_size: int = 500) -> dict[str, float]:
        """Mean cos(z'_i, f_i) over test positions (posterior mean latents): how well the latent is aligned."""
        total, count = 0.0, 0
        for i in range(0, images_u8.shape[0], batch_size):
            x = to_unit(images_u8[i:i + batch_size].to(self.device))  # (B, C, H, W)
            z = self.encode_mean(x)  # (B, c, h, w)
            feats = tokens_on_grid(encoder.tokens(x).float(), *z.shape[-2:])  # (B, h·w, D)
            z_proj = self.reverse_proj(z).flatten(2).transpose(1, 2)  # (B, h·w, D)
            total += float(F.cosine_similarity(z_proj, feats, dim=-1).sum())
            count += z_proj.shape[0] * z_proj.shape[1]
        return {"test_vf_cos": round(total / max(count, 1), 4)}
