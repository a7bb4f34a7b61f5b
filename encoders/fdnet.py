"""FD network: a small CNN classifier trained with labels in `prepare`; its penultimate features replace
Inception's pool features for the offline profiles' Fréchet distance ("FD-fdnet", never called FID).

It is a different network from the semantic encoder, so a method aligned to that encoder is not scored
in its own feature space. `make_fidelity_extractor` exposes it to torch-fidelity 0.4 as a custom feature
extractor (FID / KID / precision-recall on "fd" features, Inception-Score-like on "logits").
"""
from __future__ import annotations

import copy
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.progress import track
from core.registry import ENCODERS
from core.seed import seeded_init
from core.types import ImageData, to_unit
from encoders.base import Artifact, batched
from encoders.texture_vae import lr_at, match_channels, shuffled_batches

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@ENCODERS.register("fd-net")
class FDNet(nn.Module, Artifact):
    """Three conv stages (each halving the side) -> 4×4 pool -> Linear -> ReLU features (F) -> Linear logits.

    Input: uint8 images (N, C, H, W); C may be 1 or 3 whatever the net was trained on (grey <-> RGB).
    """

    kind = "fd-net"
    requires: tuple[str, ...] = ()

    def __init__(self, image_channels: int, image_size: int, num_classes: int, width: int = 32,
                 feature_dim: int = 128, fit_args: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = dict(image_channels=image_channels, image_size=image_size, num_classes=num_classes,
                           width=width, feature_dim=feature_dim)
        self.fit_args = dict(fit_args or {})
        w = width
        self.stages = nn.Sequential(
            _conv_bn_relu(image_channels, w), nn.MaxPool2d(2),  # (N, w, S/2, S/2)
            _conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),  # (N, 2w, S/4, S/4)
            _conv_bn_relu(2 * w, 4 * w), nn.AdaptiveAvgPool2d(4),  # (N, 4w, 4, 4)
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * w, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, num_classes)
        self._summary: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    @property
    def image_channels(self) -> int:
        return int(self.config["image_channels"])

    @property
    def image_size(self) -> int:
        return int(self.config["image_size"])

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------------ forward
    def prepare_input(self, images_u8: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> float (N, C_net, H, W) in [-1, 1] on the net's device."""
        if images_u8.dtype != torch.uint8:
            raise TypeError(f"FDNet takes uint8 images (what torch-fidelity feeds), got {images_u8.dtype}")
        if tuple(images_u8.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"FDNet was trained on {self.image_size}×{self.image_size} images, "
                             f"got {tuple(images_u8.shape[-2:])}; resize before scoring")
        x = to_unit(images_u8.to(self.device))  # (N, C, H, W) in [-1, 1]
        return match_channels(x, self.image_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Float images (N, C_net, S, S) in [-1, 1] -> (features (N, F), logits (N, classes))."""
        feats = self.embed(self.stages(x))  # (N, F), after the ReLU
        return feats, self.head(feats)

    @torch.no_grad()
    def features(self, images_u8: Tensor, batch_size: int = 1000) -> Tensor:
        """uint8 (N, C, H, W) -> FD features (N, F) float32 on the CPU."""
        return batched(lambda u8: self(self.prepare_input(u8))[0].float(), images_u8, batch_size, self.device)

    @torch.no_grad()
    def logits(self, images_u8: Tensor, batch_size: int = 1000) -> Tensor:
        """uint8 (N, C, H, W) -> class logits (N, classes) float32 on the CPU."""
        return batched(lambda u8: self(self.prepare_input(u8))[1].float(), images_u8, batch_size, self.device)

    @torch.no_grad()
    def predict(self, images_u8: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> predicted labels (N,) int64, on the device of the input."""
        return self.logits(images_u8).argmax(dim=1).to(images_u8.device)

    def weights_hash(self) -> str:
        """Short sha1 of the weights: names the torch-fidelity extractor, so different nets never share a name."""
        h = hashlib.sha1()
        for k, v in sorted(self.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, data: ImageData, deps: dict[str, Any], device: torch.device | str, *,
            width: int = 24, feature_dim: int = 128, steps: int = 550, batch_size: int = 64,
            lr: float = 3e-3, weight_decay: float = 5e-4, train_half: int | None = None, bf16: bool = True,
            seed: int = 0) -> "FDNet":
        """Train with cross-entropy on data.train_x/train_y (AdamW, warm-up + cosine); summary() has test accuracy.

        Args:
            train_half: None uses every training image; 0 / 1 only the even / odd indices, so the FD net
                and the semantic encoder can learn from disjoint halves (docs/architecture.md, "Profiles").
            bf16: autocast the training forward passes (weights stay fp32); evaluation runs in fp32.
        """
        fit_args = dict(width=width, feature_dim=feature_dim, steps=steps, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, train_half=train_half, bf16=bf16, seed=seed)
        if train_half not in (None, 0, 1):
            raise ValueError(f"train_half must be None, 0 or 1, got {train_half!r}")
        keep = slice(None) if train_half is None else slice(train_half, None, 2)
        train_x, train_y = data.train_x[keep], data.train_y[keep]  # (N', C, H, W), (N',)
        with seeded_init(seed):  # seeded, thread-safe, the caller's RNG state untouched
            net = cls(data.channels, data.image_size, data.num_classes, width, feature_dim, fit_args)
        net.to(device).train()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        batches = shuffled_batches(train_x.shape[0], batch_size, gen)
        t0 = time.time()
        for step in track("fd-net training", range(steps), values=lambda: {"loss": round(loss.item(), 4)}):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1))
            idx = next(batches)
            x, y = net.prepare_input(train_x[idx]), train_y[idx].to(device)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits = net(x)[1]
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval().requires_grad_(False)
        fit_seconds, t0 = time.time() - t0, time.time()
        acc = float((net.predict(data.test_x) == data.test_y).float().mean())
        net._summary = {"fit_seconds": round(fit_seconds, 2), "eval_seconds": round(time.time() - t0, 2),
                        "steps": steps, "test_accuracy": round(acc, 4)}
        return net

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "feature_dim": self.feature_dim,
                "params": sum(p.numel() for p in self.parameters()), **self._summary}

    # ------------------------------------------------------------------ persistence (Artifact hooks)
    def artifact_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "net": self.config, "fit": self.fit_args}

    @classmethod
    def from_saved(cls, out_dir: str | Path, state: dict[str, Tensor] | None, config: dict, summary: dict,
                   device: torch.device | str) -> "FDNet":
        cls.check_kind(out_dir, config.get("kind"))
        net = cls(**config["net"], fit_args=config["fit"])
        net.load_state_dict(state)
        net._summary = {k: v for k, v in summary.items() if k != "kind"}
        return net.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# torch-fidelity custom feature extractor
