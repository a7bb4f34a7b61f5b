"""Texture VAE: a diffusers `AutoencoderKL` (the LDM KL-autoencoder, arXiv 2112.10752) trained in `prepare`
on the profile's images, or loaded from a pretrained folder / hub id (SD-VAE, paper scale).

Tiny profile: L1 reconstruction + KL only. No LPIPS (its VGG weights are a download) and no patch-GAN
(GAN training needs far more steps than prepare's budget of well under a minute on 2 CPU cores).
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from core.progress import track
from core.registry import ENCODERS
from core.seed import seeded_init
from core.types import ImageData, to_unit
from encoders.base import Artifact, batched

log = logging.getLogger(__name__)

# An extra loss hook for subclasses (VA-VAE's VF loss): (z, images, rec_loss) -> (loss to add, {name: detached scalar}).
ExtraLoss = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]

# ---------------------------------------------------------------------------------------------------
# Model builder (shared with encoders/vavae.py)
# ---------------------------------------------------------------------------------------------------


def autoencoder_config(image_channels: int, image_size: int, latent_channels: int,
                       block_out_channels: tuple[int, ...], layers_per_block: int,
                       norm_num_groups: int, mid_attention: bool) -> dict[str, Any]:
    """The AutoencoderKL constructor config; downsampling factor 2^(len(block_out_channels) - 1)."""
    blocks = tuple(int(c) for c in block_out_channels)
    if any(c % norm_num_groups for c in blocks):
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every block width {blocks}")
    return dict(in_channels=image_channels, out_channels=image_channels,
                down_block_types=["DownEncoderBlock2D"] * len(blocks),
                up_block_types=["UpDecoderBlock2D"] * len(blocks),
                block_out_channels=list(blocks), layers_per_block=layers_per_block,
                latent_channels=latent_channels, norm_num_groups=norm_num_groups, sample_size=image_size,
                mid_block_add_attention=mid_attention)


def _init_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Keep only AutoencoderKL constructor arguments (a diffusers config also holds `_class_name` etc.)."""
    params = inspect.signature(AutoencoderKL.__init__).parameters
    return {k: v for k, v in config.items() if k in params and k != "self"}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of lr: short runs end on a small step size."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches, reshuffled every epoch (sampling without replacement within an epoch)."""
    if n < batch_size:            # no full batch exists: the loop below would yield nothing, forever
        raise ValueError(f"{n} training images are fewer than the batch size {batch_size}: lower the artifact's "
                         f"batch_size (prepare.<kind>.batch_size) or use more images")
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


