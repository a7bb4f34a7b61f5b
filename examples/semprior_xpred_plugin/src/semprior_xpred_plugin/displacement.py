"""A new prediction type: the network outputs the displacement d = x1 − x_t to the clean latent.

On the linear path x_t = t·x1 + (1 − t)·x0 (t = 1 data) the velocity is u = x1 − x0 = d / (1 − t), so d is
a velocity scaled by the time left; it is singular at t = 1 like data prediction, and the suite's samplers
then make no model call there (ODESampler last_step="auto"). Only public names are imported.
"""
from __future__ import annotations

from torch import Tensor

from core.registry import PREDICTIONS
from methods.prediction import Prediction


@PREDICTIONS.register("displacement")
class DisplacementPrediction(Prediction):
    """out = x1 − x_t: u = out / max(1 − t, t_eps). Shapes: (N, C, H, W); t (N, C, 1, 1)."""

    name = "displacement"
    singular_at = 1.0

    def to_velocity(self, out: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return out / (1 - t).clamp_min(self.t_eps)

    def from_velocity(self, v: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return (1 - t).clamp_min(self.t_eps) * v

    def from_path(self, x0: Tensor, x1: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return x1 - xt
