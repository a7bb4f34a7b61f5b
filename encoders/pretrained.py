"""Pretrained tokenizers and encoders for paper scale (docs/architecture.md, "Profiles"): SD-VAE ft-ema / ft-mse (diffusers), the
LDM-format f16d32 autoencoders of SFD and LightningDiT (converted by encoders/ldm_vae.py), the two DINOv2
models the papers use (timm, through encoders/dinov2.py's "dinov2"), and SFD's latent stats files.

Each entry fills a slot through `prepare.<slot>.use=<entry>` and behaves like the stand-in it replaces. It loads
real weights or fails with one line saying where it looked and how to get the file: there is no fallback
to an untrained model. Latents stay raw (SD-VAE's 0.18215 is not applied): the latent builders normalise
every channel with its own stats (docs/methods.md §5.2, §6.1). Which files, from where: docs/paper_scale.md.
"""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from core.registry import ENCODERS
from core.types import ImageData
from encoders.ldm_vae import ldm_to_diffusers, read_checkpoint
from encoders.dinov2 import DinoV2Encoder
from encoders.texture_vae import TextureVAE, _init_kwargs

log = logging.getLogger(__name__)

DOCS = "docs/paper_scale.md"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


# ---------------------------------------------------------------------------------------------------
# Where the weights come from (one-line errors, docs/architecture.md, "Failure rules")
# ---------------------------------------------------------------------------------------------------


def _cache_note() -> str:
    from huggingface_hub import constants

    return f"HF cache {constants.HF_HUB_CACHE}, HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}"


def hub_file(repo: str, filename: str, kind: str) -> str:
    """The local path of `filename` in hub `repo`: from the HF cache, or downloaded when online."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except OSError as e:   # offline cache miss, no network, HTTP errors: all OSError subclasses
        raise FileNotFoundError(
            f"{kind}: {repo}/{filename} not found ({_cache_note()}, {type(e).__name__}); download it with "
            f"`huggingface-cli download {repo} {filename}` or pass weights=<local file> ({DOCS})") from None


def hub_folder(repo: str, subfolder: str | None, kind: str) -> Path:
    """The local snapshot folder of a diffusers model on the hub (config + safetensors weights only)."""
    from huggingface_hub import snapshot_download

    sub = f"{subfolder}/" if subfolder else ""
    try:
        return Path(snapshot_download(repo, allow_patterns=[f"{sub}config.json",
                                                            f"{sub}diffusion_pytorch_model.safetensors"]))
    except OSError as e:
        raise FileNotFoundError(
            f"{kind}: source {repo!r} is not a local folder, and hub repo {repo} is not available "
            f"({_cache_note()}, {type(e).__name__}); download it with `huggingface-cli download {repo} "
            f"--local-dir DIR` and pass source=DIR ({DOCS})") from None


def local_file(path: str, kind: str, how: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{kind}: weights file {file} does not exist; {how} ({DOCS})")
    return str(file)


def fingerprint(module: nn.Module) -> str:
    """sha256 of every tensor's name, shape, dtype and bytes: what the cached latents were made with."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# The common artifact: fit loads, save writes where from (not the weights), load checks they are the same
# ---------------------------------------------------------------------------------------------------


