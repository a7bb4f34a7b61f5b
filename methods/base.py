"""The method interface: a latent builder, a noise schedule, a loss and a sampler (docs/architecture.md, "The method interface").

Project-wide time convention (SiT/SFD): x_t = t·x1 + (1 − t)·x0 with t = 0 noise and t = 1 data.
Every schedule maps a *global* time τ ∈ [0, tau_max] to one time per channel group (clamped to
[0, 1]); a synchronous schedule has tau_max = 1 and gives every group τ itself. The training loop
and the evaluator only call the functions in this file; they never look at a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from core.types import BackboneOut, Batch, Groups, LossOut

# A model as samplers see it: (x (N,C,H,W), t_model (N,K), y (N,)) -> output (N,C_out,H,W).
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Schedule(Protocol):
    """Noise schedule: time sampling, per-group times, the path and the target.

    tau_max:          end of the global time axis (1, or 1 + max lag for asynchronous schedules)
    num_time_inputs:  how many times the backbone embeds (1 synchronous, one per group async)
    """

    groups: Groups
    tau_max: float
    num_time_inputs: int

    def out_channels(self, in_channels: int) -> int: ...                 # 2C for learned σ
    def sample_t(self, n: int, *, device: torch.device, generator: torch.Generator | None = None) -> Tensor: ...  # (n,) in [0,1]
    def group_times(self, tau: Tensor) -> Tensor: ...                    # (n,) -> (n, G) in [0, 1]
    def path(self, x0: Tensor, x1: Tensor, t_groups: Tensor) -> tuple[Tensor, Tensor]: ...  # (xt, target)
    def model_time(self, t_groups: Tensor) -> Tensor: ...                # (n, G) -> (n, K) backbone input
    def drift_mask(self, tau: Tensor) -> Tensor: ...                     # (n,) -> (n, G) bool: False = group frozen
    # Optional (flow schedules, docs/methods.md §15): `to_velocity(out, xt, t_groups)` for samplers,
    # `to_loss_space(out, target, xt, t_groups)` for training_losses, `singular_at` for the last-step rule.


@dataclass
class LossCtx:
    """Everything a loss may need besides the model output and the target."""

    x0: Tensor                  # (N, C, H, W) noise
    x1: Tensor                  # (N, C, H, W) clean latent (after any pre_path change)
    xt: Tensor                  # (N, C, H, W) model input
    t_groups: Tensor            # (N, G) per-group times, project convention
    batch: Batch
    schedule: Any
    state: dict[str, Any] = field(default_factory=dict)   # from Loss.pre_path (e.g. ReDi's drop flag)


class Loss(nn.Module):
    """Base loss. Subclasses own trainable heads (e.g. a REPA projector) as submodules.

    hidden_at: backbone blocks (1-based) whose hidden states forward() needs.
    """

    hidden_at: tuple[int, ...] = ()

    def pre_path(self, batch: Batch, generator: torch.Generator | None = None) -> tuple[Batch, dict[str, Any]]:
        """Change the batch before the path is built (ReDi's DINO-drop); default: unchanged."""
        return batch, {}

    def forward(self, out: BackboneOut, target: Tensor, ctx: LossCtx) -> LossOut:  # pragma: no cover
        raise NotImplementedError


class Sampler(Protocol):
    """Integrates from noise (t = 0) to data; returns x1 (N, C, H, W) in normalised latent space."""

    def __call__(self, model: ModelFn, noise: Tensor, y: Tensor, *, schedule: Schedule,
                 guidance: Any = None, generator: torch.Generator | None = None) -> Tensor: ...


def training_losses(model: nn.Module, batch: Batch, schedule: Schedule, loss: Loss,
                    generator: torch.Generator | None = None) -> LossOut:
    """One training objective evaluation, identical for every method.

    The schedule's `path` gives the target in its prediction space; a schedule with `to_loss_space`
    (the flow schedules) maps the output and the target into its loss-target space with the same map
    (docs/methods.md §15.2), so the loss always compares like with like. For velocity/velocity the
    tensors are handed over untouched.

    Args:
        model: backbone, called as model(xt (N,C,H,W), t_model (N,K), y (N,), hidden_at=...) -> BackboneOut
        batch: clean latents x1 (N,C,H,W), labels (N,), aux targets
    """
    batch, state = loss.pre_path(batch, generator)
    x1 = batch.x1
    x0 = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
    t = schedule.sample_t(x1.shape[0], device=x1.device, generator=generator)     # (N,)
    t_groups = schedule.group_times(t * schedule.tau_max)                          # (N, G)
    xt, target = schedule.path(x0, x1, t_groups)                                  # target in prediction space
    out = model(xt, schedule.model_time(t_groups), batch.y, hidden_at=loss.hidden_at)
    to_loss_space = getattr(schedule, "to_loss_space", None)                       # flow schedules (prediction types)
    if to_loss_space is not None:
        pred, target = to_loss_space(out.out, target, xt, t_groups)
        if pred is not out.out:                                                    # velocity/velocity: never
            out = replace(out, out=pred)
    return loss(out, target, LossCtx(x0=x0, x1=x1, xt=xt, t_groups=t_groups, batch=batch,
                                     schedule=schedule, state=state))
