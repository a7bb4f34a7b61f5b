"""Assemble one run's pieces from its resolved config: data feed, latent builder, method, backbone.

Used by the training job, by `benchmarks.evaluate`-style tools and by the notebook API (docs/api.md).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf
from torch import nn

from benchmarks.data.prepare import FD_NET, Prepared, build_latent, load_artifacts, load_latent_cache
from benchmarks.data.shards import ShardedArray
from core.config import ConfigError, check_keys
from core.registry import BACKBONES
from core.rundir import RunDir
from core.seed import generator, seed_everything, step_seed
from core.types import Batch, Groups
from methods.compose import Method, build_method, build_schedule


class LatentFeed:
    """Batches drawn from the in-memory latent cache; batch k depends only on (seed, k), so a resumed
    run sees exactly the batches an uninterrupted one would. Flips (when cached) are chosen per sample
    with p = 0.5, the same choice for every key of a sample (docs/methods.md §6.1).

    On CUDA the cache lives on the GPU when it fits in `gpu_fraction` of the free memory (one gather
    kernel per key per step, nothing crosses PCIe but the indices); otherwise it stays in host memory,
    each batch is gathered there and copied from pinned memory without blocking the host.
    A sharded cache (memory-mapped `ShardedArray`s from a streamed dataset, benchmarks/extract.py) gets a
    `ShardedLatentFeed` instead, chosen here, with the same draws and so the same batches.
    """

    def __new__(cls, tensors: dict[str, Any], *args: Any, **kwargs: Any) -> "LatentFeed":
        if cls is LatentFeed and isinstance(tensors["x1"], ShardedArray):
            cls = ShardedLatentFeed
        return super().__new__(cls)

    def __init__(self, tensors: dict[str, torch.Tensor], latent: Any, *, batch_size: int, seed: int,
                 flips: bool, device: torch.device, gpu_fraction: float = 0.5) -> None:
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.flips = flips and "x1_flip" in tensors
        # Latents are normalised once here; aux targets stay in their stored dtype (fp16 tokens: half the
        # memory) and are cast per batch.
        keys = ["x1", *latent.aux_keys]
        norm = {"x1": lambda v: latent.normalize(v.float()), **{k: (lambda v: v) for k in latent.aux_keys}}
        nbytes = sum(tensors[k].numel() * (4 if k == "x1" else tensors[k].element_size()) for k in keys)
        nbytes *= 2 if self.flips else 1
        self.store = device
        if device.type == "cuda" and nbytes > gpu_fraction * torch.cuda.mem_get_info(device)[0]:
            self.store = torch.device("cpu")
        self.data = {k: norm[k](tensors[k]).to(self.store) for k in keys}
        if self.flips:
            self.flipped = {k: norm[k](tensors[f"{k}_flip"]).to(self.store) for k in keys}
        self.y = tensors["y"].long().to(self.store)
        self.n = self.y.shape[0]

    def draw(self, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(row indices (B,), flip choices (B,) bool or None) of batch `step` on the CPU, sliced to `rows`:
        the whole global batch is drawn, so a rank taking its slice sees its part of the same batch."""
        g = generator(step_seed(self.seed, 0, step))
        idx = torch.randint(self.n, (self.batch_size,), generator=g)
        flip = torch.rand(self.batch_size, generator=g) < 0.5 if self.flips else None
        return idx[rows], None if flip is None else flip[rows]

    def batch(self, step: int, rows: slice = slice(None)) -> Batch:
        """Batch `step` (the global batch, or its rows `rows`, e.g. one rank's share) on the device."""
        idx, flip = self.draw(step, rows)
        idx = self._to(idx, self.store)
        out = {k: v[idx] for k, v in self.data.items()}
        if flip is not None:
            flip = self._to(flip, self.store)
            for k, v in self.flipped.items():
                mask = flip.view(-1, *([1] * (v.dim() - 1)))
                out[k] = torch.where(mask, v[idx], out[k])
        out = {k: self._to(v, self.device) for k, v in out.items()}
        x1 = out.pop("x1")
        return Batch(x1=x1, y=self._to(self.y[idx], self.device), aux={k: v.float() for k, v in out.items()})

    @staticmethod
    def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Host -> GPU through pinned memory without blocking: the hot loop never waits for the GPU to
        drain (indices are drawn on the CPU so every device sees the same batches)."""
        if device.type == "cuda" and t.device.type == "cpu":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)


class ShardedLatentFeed(LatentFeed):
    """LatentFeed over a sharded cache too large to load: each batch's rows are gathered on the host from
    the memory-mapped shards, only the variant a sample uses (image or flip), straight into pinned memory,
    copied to the device without blocking, and normalised / cast there. Same `draw` as LatentFeed, so
    the same batches. `prefetch` (default: on CUDA) gathers step k + 1 in a background thread while step
    k trains; the result is the same, since a batch depends only on (seed, step)."""

    def __init__(self, tensors: dict[str, Any], latent: Any, *, batch_size: int, seed: int, flips: bool,
                 device: torch.device, gpu_fraction: float = 0.5, prefetch: bool | None = None) -> None:
        self.batch_size, self.seed, self.device, self.latent = batch_size, seed, device, latent
        self.flips = flips and "x1_flip" in tensors
        keys = ["x1", *latent.aux_keys]
        self.data = {k: tensors[k] for k in keys}                                  # ShardedArray each
        self.flipped = {k: tensors[f"{k}_flip"] for k in keys} if self.flips else {}
        self.y = tensors["y"].long()
        self.n = self.y.shape[0]
        self.store = torch.device("cpu")
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(1) if (self.pin if prefetch is None else prefetch) else None
        self._next: tuple[tuple, Future] | None = None

    def gather(self, step: int, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
        """Host tensors of batch `step`: {x1 raw, aux in their stored dtype, y}, pinned on CUDA."""
        idx, flip = self.draw(step, rows)
        sel = idx.numpy()
        out = {}
        for k, arr in self.data.items():
            buf = torch.empty((sel.shape[0], *arr.shape[1:]), dtype=arr.dtype, pin_memory=self.pin)
            view = buf.numpy()                                                      # (B, ...) shares buf
            if flip is None:
                arr.take(sel, out=view)
            else:
                f = flip.numpy()
                view[~f] = arr.take(sel[~f])
                view[f] = self.flipped[k].take(sel[f])
            out[k] = buf
        out["y"] = self.y[idx].pin_memory() if self.pin else self.y[idx]
        return out

    def batch(self, step: int, rows: slice = slice(None)) -> Batch:
        key = (step, rows.start, rows.stop, rows.step)
        host = self._next[1].result() if self._next is not None and self._next[0] == key else self.gather(step, rows)
        if self._pool is not None:
            self._next = ((step + 1, *key[1:]), self._pool.submit(self.gather, step + 1, rows))
        dev = {k: v.to(self.device, non_blocking=self.pin) for k, v in host.items()}
        x1, y = self.latent.normalize(dev.pop("x1").float()), dev.pop("y")
        return Batch(x1=x1, y=y, aux={k: v.float() for k, v in dev.items()})


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
    check_keys(f"backbone {bcfg['name']!r}", ctor, bcfg, deps=deps, allow_var_keyword=True)
    c, h = latent_shape[0], latent_shape[-1]
    return BACKBONES.build(bcfg, in_channels=c, out_channels=schedule.out_channels(c), input_size=h,
                           num_classes=num_classes, time_inputs=schedule.num_time_inputs)


def build_run(cfg: dict, prepared: Prepared, device: torch.device) -> RunParts:
    """Everything the training job needs, built from the config and the prepared caches."""
    arts = load_artifacts(prepared.artifact_dirs, device)
    fdnet = arts.pop(FD_NET, None)             # None with eval.metric=adm
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
        method.guidance.guide = load_guide(guide_from, latent.groups, shape, prepared.data.num_classes, device)
    feed = LatentFeed(tensors, latent, batch_size=cfg["train"]["batch_size"], seed=cfg["seed"],
                      flips=cfg["data"]["flips"], device=device)
    return RunParts(latent=latent, method=method, model=model, feed=feed, fdnet=fdnet, latent_shape=shape,
                    num_classes=prepared.data.num_classes)


# ----------------------------------------------------------------------------- AutoGuidance guides
# `guide_from` in a guidance config names a run folder (results/<grid>/<run_id>) or a checkpoint file inside one;
# the guide's backbone is rebuilt from that run's own config.yaml, so it may be a smaller model (SFD: a
# LightningDiT-B/1 guide for an XL model) on the same latent (docs/methods.md §6.6).


def _checkpoint(path: Path) -> tuple[Path, dict]:
    """(run folder, checkpoint state) for a run folder (newest valid checkpoint) or a checkpoint file."""
    if path.is_file():
        run = path.parent.parent
        state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        run = path
        state = RunDir(path).load_latest()
    if state is None or not (run / "config.yaml").exists():
        raise ConfigError(f"guide_from={path}: no run folder with config.yaml and a valid checkpoint there; "
                          "point it at results/<grid>/<run_id> of a finished run or at one of its checkpoints")
    return run, state


def load_guide(guide_from: str, groups: Groups, latent_shape: tuple[int, ...], num_classes: int,
               device: torch.device) -> Callable:
    """The guide as a sampler model_fn (x, t, y) -> output: its own backbone config, its EMA weights, on
    the main model's latent (same groups and shape, as AutoGuidance requires)."""
    run, state = _checkpoint(Path(guide_from))
    cfg: Any = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    guide = build_backbone(cfg, build_schedule(cfg["method"], groups), latent_shape, num_classes).to(device)
    try:
        guide.load_state_dict(state["ema"])
    except RuntimeError as e:
        raise ConfigError(f"guide_from={guide_from}: its weights do not fit a model on this latent "
                          f"({str(e).splitlines()[0]})") from None
    guide.eval().requires_grad_(False)

    def model_fn(x, t, y):
        return guide(x, t, y).out

    return model_fn
