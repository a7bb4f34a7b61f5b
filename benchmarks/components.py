"""Assemble one run's pieces from its resolved config: data feed, latent builder, method, backbone.

Used by the training job, by `benchmarks.evaluate`-style tools and by the notebook API (docs/api.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.prepare import FD_NET, Prepared, build_latent, load_artifacts, load_latent_cache
from core.config import ConfigError, check_keys
from core.registry import BACKBONES
from core.seed import generator, seed_everything, step_seed
from core.types import Batch
from methods.compose import Method, build_method, build_schedule


class LatentFeed:
    """Batches drawn from the in-memory latent cache; batch k depends only on (seed, k), so a resumed
    run sees exactly the batches an uninterrupted one would. Flips (when cached) are chosen per sample
    with p = 0.5, the same choice for every key of a sample (spec §6.1)."""

    def __init__(self, tensors: dict[str, torch.Tensor], latent: Any, *, batch_size: int, seed: int,
                 flips: bool, device: torch.device) -> None:
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.flips = flips and "x1_flip" in tensors
        # Latents are normalised once here; aux targets stay in their stored dtype (fp16 tokens: half the
        # memory) and are cast per batch.
        keys = ["x1", *latent.aux_keys]
        norm = {"x1": lambda v: latent.normalize(v.float()), **{k: (lambda v: v) for k in latent.aux_keys}}
        self.data = {k: norm[k](tensors[k]).to(device) for k in keys}
        if self.flips:
            self.flipped = {k: norm[k](tensors[f"{k}_flip"]).to(device) for k in keys}
        self.y = tensors["y"].long().to(device)
        self.n = self.y.shape[0]

    def batch(self, step: int) -> Batch:
        g = generator(step_seed(self.seed, 0, step))
        idx = torch.randint(self.n, (self.batch_size,), generator=g).to(self.device)
        out = {k: v[idx] for k, v in self.data.items()}
        if self.flips:
            flip = (torch.rand(self.batch_size, generator=g) < 0.5).to(self.device)
            for k, v in self.flipped.items():
                mask = flip.view(-1, *([1] * (v.dim() - 1)))
                out[k] = torch.where(mask, v[idx], out[k])
        x1 = out.pop("x1")
        return Batch(x1=x1, y=self.y[idx], aux={k: v.float() for k, v in out.items()})


@dataclass
class RunParts:
    latent: Any
    method: Method
    model: nn.Module
    feed: LatentFeed
    fdnet: Any
    latent_shape: tuple[int, ...]
    num_classes: int


def build_backbone(cfg: dict, schedule: Any, latent_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    bcfg = {**cfg["backbone"], **cfg["method"]["backbone"]}
    if "name" not in bcfg:
        raise ConfigError(f"backbone needs a 'name'; valid: {', '.join(BACKBONES.names())}")
    try:
        ctor = BACKBONES.get(bcfg["name"])
    except KeyError as e:
        raise ConfigError(e.args[0]) from None
    deps = ("in_channels", "out_channels", "input_size", "num_classes", "time_inputs")
    check_keys(f"backbone {bcfg['name']!r}", ctor, bcfg, deps=deps)
    c, h = latent_shape[0], latent_shape[-1]
    return BACKBONES.build(bcfg, in_channels=c, out_channels=schedule.out_channels(c), input_size=h,
                           num_classes=num_classes, time_inputs=schedule.num_time_inputs)


def build_run(cfg: dict, prepared: Prepared, device: torch.device) -> RunParts:
    """Everything the training job needs, built from the config and the prepared caches."""
    arts = load_artifacts(prepared.artifact_dirs, device)
    fdnet = arts.pop(FD_NET)
    latent = build_latent(cfg, arts)
    tensors, mean, std = load_latent_cache(prepared.latent_dir)
    latent.set_stats(mean.to(device), std.to(device))
    shape = tuple(tensors["x1"].shape[1:])
    schedule = build_schedule(cfg["method"], latent.groups)
    seed_everything(cfg["seed"])        # weight init (backbone, projector heads) depends only on the seed
    model = build_backbone(cfg, schedule, shape, prepared.data.num_classes).to(device)
    enc_dim = int(tensors["tokens"].shape[-1]) if "tokens" in tensors else 0
    method = build_method(cfg["method"], groups=latent.groups, hidden_size=model.hidden_size,
                          encoder_dim=enc_dim, null_label=model.null_label, schedule=schedule,
                          sampler_overrides=cfg["eval"]["sampler"], guidance=cfg["eval"]["guidance"])
    method.loss.to(device)
    guide_from = getattr(method.guidance, "guide_from", None)
    if guide_from:                       # AutoGuidance: the guide is another run's EMA model
        from benchmarks.guides import load_guide

        method.guidance.guide = load_guide(guide_from, latent.groups, shape, prepared.data.num_classes, device)
    feed = LatentFeed(tensors, latent, batch_size=cfg["train"]["batch_size"], seed=cfg["seed"],
                      flips=cfg["data"]["flips"], device=device)
    return RunParts(latent=latent, method=method, model=model, feed=feed, fdnet=fdnet, latent_shape=shape,
                    num_classes=prepared.data.num_classes)
