"""The notebook API: build any preset's components by name and call them directly.

    from benchmarks import api
    sfd = api.method("sfd", groups=api.groups(texture=32, semantic=16), hidden_size=1152, encoder_dim=768)
    t = sfd.schedule.sample_t(8, device="cpu")                     # (8,) global time in [0, 1]
    t_groups = sfd.schedule.group_times(t * sfd.schedule.tau_max)  # (8, 2) per-group times
    xt, ut = sfd.schedule.path(x0, x1, t_groups)                    # path and velocity target
    x1_hat = sfd.sampler(my_model_fn, noise, y, schedule=sfd.schedule)   # any callable (x, t, y) -> v

This surface is kept stable (docs/api.md); everything else may move.
"""
from __future__ import annotations

from typing import Any

from benchmarks.grid import _axis_layer
from benchmarks.plugins import load_all
from core.config import structured, to_dict
from core.types import Groups
from methods.compose import Method, build_method, build_schedule

__all__ = ["groups", "preset", "method", "schedule", "backbone", "presets"]


def groups(**sizes: int) -> Groups:
    """Channel groups in the order given, e.g. groups(texture=32, semantic=16) (SFD's 48 channels)."""
    return Groups(tuple(sizes), tuple(int(v) for v in sizes.values()))


def presets() -> list[str]:
    from benchmarks.grid import available

    return available("method")


def preset(name: str, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A method preset's `method` block, resolved (optionally with a profile's scaled values and a dotlist)."""
    load_all()
    layers = _axis_layer("method", name, profile or "")
    from omegaconf import OmegaConf

    cfg = to_dict(structured(*layers, OmegaConf.from_dotlist(list(overrides))))
    return cfg["method"]


def method(name_or_cfg: str | dict, *, groups: Groups, hidden_size: int = 0, encoder_dim: int = 0,
           null_label: int = 1000, profile: str | None = None, guidance: Any = "method") -> Method:
    """Schedule, loss, sampler and guidance of a preset (by name) or of a `method` dict."""
    load_all()
    mcfg = preset(name_or_cfg, profile) if isinstance(name_or_cfg, str) else name_or_cfg
    return build_method(mcfg, groups=groups, hidden_size=hidden_size, encoder_dim=encoder_dim,
                        null_label=null_label, guidance=guidance)


def schedule(name_or_cfg: str | dict, *, groups: Groups) -> Any:
    load_all()
    mcfg = preset(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    return build_schedule(mcfg, groups)


def backbone(name: str, *, method_cfg: dict | None = None, in_channels: int, input_size: int,
             num_classes: int = 1000, groups: Groups | None = None, **kwargs: Any):
    """A backbone sized for a method: output width and number of time inputs come from its schedule."""
    from benchmarks.components import build_backbone

    load_all()
    sched = build_schedule(method_cfg, groups) if method_cfg else None
    cfg = {"backbone": {"name": name, **kwargs}, "method": {"backbone": (method_cfg or {}).get("backbone", {})}}
    if sched is None:
        from core.registry import BACKBONES

        return BACKBONES.build(cfg["backbone"], in_channels=in_channels, out_channels=in_channels,
                               input_size=input_size, num_classes=num_classes)
    return build_backbone(cfg, sched, (in_channels, input_size, input_size), num_classes)
