"""Prediction types of the linear flow: what the network outputs, and its conversion to a velocity
(docs/methods.md §15).

Path (project convention, docs/methods.md §0.1): x_t = t·x1 + (1 − t)·x0, t = 0 noise, t = 1 data,
velocity u = x1 − x0. A prediction type names the quantity the network is trained to output and gives
the exact maps between it and the velocity on this path, so that

- the loss can be taken in any space (methods/base.py `training_losses` converts output and target
  with the same map), and
- every sampler integrates a velocity (methods/samplers.py `VelocityField`), whatever the network predicts.

Built-in types (t is the per-channel time, t_eps the floor of the singular denominator):

    velocity  out = u                        to_velocity: out                   singular: never
    data      out = x1 (JiT, x-prediction)   to_velocity: (out − x_t)/max(1 − t, t_eps)   singular at t = 1
    noise     out = x0 (ε-prediction)        to_velocity: (x_t − out)/max(t, t_eps)       singular at t = 0

Extension point: subclass `Prediction`, implement `to_velocity`, `from_velocity` and `from_path`,
set `singular_at`, and register it with `@PREDICTIONS.register("name")`; the flow schedules then accept
`prediction: name` and `loss_target: name` (examples/semprior_xpred_plugin/ adds one in a few lines).
"""
from __future__ import annotations

from core.registry import PREDICTIONS
from torch import Tensor

DEFAULT_T_EPS = 0.05    # JiT's floor on 1 − t (main_jit.py `--t_eps 5e-2`, docs/methods.md §13)


class Prediction:
    """One prediction type. Shapes: out, xt, x0, x1 (N, C, H, W); t (N, C, 1, 1) per-channel times
    (schedule.groups.expand(t_groups)), or anything broadcastable against them.

    singular_at: the time where `to_velocity` divides by zero (None: nowhere). Samplers make no model
        call there (the ODE sampler's `last_step="auto"`); elsewhere the denominator is floored at t_eps.
    """

    name: str = ""
    singular_at: float | None = None

    def __init__(self, t_eps: float = DEFAULT_T_EPS) -> None:
        if not 0.0 < t_eps < 1.0:
            raise ValueError(f"t_eps must be in (0, 1), got {t_eps}")
        self.t_eps = float(t_eps)

    def to_velocity(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The network output in this space -> the velocity u = x1 − x0 it implies at (x_t, t)."""
        raise NotImplementedError

    def from_velocity(self, v: Tensor, xt: Tensor, t: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Inverse of `to_velocity` (same floor, so the round trip is exact up to rounding)."""
        raise NotImplementedError

    def from_path(self, x0: Tensor, x1: Tensor, xt: Tensor, t: Tensor) -> Tensor:  # pragma: no cover
        """The exact training target in this space for the path point x_t built from (x0, x1)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_eps={self.t_eps})"


@PREDICTIONS.register("velocity")
class VelocityPrediction(Prediction):
    """out = u = x1 − x0 (SiT, REPA, SFD, ...). Both maps are the identity: no arithmetic at all."""

    name = "velocity"

    def to_velocity(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return out

    def from_velocity(self, v: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return v

    def from_path(self, x0: Tensor, x1: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return x1 - x0


@PREDICTIONS.register("data")
class DataPrediction(Prediction):
    """out = x̂1 (JiT): u = (x̂1 − x_t)/(1 − t), with 1 − t floored at t_eps (JiT `clamp_min(t_eps)`)."""

    name = "data"
    singular_at = 1.0

    def to_velocity(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return (out - xt) / (1 - t).clamp_min(self.t_eps)

    def from_velocity(self, v: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return xt + (1 - t).clamp_min(self.t_eps) * v

    def from_path(self, x0: Tensor, x1: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return x1


@PREDICTIONS.register("noise")
class NoisePrediction(Prediction):
    """out = x̂0 (ε-prediction on the linear path): x_t = x0 + t·u, so u = (x_t − x̂0)/t, t floored at t_eps."""

    name = "noise"
    singular_at = 0.0

    def to_velocity(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return (xt - out) / t.clamp_min(self.t_eps)

    def from_velocity(self, v: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return xt - t.clamp_min(self.t_eps) * v

    def from_path(self, x0: Tensor, x1: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return x0


def build_prediction(name: str, t_eps: float = DEFAULT_T_EPS) -> Prediction:
    """PREDICTIONS[name](t_eps=t_eps); an unknown name raises ValueError listing the valid ones."""
    if name not in PREDICTIONS:
        raise ValueError(f"unknown prediction {name!r}; valid: {', '.join(PREDICTIONS.names())}")
    return PREDICTIONS.get(name)(t_eps=t_eps)


def convert(out: Tensor, xt: Tensor, t: Tensor, src: Prediction, dst: Prediction) -> Tensor:
    """A `src`-space quantity -> the same quantity in `dst` space, through the velocity.
    The identity (the same tensor, no arithmetic) when both are the same type."""
    if type(src) is type(dst) and src.t_eps == dst.t_eps:
        return out
    return dst.from_velocity(src.to_velocity(out, xt, t), xt, t)
