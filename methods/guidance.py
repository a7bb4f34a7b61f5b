"""Guidance at sampling time, one call signature for all kinds: classifier-free guidance (Ho & Salimans,
arXiv 2207.12598) with a guidance interval (Kynkäänniemi et al., arXiv 2404.07724) and a channel subset,
AutoGuidance (Karras et al., arXiv 2406.02507; SFD's headline, arXiv 2512.04926) and ReDi's
representation guidance (arXiv 2504.16064). Formulas: docs/methods.md §1, §3, §4, §5.4, §6.6, §11.11.

Every guidance object is called as `guidance(model_fn, x, t_model, t_groups, y, groups) -> out` with
model_fn(x (N,C,H,W), t_model (N,K), y (N,)) -> out (N,C_out,H,W). Times are in PROJECT time
(t = 0 noise, t = 1 data), one per channel group.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from core.registry import GUIDANCE  # in core/registry.py; importable from here as before
from core.types import Groups
from methods.base import ModelFn

# (model_fn, x, t_model, t_groups, y, groups) -> out (N, C_out, H, W)
Guidance = Callable[..., Tensor]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _parse_channels(channels: str | Sequence[int]) -> str | tuple[int, ...] | slice:
    """"all" | "start:stop" (half-open, e.g. "0:3") | a list of channel indices, checked at build time."""
    if channels == "all":
        return "all"
    if isinstance(channels, str):
        parts = channels.split(":")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            start, stop = int(parts[0]), int(parts[1])
            if start < stop:
                return slice(start, stop)
        raise ValueError(f"guidance channels {channels!r}: use 'all', 'start:stop' (e.g. '0:3') "
                         f"or a list of channel indices")
    idx = tuple(int(c) for c in channels)
    if not idx or min(idx) < 0:
        raise ValueError(f"guidance channels {list(channels)}: need a non-empty list of indices >= 0")
    return idx


def _channel_mask(channels: str | tuple[int, ...] | slice, c: int, c_out: int, device: torch.device) -> Tensor:
    """(1, C_out, 1, 1) bool: the output channels the guidance formula is applied to; "all" means the
    C latent channels, so learned-σ channels [C, 2C) stay conditional (DiT's non-legacy rule)."""
    mask = torch.zeros(c_out, dtype=torch.bool, device=device)
    if channels == "all":
        mask[:c] = True
    else:
        stop = channels.stop if isinstance(channels, slice) else max(channels) + 1
        if stop > c_out:
            raise ValueError(f"guidance channels reach index {stop - 1} but the model outputs {c_out} channels")
        mask[list(channels) if isinstance(channels, tuple) else channels] = True
    return mask[None, :, None, None]


def _per_channel(per_group: Tensor, groups: Groups | None, c_out: int) -> Tensor:
    """(N, G) per-group values -> (N, C_out, 1, 1); output channels past C (learned σ, C_out = 2C)
    take the value of channel c mod C. Without `groups` there must be one group (DDPM callers)."""
    if groups is None:
        if per_group.shape[1] != 1:
            raise ValueError("guidance needs `groups` when the schedule has several channel groups")
        return per_group[:, :, None, None].expand(-1, c_out, 1, 1)        # (N, C_out, 1, 1)
    per_c = groups.expand(per_group)                                      # (N, C, 1, 1)
    if c_out % groups.channels:
        raise ValueError(f"model output has {c_out} channels, not a multiple of the latent's {groups.channels}")
    return per_c.repeat(1, c_out // groups.channels, 1, 1)                # (N, C_out, 1, 1)


def _twice(t: Tensor) -> Tensor:
    return torch.cat([t, t])


# ----------------------------------------------------------------------------------------------
# Guidance kinds
# ----------------------------------------------------------------------------------------------

@GUIDANCE.register("cfg")
class ClassifierFreeGuidance:
    """out = uncond + scale·(cond − uncond) on the guided channels inside the interval, cond elsewhere.

    Conditional and unconditional branches run as ONE forward on [x; x] with labels [y; null].
    With scale 1, or when no group of any sample is inside the interval, only the conditional
    forward runs (so scale 1 equals the conditional output exactly, docs/methods.md §11.11).

    Args:
        scale: guidance scale s (DiT/SiT 1.5, REPA 1.8, ReDi 2.4, LightningDiT 6.7 / 10.0)
        null_label: the unconditional class index (a dependency, wired by name: backbone.null_label)
        interval: [low, high] in PROJECT time; group g is guided where low <= t_g <= high, each group
            with its own time (SFD `semfirst_infer_interval_mode: both`). Conversions:
            REPA guides t_REPA in [0, 0.7] (t_REPA = 1 − t) -> interval [0.3, 1.0];
            LightningDiT guides t >= `cfg_interval_start` = 0.125 (800 ep; 0.10 for 64 ep) -> [0.125, 1.0].
        channels: "all" (REPA, SFD) | "start:stop" | list of indices. DiT/SiT/LightningDiT legacy: "0:3";
            ReDi `cfg-vae`: "0:4". Learned-σ channels (C_out = 2C) stay conditional unless listed.
    """

    def __init__(self, scale: float, null_label: int, interval: Sequence[float] = (0.0, 1.0),
                 channels: str | Sequence[int] = "all") -> None:
        if len(interval) != 2 or not interval[0] <= interval[1]:
            raise ValueError(f"cfg interval must be [low, high] with low <= high, got {list(interval)}")
        self.scale, self.null_label = float(scale), int(null_label)
        self.interval = (float(interval[0]), float(interval[1]))
        self.channels = _parse_channels(channels)

    def __call__(self, model_fn: ModelFn, x: Tensor, t_model: Tensor, t_groups: Tensor, y: Tensor,
                 groups: Groups | None = None) -> Tensor:
        low, high = self.interval
        inside = (t_groups >= low) & (t_groups <= high)                      # (N, G) bool
        # One host read per model call, deliberately: outside the interval it saves the doubled forward.
        if self.scale == 1.0 or not bool(inside.any()):
            return model_fn(x, t_model, y)
        n = x.shape[0]
        out = model_fn(_twice(x), _twice(t_model), torch.cat([y, torch.full_like(y, self.null_label)]))
        cond, uncond = out[:n], out[n:]                                      # (N, C_out, H, W) each
        guided = uncond + self.scale * (cond - uncond)
        c_out = out.shape[1]
        use = _channel_mask(self.channels, x.shape[1], c_out, out.device) & _per_channel(inside, groups, c_out)
        return torch.where(use, guided, cond)


@GUIDANCE.register("autoguidance")
class AutoGuidance:
    """out = g + w·(f − g): f the main model, g a weaker guide model (SFD: a LightningDiT-B/1 SFD run's
    EMA weights at 70K-120K steps), both with the SAME conditional label; all channels (docs/methods.md §6.6).

    The caller sets `.guide` to the guide's model_fn before sampling (`guide_from` only records
    where the guide comes from, e.g. a run folder or checkpoint path, for the caller to load).

    Args:
        scale: w for every group (SFD-XL 80 ep: 1.6; 800 ep and XXL: 1.5)
        group_scales: {group name: w} overriding `scale` per group (SFD's w_sem, w_tex)
        guide_from: where the guide's weights live (not read here)
    """

    def __init__(self, scale: float, group_scales: Mapping[str, float] | None = None,
                 guide_from: str | None = None) -> None:
        self.scale = float(scale)
        self.group_scales = {k: float(v) for k, v in (group_scales or {}).items()}
        self.guide_from = guide_from
        self.guide: ModelFn | None = None

    def _scales(self, groups: Groups | None, n_groups: int) -> list[float]:
        if groups is None:
            if self.group_scales:
                raise ValueError("autoguidance group_scales need `groups`")
            return [self.scale] * n_groups
        unknown = sorted(set(self.group_scales) - set(groups.names))
        if unknown:
            raise KeyError(f"autoguidance group_scales name unknown group(s) {unknown}; "
                           f"groups: {', '.join(groups.names)}")
        return [self.group_scales.get(name, self.scale) for name in groups.names]

    def __call__(self, model_fn: ModelFn, x: Tensor, t_model: Tensor, t_groups: Tensor, y: Tensor,
                 groups: Groups | None = None) -> Tensor:
        scales = self._scales(groups, t_groups.shape[1])
        f = model_fn(x, t_model, y)
        if all(w == 1.0 for w in scales):
            return f
        if self.guide is None:
            raise RuntimeError("autoguidance needs a guide model: set `.guide` to the guide's "
                               "model_fn(x, t_model, y) (the weaker model's EMA weights)")
        g = self.guide(x, t_model, y)
        w = torch.tensor(scales, dtype=f.dtype, device=f.device).expand(x.shape[0], -1)   # (N, G)
        w = _per_channel(w, groups, f.shape[1])                                        # (N, C_out, 1, 1)
        # Groups with w = 1 take f itself, bit for bit.
        return torch.where(w == 1.0, f, g + w * (f - g))


@GUIDANCE.register("representation")
class RepresentationGuidance:
    """ReDi's representation guidance (docs/methods.md §4): the second branch sees the same x_t with the channels of
    `group` ZEROED in the noisy input and the same label; out = out_zeroed + w·(out_full − out_zeroed)
    on all channels. Both branches run as one forward on [x; x_zeroed].

    [AMBIGUOUS] ReDi trains by zeroing the CLEAN DINO target but guides by zeroing the NOISY input;
    this reproduces the code as written.

    Args:
        scale: w_rg (`rg_scale`; > 1 to guide)
        group: the channel group zeroed in the second branch (ReDi: the DINO-PCA channels)
    """

    def __init__(self, scale: float, group: str = "semantic") -> None:
        self.scale, self.group = float(scale), group

    def __call__(self, model_fn: ModelFn, x: Tensor, t_model: Tensor, t_groups: Tensor, y: Tensor,
                 groups: Groups | None = None) -> Tensor:
        if groups is None:
            raise ValueError("representation guidance needs `groups` to find the zeroed channels")
        sl = groups.slice_of(self.group)
        if self.scale == 1.0:
            return model_fn(x, t_model, y)
        n = x.shape[0]
        x_zeroed = x.clone()
        x_zeroed[:, sl] = 0
        out = model_fn(torch.cat([x, x_zeroed]), _twice(t_model), _twice(y))
        full, zeroed = out[:n], out[n:]                                     # (N, C_out, H, W) each
        return zeroed + self.scale * (full - zeroed)


@GUIDANCE.register("none")
def no_guidance() -> None:
    """The unguided sampler (lets a grid axis list `none` next to guided settings)."""
    return None


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------

def build_guidance(cfg: Mapping[str, Any] | None, null_label: int) -> Guidance | None:
    """Build a guidance object from `{"name": ..., **args}`; None (or name "none") means no guidance.

    Args:
        cfg: e.g. {"name": "cfg", "scale": 1.8, "interval": [0.3, 1.0]}
        null_label: the backbone's unconditional class index, passed to the kinds whose constructor
            declares it (`Registry.wire`, as every component gets its dependencies)
    """
    if cfg is None:
        return None
    if "name" not in cfg:
        raise ValueError(f"guidance config needs a 'name'; valid: {', '.join(GUIDANCE.names())}")
    return GUIDANCE.wire(cfg, null_label=null_label)      # KeyError listing the valid names
