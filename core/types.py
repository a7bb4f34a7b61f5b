"""Small data types shared by every component (DESIGN.md §2, STYLE.md §3)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


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
        """(N, G) per-group values -> (N, C, 1, 1) per-channel values."""
        reps = torch.tensor(self.sizes, device=per_group.device)
        return per_group.repeat_interleave(reps, dim=1)[:, :, None, None]  # (N, C, 1, 1)


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
    """total: scalar to back-propagate; terms: scalars logged verbatim (e.g. {"mse": .., "repa": ..})."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