def match_channels(images: Tensor, channels: int) -> Tensor:
    """Grey <-> RGB: average 3 channels to 1, or repeat 1 channel to 3; other counts pass unchanged."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 3 and channels == 1:
        return images.float().mean(dim=1, keepdim=True)  # (N, 1, H, W)
    if images.shape[1] == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)  # (N, 3, H, W)
    raise ValueError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")


# ---------------------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------------------


@ENCODERS.register("texture-vae")
class TextureVAE(nn.Module, Artifact):
    """KL-autoencoder: images in [-1, 1] (N, C, H, W) <-> latents (N, c, H/f, W/f), f = `downsample`."""

    kind = "texture-vae"
    requires: tuple[str, ...] = ()

    def __init__(self, vae_config: dict[str, Any], fit_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.vae_config = _init_kwargs(vae_config)
        self.fit_args = dict(fit_args or {})
        self.vae = AutoencoderKL(**self.vae_config)
        self._summary: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["latent_channels"])

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def image_channels(self) -> int:
        return int(self.vae_config["in_channels"])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ inference (no gradients)
    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Posterior sample z (N, c, h, w) of images in [-1, 1] (N, C, H, W) (docs/methods.md §5.1: a sample, not the mean)."""
        x = match_channels(images, self.image_channels).float()
        return self.vae.encode(x).latent_dist.sample(generator=generator)

    @torch.no_grad()
    def encode_mean(self, images: Tensor) -> Tensor:
        """Posterior mean (N, c, h, w) of images in [-1, 1] (N, C, H, W)."""
        x = match_channels(images, self.image_channels).float()
        return self.vae.encode(x).latent_dist.mean

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents (N, c, h, w) -> images (N, C, H, W), nominally in [-1, 1] (not clamped; to_uint8 clamps)."""
        return self.vae.decode(z.float()).sample

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, data: ImageData, deps: dict[str, Any], device: torch.device | str, *,
            latent_channels: int = 4, block_out_channels: tuple[int, ...] = (16, 32, 32),
            layers_per_block: int = 1, norm_num_groups: int = 8, mid_attention: bool = False,
            steps: int = 700, batch_size: int = 16, lr: float = 4e-3, kl_weight: float = 1e-6,
            bf16: bool = True, seed: int = 0, eval_images: int = 2000) -> "TextureVAE":
        """Train on data.train_x with the LDM objective minus LPIPS/GAN (see the module docstring).

        Loss per image: sum over pixels of |x - x̂| + kl_weight · KL(q(z|x) ‖ N(0, I)) summed over latent
        entries, both averaged over the batch: the LDM normalisation, so kl_weight = 1e-6 means what it
        means there. Adam (scale-invariant) makes the summed loss harmless for the step size.
        Args: block_out_channels gives the widths per level; 3 levels: 32×32 -> 8×8 latents.
            bf16: autocast the forward passes to bfloat16 (weights and Adam stay fp32): 1.6-2.2× faster
            training steps on the 2-core CPU; inference (encode/decode/summary) always runs in fp32.
        """
        fit_args = dict(latent_channels=latent_channels, block_out_channels=list(block_out_channels),
                        layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                        mid_attention=mid_attention, steps=steps, batch_size=batch_size, lr=lr,
                        kl_weight=kl_weight, bf16=bf16, seed=seed, eval_images=eval_images)
        return cls.seeded(data, fit_args).train_on(data, device)

    @classmethod
    def seeded(cls, data: ImageData, fit_args: dict) -> "TextureVAE":
        """A fresh model for fit(): the AutoencoderKL config from fit_args, weights from fit_args["seed"]."""
        a = fit_args
        config = autoencoder_config(data.channels, data.image_size, a["latent_channels"], a["block_out_channels"],
                                    a["layers_per_block"], a["norm_num_groups"], a["mid_attention"])
        with seeded_init(a["seed"]):  # seeded, thread-safe, the caller's RNG state untouched
            return cls(config, fit_args)

    def train_on(self, data: ImageData, device: torch.device | str,
                 extra_loss: ExtraLoss | None = None) -> "TextureVAE":
        """The training loop of `fit` (self.fit_args); `extra_loss` adds a term (VA-VAE's VF loss)."""
        a = self.fit_args
        self.to(device).train()
        device_type = torch.device(device).type
        gen = torch.Generator().manual_seed(a["seed"])
        noise_gen = torch.Generator(device=device).manual_seed(a["seed"] + 1)  # posterior samples
        opt = torch.optim.Adam(self.parameters(), lr=a["lr"])
        batches = shuffled_batches(data.train_x.shape[0], a["batch_size"], gen)
        t0 = time.time()
        for step in track(f"{self.kind} training", range(a["steps"]),
                          values=lambda: {k: round(float(v), 4) for k, v in terms.items()}):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, a["steps"], a["lr"], warmup=min(50, a["steps"] // 10 + 1))
            x = to_unit(data.train_x[next(batches)].to(device))  # (B, C, H, W) in [-1, 1]
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=a["bf16"]):
                post = self.vae.encode(x).latent_dist
                z = post.sample(generator=noise_gen)  # (B, c, h, w)
                x_rec = self.vae.decode(z).sample.float()  # (B, C, H, W)
            rec = (x_rec - x).abs().flatten(1).sum(1).mean()
            kl = post.kl().float().mean()
            loss = rec + a["kl_weight"] * kl
            terms = {"rec": rec.detach(), "kl": kl.detach()}
            if extra_loss is not None:  # outside autocast: the hook chooses its own precision
                extra, extra_terms = extra_loss(z, x, rec)
                loss, terms = loss + extra, {**terms, **extra_terms}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == a["steps"] - 1:  # host syncs only here (cheap on a GPU too)
                values = {k: round(float(v), 4) for k, v in terms.items()}
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"{self.kind} fit: loss is {loss.item()} at step {step} ({values})")
        self.eval().requires_grad_(False)
        fit_seconds, t0 = time.time() - t0, time.time()
        recon = self.reconstruction_error(data.test_x[:a["eval_images"]])
        self._summary = {"fit_seconds": round(fit_seconds, 2), "eval_seconds": round(time.time() - t0, 2),
                         "steps": a["steps"], **recon}
        return self

    @torch.no_grad()
    def reconstruction_error(self, images_u8: Tensor) -> dict[str, float]:
        """Reconstruction through the posterior mean: MSE in [-1, 1] units and PSNR (dB, peak = the [-1, 1] range)."""
        recon = batched(lambda u8: self.decode(self.encode_mean(to_unit(u8))).clamp(-1, 1),
                        images_u8, batch_size=500, device=self.device)
        mse = float((recon - to_unit(images_u8)).pow(2).mean())
        return {"test_recon_mse": round(mse, 6), "test_psnr_db": round(10 * math.log10(4.0 / max(mse, 1e-12)), 3),
                "test_images": int(images_u8.shape[0])}

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "latent_channels": self.latent_channels, "downsample": self.downsample,
                "params": sum(p.numel() for p in self.parameters()), **self._summary}

    # ------------------------------------------------------------------ persistence (Artifact hooks)
    def artifact_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "vae": self.vae_config, "fit": self.fit_args}

    @classmethod
    def from_saved(cls, out_dir: str | Path, state: dict[str, Tensor] | None, config: dict, summary: dict,
                   device: torch.device | str) -> "TextureVAE":
        cls.check_kind(out_dir, config.get("kind", cls.kind))      # folders written without a kind load
        model = cls(config["vae"], config["fit"])
        model.load_state_dict(state)
        model._summary = {k: v for k, v in summary.items() if k not in ("kind",)}
        return model.to(device).eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, subfolder: str | None = None,
                        device: torch.device | str = "cpu") -> "TextureVAE":
        """Wrap a diffusers AutoencoderKL folder or hub id (e.g. stabilityai/sd-vae-ft-ema) for paper-scale runs."""
        try:
            vae = AutoencoderKL.from_pretrained(path_or_hub_id, subfolder=subfolder)
        except (OSError, ValueError) as e:
            where = f"{path_or_hub_id}" + (f"/{subfolder}" if subfolder else "")
            raise FileNotFoundError(
                f"no diffusers AutoencoderKL at {where!r} (a folder with config.json and "
                f"diffusion_pytorch_model.safetensors, or a hub id reachable online; HF_HUB_OFFLINE="
                f"{os.environ.get('HF_HUB_OFFLINE', '')!r}): {str(e).splitlines()[0]}") from e
        model = cls(dict(vae.config), {"pretrained": path_or_hub_id, "subfolder": subfolder})
        model.vae = vae
        model._summary = {"pretrained": path_or_hub_id}
        return model.to(device).eval().requires_grad_(False)
