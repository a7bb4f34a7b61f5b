"""Small data types shared by every component (docs/architecture.md, "The method interface")."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from core.errors import NonFiniteError


@dataclass(frozen=True)
class Groups:
    """Named channel groups of a latent, e.g. texture [0:32) and semantic [32:48) for SFD.

    Groups are contiguous and in channel order. `decode` uses the group named "texture".
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sizes) or not self.names:
            raise ValueError(f"Groups needs one size per name, got {self.names} / {self.sizes}")

    @property
    def channels(self) -> int:
        return sum(self.sizes)

    @property
    def slices(self) -> tuple[slice, ...]:
        out, start = [], 0
        for n in self.sizes:
            out.append(slice(start, start + n))
            start += n
        return tuple(out)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"unknown channel group {name!r}; groups: {', '.join(self.names)}")
        return self.names.index(name)

    def slice_of(self, name: str) -> slice:
        return self.slices[self.index(name)]

    def expand(self, per_group: Tensor) -> Tensor:
        """(N, G) per-group values -> (N, C, 1, 1) per-channel values.

        Column copies on the values' device: a repeat_interleave with a tensor of repeats would copy the
        sizes to the GPU and read the output size back (two host syncs in every training step, and an
        error inside a CUDA graph capture; tests/test_contract.py checks every method's step for both)."""
        cols = [per_group[:, g:g + 1].expand(-1, n) for g, n in enumerate(self.sizes)]
        return torch.cat(cols, dim=1)[:, :, None, None]  # (N, C, 1, 1)


@dataclass
class Batch:
    """One training batch read from the cache.

    x1:  (N, C, H, W) normalised clean latent (t = 1 is data in this project's convention)
    y:   (N,) int64 class labels
    aux: extra targets, e.g. {"tokens": (N, T, D)} semantic-encoder patch tokens for REPA losses
    """

    x1: Tensor
    y: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.x1.to(device, non_blocking=True), self.y.to(device, non_blocking=True),
                     {k: v.to(device, non_blocking=True) for k, v in self.aux.items()})


@dataclass
class BackboneOut:
    """out: (N, C_out, H, W); hidden: {block (1-based): (N, T, D) tokens after that block}."""

    out: Tensor
    hidden: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class LossOut:
    """total: scalar to back-propagate; terms: scalars logged verbatim (e.g. {"mse": .., "cos": ..}; loss-defined names)."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, terms: dict[str, Tensor]) -> "LossOut":
        """The total as the terms' sum in their insertion order ((t1 + t2) + t3 ...: a fixed order, so the same bits
        on every call), the terms detached for logging."""
        parts = iter(terms.values())
        total = next(parts)
        for t in parts:
            total = total + t
        return cls(total=total, terms={k: v.detach() for k, v in terms.items()})


@dataclass
class ImageData:
    """A labelled image dataset held in memory as uint8 (the tiny/small profiles).

    train_x, test_x: (N, C, H, W) uint8 (C = 1 for Fashion-MNIST, 3 for RGB folders)
    train_y, test_y: (N,) int64
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


def to_unit(images_u8: Tensor) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the VAEs' input range)."""
    return images_u8.float().div(127.5).sub(1.0)


def nonfinite_rows(x: Tensor | np.ndarray) -> int:
    """How many rows (entries along dim 0: samples, feature vectors) hold a NaN or ±inf anywhere."""
    if isinstance(x, np.ndarray):
        return int((~np.isfinite(x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1))).any(1).sum())
    x = x.detach()
    if not (x.is_floating_point() or x.is_complex()):
        return 0                         # integer tensors (uint8 images) cannot hold NaN/inf
    return int((~torch.isfinite(x.reshape(x.shape[0], -1) if x.dim() else x.reshape(1, 1))).any(1).sum())


def check_finite(x: Tensor | np.ndarray, what: str, hint: str = "") -> None:
    """Raise NonFiniteError "<bad> of <rows> <what> hold NaN/inf<hint>" when any row of x is not finite.

    Everything that is scored passes here first: a NaN would otherwise become a number (to_uint8 turns it
    into black pixels, a Fréchet distance of NaN statistics is NaN or a plausible-looking float)."""
    bad = nonfinite_rows(x)
    if bad:
        rows = int(x.shape[0]) if x.ndim else 1
        raise NonFiniteError(f"{bad} of {rows} {what} hold NaN/inf{hint}")


def to_uint8(images: Tensor) -> Tensor:
    """float [-1, 1] -> uint8 [0, 255], clamped (docs/methods.md §5.2: clamp(127.5·x + 128)).

    NaN/inf raise NonFiniteError: clamp would silently turn NaN into 0 (a black pixel that gets scored).
    Callers that know more (which step, which chunk) check first with check_finite and a better message."""
    check_finite(images, "images given to to_uint8")
    return images.mul(127.5).add(128.0).clamp(0, 255).to(torch.uint8)