class PretrainedVAE(TextureVAE):
    """A frozen pretrained AutoencoderKL with texture-vae's interface (encode/encode_mean/decode in [-1, 1]).

    Subclasses implement `_load_vae(source) -> (AutoencoderKL, extra summary)`; `source` is the fit
    arguments naming the weights, stored in config.json. The cache holds only that, not a 300 MB copy.
    """

    kind = "pretrained-vae"
    requires: tuple[str, ...] = ()
    chunk = 32   # images per encoder/decoder call: prepare hands over 500 at a time, 256² ones OOM at that

    def __init__(self, vae: AutoencoderKL, source: dict[str, Any]) -> None:
        nn.Module.__init__(self)   # not TextureVAE.__init__: it would build (and randomly init) a second model
        self.vae = vae.eval().requires_grad_(False)
        self.vae_config = _init_kwargs(dict(vae.config))
        self.source = self.fit_args = dict(source)      # fit_args: texture-vae's name for what made it
        self._summary: dict[str, Any] = {}

    @classmethod
    def _load_vae(cls, source: dict[str, Any]) -> tuple[AutoencoderKL, dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def from_source(cls, source: dict[str, Any], device: torch.device | str = "cpu") -> "PretrainedVAE":
        vae, extra = cls._load_vae(source)
        model = cls(vae, source)
        model._summary = {**extra, "fingerprint": fingerprint(model.vae)}
        return model.to(device)

    @classmethod
    def _fit(cls, data: ImageData, device: torch.device | str, source: dict[str, Any],
             eval_images: int) -> "PretrainedVAE":
        """Load, then measure reconstruction on test images: a wrong conversion shows as a low PSNR."""
        model = cls.from_source(source, device)
        if eval_images > 0:
            model._summary.update(model.reconstruction_error(data.test_x[:eval_images]))
        log.info("%s: loaded %s %s", cls.kind, source, model._summary)
        return model

    # ------------------------------------------------------------------ inference in chunks
    def _chunked(self, fn, x: Tensor) -> Tensor:
        return torch.cat([fn(part) for part in x.split(self.chunk)])

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Posterior samples; a list of generators (one per image, diffusers' convention) is split with the
        chunks, so image i's noise comes from generator i whatever the chunk size."""
        if isinstance(generator, list):
            if len(generator) != images.shape[0]:
                raise ValueError(f"{len(generator)} generators for {images.shape[0]} images")
            return torch.cat([TextureVAE.encode(self, images[i:i + self.chunk], generator=generator[i:i + self.chunk])
                              for i in range(0, images.shape[0], self.chunk)])
        return self._chunked(lambda x: TextureVAE.encode(self, x, generator=generator), images)

    @torch.no_grad()
    def encode_mean(self, images: Tensor) -> Tensor:
        return self._chunked(lambda x: TextureVAE.encode_mean(self, x), images)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self._chunked(lambda x: TextureVAE.decode(self, x), z)

    # ------------------------------------------------------------------ persistence (Artifact hooks)
    stores_weights = False      # config.json records the source and a fingerprint, not a 300 MB copy

    def artifact_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, "vae": self.vae_config,
                "fingerprint": self._summary["fingerprint"]}

    @classmethod
    def from_saved(cls, out_dir: str | Path, state: dict[str, Tensor] | None, config: dict, summary: dict,
                   device: torch.device | str) -> "PretrainedVAE":
        """Reload from the recorded source; weights that changed since the cache was built are an error."""
        out_dir = Path(out_dir)
        cls.check_kind(out_dir, config["kind"])
        model = cls.from_source(config["source"], device)
        if model._summary["fingerprint"] != config["fingerprint"]:
            raise ValueError(f"{cls.kind}: the weights at {config['source']} changed since {out_dir} was built "
                             f"(fingerprint {model._summary['fingerprint']} != {config['fingerprint']}); delete "
                             f"that folder and the latent caches made from it to rebuild them")
        model._summary = {k: v for k, v in summary.items() if k not in ("kind", "latent_channels", "downsample",
                                                                        "params")}
        return model


# ---------------------------------------------------------------------------------------------------
# SD-VAE (diffusers folders): f8, 4 latent channels (docs/methods.md §0.3)
# ---------------------------------------------------------------------------------------------------


class DiffusersVAE(PretrainedVAE):
    """A diffusers AutoencoderKL: a hub id (HF cache, or downloaded when online) or a local folder."""

    hub_id = ""

    @classmethod
    def fit(cls, data: ImageData, deps: dict[str, Any], device: torch.device | str, *,
            source: str | None = None, subfolder: str | None = None, eval_images: int = 256) -> "DiffusersVAE":
        """Nothing to train. source: a local diffusers folder or a hub id; None = this entry's hub id.

        eval_images: test images for the reconstruction numbers in the prepare report (0 skips them).
        """
        return cls._fit(data, device, {"source": source or cls.hub_id, "subfolder": subfolder}, eval_images)

    @classmethod
    def _load_vae(cls, source: dict[str, Any]) -> tuple[AutoencoderKL, dict[str, Any]]:
        src, subfolder = source["source"], source["subfolder"]
        folder = Path(src).expanduser()
        if not folder.is_dir():
            if not _HUB_ID.fullmatch(src):
                raise FileNotFoundError(f"{cls.kind}: source {src!r} is neither a local folder nor a hub id "
                                        f"(org/name) ({DOCS})")
            folder = hub_folder(src, subfolder, cls.kind)
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder)
        except (OSError, ValueError) as e:
            where = folder / subfolder if subfolder else folder
            raise FileNotFoundError(
                f"{cls.kind}: no diffusers AutoencoderKL in {where} (config.json + "
                f"diffusion_pytorch_model.safetensors): {str(e).strip().splitlines()[0]} ({DOCS})") from None
        return vae.float(), {"source": src}


