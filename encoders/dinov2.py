"""Artifact "dinov2": timm DINOv2 (https://arxiv.org/abs/2304.07193, registers https://arxiv.org/abs/2309.16588)
for paper scale, any timm name (encoders/pretrained.py registers "dinov2-b14-reg" and "dinov2-l14", the two the
papers use). Same token interface as the stand-ins of encoders/semantic.py: `tokens(images in [-1, 1]) -> (N, T, D)`
final-normalised patch tokens, row-major over `grid`, and `encode_with_cls`.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.registry import ENCODERS
from core.types import ImageData
from encoders.base import Artifact

#################################################################################
#                       Artifact "dinov2" (timm, paper scale)                   #
#################################################################################

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_dinov2_weights(name: str, weights: str | None) -> str:
    """A local weights file for timm model `name`: `weights` itself, or the HF-hub file (cache or download).

    Never returns None: a missing file raises a one-line FileNotFoundError saying where it looked.
    """
    import timm
    from huggingface_hub import constants, hf_hub_download

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"unknown timm model {name!r}; DINOv2 names: {', '.join(timm.list_pretrained('*dinov2*'))}")
    repo = cfg.hf_hub_id
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"DINOv2 weights file {path} does not exist (encoder weights=...); get it with "
                                    f"`huggingface-cli download {repo} model.safetensors` (docs/paper_scale.md)")
        return str(path)
    try:
        return hf_hub_download(repo, "model.safetensors")
    except OSError as e:  # offline cache miss, no network, HTTP errors: all are OSError subclasses here
        raise FileNotFoundError(
            f"DINOv2 weights for {name!r} not found: looked for {repo}/model.safetensors in the HF cache "
            f"{constants.HF_HUB_CACHE} (HF_HUB_OFFLINE={int(constants.HF_HUB_OFFLINE)}, {type(e).__name__}); "
            f"download it online with `huggingface-cli download {repo} model.safetensors` or pass "
            f"weights=<local .safetensors/.pth file>") from None


@ENCODERS.register("dinov2")
class DinoV2Encoder(Artifact):
    """Frozen timm DINOv2 with the papers' preprocessing: [-1, 1] -> (x+1)/2 -> ImageNet mean/std ->
    bicubic resize to 224 -> patch tokens after the final norm, CLS and registers dropped -> (N, 256, D).

    Loads real weights or fails: there is no random-weight fallback. `save` writes only the name and the
    weights path (json), not a copy of the 350 MB checkpoint.
    """

    kind = "dinov2"
    requires: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, name: str, weights: str | None, img_size: int,
                 cls_token: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        self.name, self.weights, self.img_size = name, weights, img_size
        self.cls_token = bool(cls_token)
        patch = model.patch_embed.patch_size[0]
        self.grid = (img_size // patch, img_size // patch)
        self.dim = int(model.embed_dim)
        self._summary = dict(kind=self.kind, name=name, weights=weights, img_size=img_size,
                             params=sum(p.numel() for p in model.parameters()))

    @classmethod
    def from_pretrained(cls, name: str = "vit_base_patch14_reg4_dinov2.lvd142m", weights: str | None = None,
                        device: torch.device | str = "cpu", img_size: int = 224,
                        cls_token: bool = False) -> "DinoV2Encoder":
        """Build timm `name` at `img_size` (position embedding resampled by timm) with real weights."""
        import timm

        file = resolve_dinov2_weights(name, weights)
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file), img_size=img_size)
        return cls(model.to(device), name, weights, img_size, cls_token)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def tokens(self, images: Tensor) -> Tensor:
        """images (N, C, H, W) in [-1, 1], C in {1, 3} -> (N, T, D) `x_norm_patchtokens`; with `cls_token`
        (N, 1 + T, D), `x_norm_clstoken` first (REG's target layout, train.py)."""
        cls, patches = self.encode_with_cls(images)
        return torch.cat([cls[:, None], patches], dim=1) if self.cls_token else patches

    @torch.no_grad()
    def encode_with_cls(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (N, C, H, W) in [-1, 1] -> (`x_norm_clstoken` (N, D), `x_norm_patchtokens` (N, T, D)):
        token 0 and the tokens after the registers of the same final-normalised forward."""
        feats = self.features(images)                     # (N, prefix + T, D)
        return feats[:, 0], feats[:, self.model.num_prefix_tokens:]

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """images (N, C, H, W) in [-1, 1] -> every final-normalised token (N, prefix + T, D), class token first."""
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)                   # grey images: same value in R, G, B
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = ((x + 1) / 2 - mean) / std
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False)
        return self.model.forward_features(x)             # (N, prefix + T, D), after the final norm

    @classmethod
    def fit(cls, data: ImageData, deps: dict, device: torch.device | str = "cpu", *,
            name: str = "vit_base_patch14_reg4_dinov2.lvd142m", weights: str | None = None,
            img_size: int = 224, cls_token: bool = False) -> "DinoV2Encoder":
        """Nothing to train: load the pretrained model (the artifact interface's entry point).
        cls_token: `tokens` prepends `x_norm_clstoken` (REG)."""
        return cls.from_pretrained(name, weights, device, img_size, cls_token)

    # ------------------------------------------------------------------ persistence (Artifact hooks)
    stores_weights = False      # config.json records the name and weights path, not a copy of the checkpoint

    def artifact_config(self) -> dict:
        config = dict(name=self.name, weights=self.weights, img_size=self.img_size)
        if self.cls_token:    # only when set: configs written before the knob stay byte-identical
            config["cls_token"] = True
        return config

    @classmethod
    def from_saved(cls, out_dir: str | Path, state: dict[str, Tensor] | None, config: dict, summary: dict,
                   device: torch.device | str) -> "DinoV2Encoder":
        """Load the recorded model again; its summary is recomputed from it, not read back."""
        return cls.from_pretrained(config["name"], config["weights"], device, config["img_size"],
                                   config.get("cls_token", False))

    def summary(self) -> dict:
        return dict(self._summary)
