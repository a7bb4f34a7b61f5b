"""Stand-ins for DINOv2 that carry semantics on small images: a supervised CNN, and the FD network as an oracle.

Why a supervised stand-in (docs/proxy.md, docs/metrics.md): SFD, ReDi and REPA assume an encoder whose features
hold semantics the generator does not learn quickly on its own; DINOv2's linear probe on ImageNet is far above
one on pixels. The self-supervised Mixer of encoders/semantic.py, trained for a minute on 2 CPU cores, probes at
0.80, *below* raw pixels (0.824), so it cannot test that premise. No self-supervised recipe reached pixels in the
budget (see SemanticEncoder's docstring); labels can, so this stand-in is a classifier. What that means for the
methods: REPA-style alignment (and SFD's / ReDi's semantic channels) then follows class-discriminative features,
closer to a classifier-guided prior than to DINOv2's label-free features. It is trained on the half of the
training split the FD network never sees, with a different head and pooling (mean of patch tokens vs. the FD
network's flattened 4×4 map); both are CNNs, so their features are more alike than DINOv2's and Inception's.

"fdnet-oracle" is the oracle: the FD network's own last feature map as tokens. A method aligned to the very
features it is scored in is an upper bound on what a prior can buy, never a default (docs/proxy.md).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.progress import track
from core.registry import ENCODERS
from core.seed import seeded_init
from core.types import ImageData, to_unit
from encoders.fdnet import FDNet
from encoders.semantic import TokenArtifact
from encoders.texture_vae import match_channels

def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TokenCNN(nn.Module):
    """Image (N, C, H, W) in [-1, 1] -> final-LayerNorm patch tokens (N, (H/p)·(W/p), dim).

    log2(p) stages of 3×3 conv-BN-ReLU + 2×2 max-pool (width doubling), one more conv at the token grid, a 1×1
    projection to `dim` and a LayerNorm per token (as a ViT's final norm): each token sees a 3·2^k-pixel
    neighbourhood, like a patch token after a few attention layers.
    """

    def __init__(self, in_channels: int, image_size: int, patch: int, dim: int, width: int) -> None:
        super().__init__()
        stages = int(math.log2(patch)) if patch > 0 else -1
        if patch < 2 or 2 ** stages != patch or image_size % patch:
            raise ValueError(f"patch must be a power of 2 (>= 2) dividing image_size, got patch={patch}, "
                             f"image_size={image_size}")
        if width < 1 or dim < 1:
            raise ValueError(f"width and dim must be >= 1, got width={width}, dim={dim}")
        self.grid, self.dim = (image_size // patch, image_size // patch), dim
        layers, c = [], in_channels
        for k in range(stages):
            layers += [_conv_bn_relu(c, width * 2 ** k), nn.MaxPool2d(2)]
            c = width * 2 ** k
        layers += [_conv_bn_relu(c, 2 * c), nn.Conv2d(2 * c, dim, 1)]
        self.body = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.body(x).flatten(2).transpose(1, 2))                # (N, T, dim), row-major grid


def train_supervised(net: TokenCNN, images_u8: Tensor, labels: Tensor, num_classes: int, *, steps: int,
                     batch_size: int, lr: float, weight_decay: float, label_smoothing: float, flips: bool,
                     bf16: bool, seed: int, device: torch.device | str) -> float:
    """Cross-entropy of a linear head on the mean-pooled tokens (AdamW, 20-step warm-up + cosine); returns the
    last loss. Batches and flips come from a CPU generator, so a fit is reproducible on any device."""
    gen = torch.Generator().manual_seed(seed)
    with seeded_init(seed + 1):
        head = nn.Linear(net.dim, num_classes).to(device)
    opt = torch.optim.AdamW([*net.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
    device_type = torch.device(device).type
    net.train()
    loss = torch.zeros(())
    for step in track("supervised encoder training", range(steps), values=lambda: {"loss": float(loss.detach())}):
        scale = min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(0, images_u8.shape[0], (batch_size,), generator=gen)
        flip = (torch.rand(batch_size, generator=gen) < 0.5) if flips else torch.zeros(batch_size, dtype=torch.bool)
        x = to_unit(images_u8[idx].to(device))                                    # (B, C, H, W)
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        with torch.autocast(device_type, torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(head(net(x).mean(1)), labels[idx].to(device), label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    return float(loss.detach())


@ENCODERS.register("supervised-encoder")
class SupervisedEncoder(TokenArtifact):
    """The default stand-in (docs/proxy.md): a CNN whose mean-pooled tokens were trained to classify.

    Exploratory measurements (ad-hoc scripts, not committed; the defaults' figure is reproduced by the prepare
    summary of `python -m benchmarks.run grid=sfd_vs_redi`) on Fashion-MNIST 32×32, even half (2-core Intel Xeon,
    1 thread, bf16 autocast, batch 128; linear probe on mean-pooled tokens, 20 000 training images, the 10 000 test
    images; raw pixels 0.824). Width 24, dim 64: 600 steps 0.886 (44 s), 1 200 steps 0.897 (95 s; with flips and
    label smoothing 0.1: 0.898, so both are off by default; EMA 0.99: no gain). Width 24, dim 128: 0.901. Width 32,
    dim 128 (the defaults): 0.905 (≈ 110-135 s; 0.904 in the main job's prepare). Mixer tokens (the SSL network)
    trained the same way: 0.874 at 1 000 steps. The test-set accuracy of a CNN on this half saturates near 0.92
    (the FD network's recipe at 1 500 steps), so 0.90 on mean-pooled tokens is close to what the minute-scale
    budget allows.
    """

    net_cls = TokenCNN

    @classmethod
    def fit(cls, data: ImageData, deps: dict, device: torch.device | str = "cpu", *, patch: int = 4,
            dim: int = 128, width: int = 32, steps: int = 1200, batch_size: int = 128, lr: float = 3e-3,
            weight_decay: float = 5e-4, label_smoothing: float = 0.0, flips: bool = False, bf16: bool = True,
            seed: int = 0, probe_images: int = 20000, train_half: int | None = None,
            cls_token: bool = False) -> "SupervisedEncoder":
        """Train with the labels of data.train_x (or of its even / odd half with train_half 0 / 1, so that
        the FD network can learn from the other half: docs/architecture.md, "Profiles")."""
        if train_half not in (None, 0, 1):
            raise ValueError(f"train_half must be None, 0 or 1, got {train_half!r}")
        if steps < 1 or batch_size < 1 or probe_images < 1:
            raise ValueError(f"steps, batch_size and probe_images must be >= 1, "
                             f"got {steps}, {batch_size}, {probe_images}")
        start = time.perf_counter()
        config = dict(in_channels=data.channels, image_size=data.image_size, patch=patch, dim=dim, width=width)
        with seeded_init(seed):
            net = TokenCNN(**config).to(device)
        half = slice(None) if train_half is None else slice(train_half, None, 2)
        final_loss = train_supervised(net, data.train_x[half], data.train_y[half], data.num_classes, steps=steps,
                                      batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                                      label_smoothing=label_smoothing, flips=flips, bf16=bf16, seed=seed,
                                      device=device)
        return cls.trained(net, config, cls_token, "supervised-encoder", data, probe_images, device, start, final_loss)


class FDNetTokenNet(nn.Module):
    """The FD network's convolutional stages up to its last full-resolution map -> LayerNorm'd tokens (N, T, F)."""

    def __init__(self, image_channels: int, image_size: int, num_classes: int, width: int, feature_dim: int) -> None:
        super().__init__()
        self.fdnet = FDNet(image_channels, image_size, num_classes, width, feature_dim)
        self.grid = (image_size // 4, image_size // 4)                             # two 2× pools before the map
        self.dim = 4 * width

    def forward(self, x: Tensor) -> Tensor:
        h = self.fdnet.stages[:-1](match_channels(x, self.fdnet.image_channels))   # (N, 4w, S/4, S/4)
        h = h.flatten(2).transpose(1, 2)                                           # (N, T, 4w)
        return F.layer_norm(h, (h.shape[-1],))


@ENCODERS.register("fdnet-oracle")
class FDNetTokens(TokenArtifact):
    """ORACLE, an upper bound, never a default: the FD network's own last feature map as patch tokens.

    The FD features the metric compares are pooled from this map (encoders/fdnet.py), so a method aligned to
    these tokens is aligned to the ruler it is measured with. Nothing is trained: `fit` copies the profile's FD
    network (the `fd-net` artifact, trained on its own half of the split). The training knobs a profile sets for
    the slot (`train_half`, `steps`) are accepted so that one grid axis can swap the slot's class
    (grid=prior_strength); they do not apply, and the summary lists them under `not_applicable`.
    """

    net_cls = FDNetTokenNet
    requires = ("fd-net",)

    @classmethod
    def fit(cls, data: ImageData, deps: dict, device: torch.device | str = "cpu", *, patch: int = 4,
            probe_images: int = 20000, train_half: int | None = None, steps: int | None = None,
            cls_token: bool = False) -> "FDNetTokens":
        start = time.perf_counter()
        fdnet = deps["fd-net"]
        if patch != 4:
            raise ValueError(f"fdnet-oracle: the FD network's map is on a {fdnet.image_size // 4}-cell grid "
                             f"(image / 4); patch must be 4 (the texture VAE's factor), got {patch}")
        config = {k: fdnet.config[k] for k in ("image_channels", "image_size", "num_classes", "width", "feature_dim")}
        net = FDNetTokenNet(**config).to(device)
        net.fdnet.load_state_dict(fdnet.state_dict())
        encoder = cls(net, {**config, **({"cls_token": True} if cls_token else {})}, {})
        encoder._summary = dict(kind="fdnet-oracle", oracle=True, **encoder.probe_summary(data, probe_images, device),
                                not_applicable={k: v for k, v in dict(train_half=train_half, steps=steps).items()
                                                if v is not None},
                                seconds=round(time.perf_counter() - start, 1))
        return encoder
