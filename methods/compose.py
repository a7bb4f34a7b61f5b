"""Build a method (schedule + loss + sampler + guidance) from its config, by registry name only.

This is the notebook API's core too (see docs/api.md): every piece can be built and called directly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.config import ConfigError, check_keys
from core.registry import LOSSES, SAMPLERS, SCHEDULES, Registry
from core.types import Groups, LossOut
from methods.base import Loss, training_losses
from methods.guidance import build_guidance


@dataclass
class Method:
    """The three components plus the sampler the schedule implies (docs/architecture.md, "The method interface")."""

    name: str
    schedule: Any
    loss: Loss
    sampler: Any
    guidance: Any = None

    def losses(self, model: nn.Module, batch, generator: torch.Generator | None = None) -> LossOut:
        return training_losses(model, batch, self.schedule, self.loss, generator)

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, y: torch.Tensor, *, guidance: Any = "default",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate noise (N,C,H,W) to clean normalised latents with `model` (a backbone)."""
        def model_fn(x, t, labels):
            return model(x, t, labels).out

        g = self.guidance if guidance == "default" else guidance
        return self.sampler(model_fn, noise, y, schedule=self.schedule, guidance=g, generator=generator)


def _build(registry: Registry, cfg: dict, kind: str, deps: dict[str, Any]) -> Any:
    """Build cfg["name"] from registry passing only the dependencies its constructor accepts."""
    if "name" not in cfg:
        raise ConfigError(f"method.{kind} needs a 'name'; valid: {', '.join(registry.names())}")
    try:
        ctor = registry.get(cfg["name"])
    except KeyError as e:
        raise ConfigError(f"method.{kind}: {e.args[0]}") from None
    params = inspect.signature(ctor).parameters
    given = {k: v for k, v in deps.items() if k in params}
    check_keys(f"method.{kind} {cfg['name']!r}", ctor, cfg, deps=tuple(deps))
    return registry.build(cfg, **given)


def sampler_config(sampler_cfg: dict, overrides: dict | None, family: str) -> dict:
    """The sampler a run evaluates with: the method's (paper) sampler, changed by eval-time overrides.

    A profile says e.g. `eval.sampler: {name: ode, solver: euler, steps: 32}` once for every method, so
    all methods are scored with the same sampler. If the named sampler integrates the method's schedule
    family (flow vs ddpm), it replaces the method's sampler; otherwise only the keys the method's own
    sampler accepts are merged (DiT's DDPM sampler takes `steps` and keeps its ancestral sampling).
    """
    out = dict(sampler_cfg)
    if not overrides:
        return out
    name = overrides.get("name")
    if name is not None and family in getattr(SAMPLERS.get(name), "families", ()):
        return dict(overrides)
    params = inspect.signature(SAMPLERS.get(out["name"])).parameters
    out.update({k: v for k, v in overrides.items() if k in params and k != "name"})
    return out


def build_schedule(mcfg: dict, groups: Groups) -> Any:
    return _build(SCHEDULES, mcfg["schedule"], "schedule", {"groups": groups})


def build_method(mcfg: dict, *, groups: Groups, hidden_size: int = 0, encoder_dim: int = 0,
                 null_label: int = 0, sampler_overrides: dict | None = None,
                 guidance: dict | None | str = "method", schedule: Any = None) -> Method:
    """Args:
        mcfg: the run's `method` block (latent/schedule/loss/sampler/guidance dicts).
        groups: channel groups of the latent the method trains on.
        hidden_size, encoder_dim: backbone width and aux-token width (for projector heads).
        guidance: "method" uses mcfg["guidance"]; a dict or None overrides it (evaluation settings).
        schedule: an already built schedule (the backbone needs it first for its time inputs).
    """
    deps = {"groups": groups}
    schedule = schedule if schedule is not None else build_schedule(mcfg, groups)
    loss = _build(LOSSES, mcfg["loss"], "loss",
                  {**deps, "hidden_size": hidden_size, "encoder_dim": encoder_dim})
    sampler = _build(SAMPLERS, sampler_config(mcfg["sampler"], sampler_overrides, schedule.family), "sampler", deps)
    gcfg = mcfg["guidance"] if guidance == "method" else guidance
    return Method(name=mcfg["name"], schedule=schedule, loss=loss, sampler=sampler,
                  guidance=build_guidance(gcfg, null_label=null_label) if gcfg else None)