@ENCODERS.register("sd-vae-ft-ema")
class SDVAEftEMA(DiffusersVAE):
    """Stable Diffusion's VAE decoder fine-tuned with EMA weights: DiT's, SiT's, REPA's and ReDi's tokenizer."""

    kind, hub_id = "sd-vae-ft-ema", "stabilityai/sd-vae-ft-ema"


@ENCODERS.register("sd-vae-ft-mse")
class SDVAEftMSE(DiffusersVAE):
    """The same VAE with its decoder fine-tuned further with an MSE-weighted loss (smoother reconstructions)."""

    kind, hub_id = "sd-vae-ft-mse", "stabilityai/sd-vae-ft-mse"


# ---------------------------------------------------------------------------------------------------
# LDM-format f16d32 checkpoints: f16, 32 latent channels (docs/methods.md §5.1, §6.1)
# ---------------------------------------------------------------------------------------------------


class LDMVAE(PretrainedVAE):
    """An LDM-format KL-autoencoder checkpoint, converted to diffusers on load (encoders/ldm_vae.py)."""

    hub_repo, hub_file_name = "", ""

    @classmethod
    def fit(cls, data: ImageData, deps: dict[str, Any], device: torch.device | str, *,
            weights: str | None = None, trust_pickle: bool = False, eval_images: int = 256) -> "LDMVAE":
        """Nothing to train. weights: the local checkpoint file; None = this entry's file in the HF cache
        (downloaded when online). trust_pickle: allow torch.load to unpickle non-tensor objects.
        """
        return cls._fit(data, device, {"weights": weights, "trust_pickle": trust_pickle}, eval_images)

    @classmethod
    def _load_vae(cls, source: dict[str, Any]) -> tuple[AutoencoderKL, dict[str, Any]]:
        how = f"download {cls.hub_file_name} from https://huggingface.co/{cls.hub_repo}"
        path = (local_file(source["weights"], cls.kind, how) if source["weights"] is not None
                else hub_file(cls.hub_repo, cls.hub_file_name, cls.kind))
        vae, dropped = ldm_to_diffusers(read_checkpoint(path, source["trust_pickle"]))
        log.info("%s: %s converted; dropped %s", cls.kind, path, dropped)
        return vae, {"weights": path, "dropped": dropped}


@ENCODERS.register("ldm-f16d32")
class LDMf16d32(LDMVAE):
    """The plain LDM KL-VAE f16d32 (no VF loss): SFD's texture tokenizer and decoder (docs/methods.md §6.1)."""

    kind = "ldm-f16d32"
    hub_repo, hub_file_name = "hustvl/va-vae-imagenet256-experimental-variants", "ldm-imagenet256-f16d32-50ep.ckpt"


