"""The notebook API's implementation: resolve a method preset by name and build its components (schedule, loss,
sampler, guidance) or a backbone sized for it. The public surface is benchmarks/api.py (docs/api.md).
"""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from benchmarks.build.components import build_backbone
from benchmarks.config.grid import axis_layer, available
from benchmarks.config.plugins import load_all
from core.config import structured, to_dict
from core.registry import BACKBONES
from core.types import Groups
from methods.compose import Method, build_method, build_schedule

__all__ = ["groups", "preset", "method", "schedule", "backbone", "presets"]


def groups(**sizes: int) -> Groups:
    """Channel groups in the order given, e.g. groups(texture=32, semantic=16) (SFD's 48 channels)."""
    return Groups(tuple(sizes), tuple(int(v) for v in sizes.values()))


def presets() -> list[str]:
    return available("method")


def preset(name: str, profile: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A method preset's `method` block, resolved (optionally with a profile's scaled values and a dotlist)."""
    load_all()
    layers = axis_layer("method", name, profile or "")
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
    load_all()
    sched = build_schedule(method_cfg, groups) if method_cfg else None
    cfg = {"backbone": {"name": name, **kwargs}, "method": {"backbone": (method_cfg or {}).get("backbone", {})}}
    if sched is None:
        return BACKBONES.build(cfg["backbone"], in_channels=in_channels, out_channels=in_channels,
                               input_size=input_size, num_classes=num_classes)
    return build_backbone(cfg, sched, (in_channels, input_size, input_size), num_classes)
