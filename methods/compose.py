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
    last_nfe: int = 0           # model calls per sample in the last `sample` (a batched CFG forward is one call)

    def losses(self, model: nn.Module, batch, generator: torch.Generator | None = None) -> LossOut:
        return training_losses(model, batch, self.schedule, self.loss, generator)

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, y: torch.Tensor, *, guidance: Any = "default",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate noise (N,C,H,W) to clean normalised latents with `model` (a backbone).

        Counts the model calls here, whatever the sampler (`last_nfe`): the evaluation protocol records a
        measured NFE for every sampler, including one that keeps no count of its own."""
        calls = 0

        def model_fn(x, t, labels):
            nonlocal calls
            calls += 1
            return model(x, t, labels).out

        g = self.guidance if guidance == "default" else guidance
        out = self.sampler(model_fn, noise, y, schedule=self.schedule, guidance=g, generator=generator)
        self.last_nfe = calls
        return out


def _build(registry: Registry, cfg: dict, kind: str, deps: dict[str, Any]) -> Any:
    """Build cfg["name"] from registry, its keys checked first; `Registry.wire` passes it only the
    dependencies its constructor declares (the one wiring rule, guidance's `null_label` included)."""
    if "name" not in cfg:
        raise ConfigError(f"method.{kind} needs a 'name'; valid: {', '.join(registry.names())}")
    try:
        ctor = registry.get(cfg["name"])
    except KeyError as e:
        raise ConfigError(f"method.{kind}: {e.args[0]}") from None
    check_keys(f"method.{kind} {cfg['name']!r}", ctor, cfg, deps=tuple(deps))
    return registry.wire(cfg, **deps)


def sampler_families(name: str) -> tuple[str, ...]:
    """The schedule families the registered sampler `name` declares it integrates (its `families`)."""
    try:
        ctor = SAMPLERS.get(name)
    except KeyError as e:
        raise ConfigError(f"method.sampler: {e.args[0]}") from None
    fams = getattr(ctor, "families", None)
    if not fams:
        raise ConfigError(f"method.sampler {name!r} declares no `families`; set e.g. `families = (\"flow\",)` on "
                          f"the class to the schedule families it can integrate (docs/adding_a_method.md)")
    return tuple(fams)


def samplers_for(family: str) -> list[str]:
    """Registered samplers that declare the schedule family `family`."""
    return [n for n in SAMPLERS.names() if family in (getattr(SAMPLERS.get(n), "families", None) or ())]


def check_pairing(schedule_name: str, family: str, sampler_name: str, where: str = "method") -> None:
    """ConfigError unless sampler `sampler_name` can integrate a schedule of `family` (fair by construction)."""
    if family not in sampler_families(sampler_name):
        raise ConfigError(f"{where}.sampler {sampler_name!r} cannot integrate {where}.schedule {schedule_name!r} "
                          f"(family {family!r}; the sampler integrates {', '.join(sampler_families(sampler_name))}); "
                          f"valid samplers for family {family!r}: {', '.join(samplers_for(family)) or 'none'}")


def sampler_config(sampler_cfg: dict, overrides: dict | None, family: str) -> dict:
    """The sampler a run evaluates with: the method's (paper) sampler, changed by eval-time overrides.

    A profile says e.g. `eval.sampler: {name: ode, solver: euler, steps: 32}` once for every method, so
    all methods are scored with the same sampler. If the named sampler integrates the method's schedule
    family (flow vs ddpm), it replaces the method's sampler; otherwise only the keys the method's own
    sampler accepts are merged (DiT's DDPM sampler takes `steps` and keeps its ancestral sampling).
    Every sampler parameter is declared by name (check_keys refuses **kwargs), so a merged key always
    reaches it. The flow samplers integrate `schedule.to_velocity` of the output, so a replacing sampler
    scores a data- or noise-prediction method correctly too.
    """
    out = dict(sampler_cfg)
    if not overrides:
        return out
    name = overrides.get("name")
    if name is not None and family in sampler_families(name):
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
    family = getattr(schedule, "family", None)
    if family is None:
        raise ConfigError(f"method.schedule {mcfg['schedule'].get('name')!r} declares no `family`; set e.g. "
                          f"`family = \"flow\"` on the class (docs/adding_a_method.md, what `family` means)")
    if "name" not in mcfg["sampler"]:
        raise ConfigError(f"method.sampler needs a 'name'; valid: {', '.join(SAMPLERS.names())}")
    check_pairing(mcfg["schedule"].get("name", "?"), family, mcfg["sampler"]["name"])
    scfg = sampler_config(mcfg["sampler"], sampler_overrides, family)
    sampler = _build(SAMPLERS, scfg, "sampler", deps)
    check = getattr(sampler, "check_schedule", None)
    if check is not None:
        try:
            check(schedule)
        except ValueError as e:
            raise ConfigError(f"method.sampler {scfg['name']!r} with method.schedule "
                              f"{mcfg['schedule'].get('name')!r}: {e}") from None
    gcfg = mcfg["guidance"] if guidance == "method" else guidance
    return Method(name=mcfg["name"], schedule=schedule, loss=loss, sampler=sampler,
                  guidance=build_guidance(gcfg, null_label=null_label) if gcfg else None)