@ENCODERS.register("vavae-f16d32")
class VAVAEf16d32(LDMVAE):
    """LightningDiT's released VA-VAE (f16d32 aligned to DINOv2-L); its training-only reverse_proj is dropped."""

    kind = "vavae-f16d32"
    hub_repo, hub_file_name = "hustvl/vavae-imagenet256-f16d32-dinov2", "vavae-imagenet256-f16d32-dinov2.pt"


# ---------------------------------------------------------------------------------------------------
# DINOv2 entries: the "dinov2" artifact pinned to the timm names the papers use
# ---------------------------------------------------------------------------------------------------


class NamedDinoV2(DinoV2Encoder):
    """A DINOv2 entry pinned to one timm name: the entry is the model, so `fit` takes no `name` knob."""

    timm_name = ""

    @classmethod
    def fit(cls, data: ImageData, deps: dict, device: torch.device | str = "cpu", *,
            weights: str | None = None, img_size: int = 224, cls_token: bool = False) -> DinoV2Encoder:
        """Load `timm_name` with real weights: `weights` (a local .safetensors/.pth) or the HF-hub file.
        cls_token: `tokens` prepends `x_norm_clstoken`, REG's class token (docs/methods.md §14)."""
        return cls.from_pretrained(cls.timm_name, weights, device, img_size, cls_token)


@ENCODERS.register("dinov2-b14-reg")
class DinoV2B14Reg(NamedDinoV2):
    """ViT-B/14 with 4 registers, 768-d tokens: ReDi's PCA input, SFD's SemVAE input and REPA target
    (docs/methods.md §4, §6.1)."""

    kind, timm_name = "dinov2-b14-reg", "vit_base_patch14_reg4_dinov2.lvd142m"


@ENCODERS.register("dinov2-l14")
class DinoV2L14(NamedDinoV2):
    """ViT-L/14 without registers, 1024-d tokens: VA-VAE's VF-loss target (docs/methods.md §5.1)."""

    kind, timm_name = "dinov2-l14", "vit_large_patch14_dinov2.lvd142m"


# ---------------------------------------------------------------------------------------------------
# Latent statistics files (SFD / LightningDiT latents_stats.pt, latents_sv_stats.pt)
# ---------------------------------------------------------------------------------------------------


def load_latent_stats(path: str | Path, channels: int | None = None) -> tuple[Tensor, Tensor]:
    """A released per-channel stats file -> (mean, std), each float32 (1, C, 1, 1): the suite's format
    (prepare's stats.safetensors, `LatentBuilder.set_stats`).

    The files are `torch.save({"mean": (1, C, 1, 1), "std": (1, C, 1, 1)})` of 10k latents (docs/methods.md §5.2,
    LightningDiT's dataset code; SFD keeps that format for latents_sv_stats.pt). A dict with other keys,
    a shape that is not C values, or a std ≤ 0 is an error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"latent stats file {path} does not exist; SFD's come with `huggingface-cli download "
                                f"SFD-Project/SFD --include 'imagenet1k-latents/*'` ({DOCS})")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or not {"mean", "std"} <= set(obj):
        raise ValueError(f"{path}: expected a dict with 'mean' and 'std', got "
                         f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
    mean, std = (torch.as_tensor(obj[k]).float() for k in ("mean", "std"))
    c = mean.numel()
    if std.numel() != c or mean.squeeze().dim() > 1 or (channels is not None and c != channels):
        raise ValueError(f"{path}: mean {tuple(mean.shape)} / std {tuple(std.shape)} are not one value per "
                         f"channel{f' for {channels} channels' if channels is not None else ''}")
    mean, std = mean.reshape(1, c, 1, 1), std.reshape(1, c, 1, 1)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError(f"{path}: stats must be finite with std > 0")
    return mean, std