# ---------------------------------------------------------------------------------------------------

FIDELITY_FEATURES = ("fd", "logits")  # "fd": penultimate ReLU features; "logits": for the Inception-Score analogue
_FIDELITY_CLASSES: dict[str, type] = {}  # name -> class, so repeated calls in a process register once


def make_fidelity_extractor(fdnet: FDNet) -> tuple[str, type]:
    """Register `fdnet` with torch-fidelity (once per process and weights) and return (name, class).

    Use as `calculate_metrics(..., feature_extractor=name, fid=True, kid=True, prc=True, cuda=False)`;
    fid/kid/prc read the "fd" features and isc reads "logits". torch-fidelity builds the class itself
    (`cls(name, features_list, **kwargs)`), so the class carries a frozen CPU copy of the net.
    """
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    name = f"fd-net-{fdnet.weights_hash()}"
    if name in _FIDELITY_CLASSES:
        return name, _FIDELITY_CLASSES[name]
    template = copy.deepcopy(fdnet).cpu().eval().requires_grad_(False)

    class FDNetFeatureExtractor(FeatureExtractorBase):
        """torch-fidelity view of one FD net: uint8 (B, 3, H, W) -> ("fd" (B, F), "logits" (B, classes))."""

        def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
            # kwargs: every calculate_metrics option (torch-fidelity passes them all); none concern this net.
            super().__init__(name, features_list)
            self.net = copy.deepcopy(template)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return FIDELITY_FEATURES

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return {"isc": "logits", "fid": "fd", "kid": "fd", "prc": "fd"}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False  # a few ms per batch: compiling would cost more than it saves

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 3, template.image_size, template.image_size, dtype=torch.uint8)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            feats, logits = self.net(self.net.prepare_input(x))  # (B, F), (B, classes)
            out = {"fd": feats.float(), "logits": logits.float()}
            return tuple(out[k] for k in self.features_list)

    FDNetFeatureExtractor.__name__ = FDNetFeatureExtractor.__qualname__ = f"FDNetFeatureExtractor_{name[7:]}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:  # another copy of this module (e.g. a reload) may have done it
        register_feature_extractor(name, FDNetFeatureExtractor)
    _FIDELITY_CLASSES[name] = FEATURE_EXTRACTORS_REGISTRY[name]
    return name, _FIDELITY_CLASSES[name]
