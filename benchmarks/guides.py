"""AutoGuidance guides: another run's EMA weights (SFD's headline sampling, docs/methods.md §6.6).

`guide_from` in a guidance config names a run folder (results/<grid>/<run_id>) or a checkpoint file
inside one; the guide's backbone is rebuilt from that run's own config.yaml, so it may be a smaller
model (SFD: a LightningDiT-B/1 guide for an XL model) on the same latent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import OmegaConf

from core.config import ConfigError
from core.rundir import RunDir
from core.types import Groups


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
    from benchmarks.components import build_backbone
    from methods.compose import build_schedule

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
