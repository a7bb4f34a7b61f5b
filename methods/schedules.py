"""Linear-flow noise schedules: the synchronous flow (SiT, arXiv 2401.08740) and SFD's asynchronous
flow (arXiv 2512.04926), plus the time helpers every sampler shares (timestep shift).

Project convention (docs/methods.md §0.1): x_t = t·x1 + (1 − t)·x0, t = 0 noise, t = 1 data, target
u = x1 − x0. Everything here is in project time. REPA's convention (t = 0 data, v = ε − x) is converted
at its boundaries, not here: REPA's released weights when imported (`fold_repa_time`, the benchmarks'
checkpoint importers) and its guidance interval in its method preset (`repa.yaml`: t_REPA ≤ 0.7 -> t ≥ 0.3).
"""
from __future__ import annotations

import torch
from torch import Tensor

from core.registry import SCHEDULES
from core.types import Groups
from methods.prediction import DEFAULT_T_EPS, VelocityPrediction, build_prediction, convert

TIME_DISTS = ("uniform", "logit-normal")


# ----------------------------------------------------------------------------------------------
# Time helpers
# ----------------------------------------------------------------------------------------------

def sample_time(n: int, dist: str, mean: float, std: float, *, device: torch.device | str,
                generator: torch.Generator | None = None) -> Tensor:
    """Draw n training times in [0, 1].

    uniform: U[0, 1) (SiT, REPA, ReDi); logit-normal: sigmoid(N(mean, std)) (LightningDiT, SFD;
    `use_lognorm`, docs/methods.md §5.4 / §6.3). `generator=None` uses the global torch RNG.

    Returns: (n,) float32
    """
    if dist == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if dist == "logit-normal":
        return torch.sigmoid(torch.randn(n, device=device, generator=generator) * std + mean)
    raise ValueError(f"unknown time_dist {dist!r}; valid: {', '.join(TIME_DISTS)}")


def shift_time(t: Tensor, s: float) -> Tensor:
    """Timestep shift f_s(t) = s·t / (1 + (s − 1)·t) on t ∈ [0, 1] (LightningDiT, docs/methods.md §5.4 / §11.12).

    f_s(0) = 0, f_s(1) = 1, monotone for s > 0, f_1 = identity; s < 1 puts more grid points near
    t = 0 (noise), e.g. f_0.3(0.5) ≈ 0.2308.
    """
    if s <= 0:
        raise ValueError(f"timestep shift must be > 0 (1 = no shift), got {s}")
    st = s * t
    # Written as s·t / (s·t + (1 − t)), equal to the formula above, so that f_s(1) = 1 exactly in
    # floating point (1 + (s − 1) rounds for s = 0.3 and the sampler's last time would miss 1).
    return st / (st + (1 - t))


def shift_tau(tau: Tensor, s: float, tau_max: float) -> Tensor:
    """SFD's shift on the global time τ ∈ [0, tau_max]: divide by tau_max, shift, multiply back
    (docs/methods.md §6.6), so the endpoints stay 0 and tau_max."""
    return shift_time(tau / tau_max, s) * tau_max


# ----------------------------------------------------------------------------------------------
# The linear path, shared by the synchronous and asynchronous schedules
# ----------------------------------------------------------------------------------------------

def linear_path(x0: Tensor, x1: Tensor, t_groups: Tensor, groups: Groups) -> tuple[Tensor, Tensor]:
    """Per-group linear path x_t = t_g·x1 + (1 − t_g)·x0 with target u = x1 − x0 (ICPlan, docs/methods.md §2, §6.3).

    Args:
        x0: (N, C, H, W) noise; x1: (N, C, H, W) clean latent
        t_groups: (N, G) one time per channel group, in [0, 1]
    Returns: xt (N, C, H, W), target (N, C, H, W)
    """
    t = groups.expand(t_groups).to(x1.dtype)          # (N, C, 1, 1)
    xt = t * x1 + (1 - t) * x0
    return xt, x1 - x0


class _LinearFlow:
    """Shared parts of the flow schedules: time sampling, the path, output width."""

    family = "flow"     # samplers declare the families they integrate (methods/compose.py)

    def __init__(self, groups: Groups, time_dist: str, time_mean: float, time_std: float,
                 prediction: str = "velocity", loss_target: str | None = None, t_eps: float = DEFAULT_T_EPS) -> None:
        if time_dist not in TIME_DISTS:
            raise ValueError(f"unknown time_dist {time_dist!r}; valid: {', '.join(TIME_DISTS)}")
        if time_std <= 0:
            raise ValueError(f"time_std must be > 0, got {time_std}")
        self.groups = groups
        self.time_dist, self.time_mean, self.time_std = time_dist, float(time_mean), float(time_std)
        self.prediction = build_prediction(prediction, t_eps)
        self.loss_target = build_prediction(prediction if loss_target is None else loss_target, t_eps)
        self.t_eps = float(t_eps)

    @property
    def singular_at(self) -> float | None:
        """Group time where the prediction's velocity conversion is singular (samplers avoid a model call there)."""
        return self.prediction.singular_at

    def _t(self, t_groups: Tensor, like: Tensor) -> Tensor:
        return self.groups.expand(t_groups).to(like.dtype)        # (N, C, 1, 1)

    def to_velocity(self, out: Tensor, xt: Tensor, t_groups: Tensor) -> Tensor:
        """Network output (N, C, H, W) in prediction space -> velocity at (x_t, per-group times (N, G)).
        Velocity prediction returns `out` itself (no arithmetic: bit-identical to the plain flow)."""
        if isinstance(self.prediction, VelocityPrediction):
            return out
        return self.prediction.to_velocity(out, xt, self._t(t_groups, xt))

    def to_loss_space(self, out: Tensor, target: Tensor, xt: Tensor, t_groups: Tensor) -> tuple[Tensor, Tensor]:
        """(prediction, target) in prediction space -> both in loss-target space through the same map
        (docs/methods.md §15.2). The same tensors, untouched, when loss_target == prediction."""
        if type(self.prediction) is type(self.loss_target):
            return out, target
        t = self._t(t_groups, xt)
        c = target.shape[1]
        pred = convert(out[:, :c], xt, t, self.prediction, self.loss_target)
        if out.shape[1] > c:                                        # extra output channels stay as they are
            pred = torch.cat([pred, out[:, c:]], dim=1)
        return pred, convert(target, xt, t, self.prediction, self.loss_target)

    def out_channels(self, in_channels: int) -> int:
        return in_channels                                  # velocity only; no learned σ

    def sample_t(self, n: int, *, device: torch.device | str,
                 generator: torch.Generator | None = None) -> Tensor:
        """(n,) global training times in [0, 1]; the caller multiplies by tau_max."""
        return sample_time(n, self.time_dist, self.time_mean, self.time_std,
                           device=device, generator=generator)

    def path(self, x0: Tensor, x1: Tensor, t_groups: Tensor) -> tuple[Tensor, Tensor]:
        """x_t and the target in PREDICTION space (velocity: u = x1 − x0, as `linear_path`)."""
        xt, u = linear_path(x0, x1, t_groups, self.groups)
        if isinstance(self.prediction, VelocityPrediction):
            return xt, u
        return xt, self.prediction.from_path(x0, x1, xt, self._t(t_groups, xt))


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------

@SCHEDULES.register("flow")
class Flow(_LinearFlow):
    """Synchronous linear flow (SiT / REPA / ReDi / LightningDiT): every group shares one time.

    Args:
        groups: channel groups of the latent (dependency)
        time_dist: "uniform" (SiT) | "logit-normal" (LightningDiT `use_lognorm`)
        time_mean, time_std: logit-normal parameters (ignored for uniform)
        model_time_scale: factor on the time the backbone embeds; 1.0 because flow models feed
            t ∈ [0, 1] unscaled (docs/methods.md §0.2)
        prediction: what the network outputs, a PREDICTIONS name: "velocity" (default) | "data" (JiT) |
            "noise" | a plugin's (methods/prediction.py, docs/methods.md §15)
        loss_target: the space the MSE is taken in (default: the prediction's own space; JiT: "velocity")
        t_eps: floor of the singular denominator of the conversion (JiT 0.05)
    """

    tau_max = 1.0
    num_time_inputs = 1

    def __init__(self, groups: Groups, time_dist: str = "uniform", time_mean: float = 0.0,
                 time_std: float = 1.0, model_time_scale: float = 1.0, prediction: str = "velocity",
                 loss_target: str | None = None, t_eps: float = DEFAULT_T_EPS) -> None:
        super().__init__(groups, time_dist, time_mean, time_std, prediction, loss_target, t_eps)
        self.model_time_scale = float(model_time_scale)

    def group_times(self, tau: Tensor) -> Tensor:
        """(N,) -> (N, G): τ itself for every group."""
        return tau[:, None].expand(-1, len(self.groups.names))   # (N, G)

    def model_time(self, t_groups: Tensor) -> Tensor:
        """(N, G) -> (N, 1): the shared time, times model_time_scale."""
        t = t_groups[:, :1]                                       # (N, 1)
        return t if self.model_time_scale == 1.0 else t * self.model_time_scale

    def drift_mask(self, tau: Tensor) -> Tensor:
        """(N,) -> (N, G) bool: every group always moves."""
        return torch.ones(tau.shape[0], len(self.groups.names), dtype=torch.bool, device=tau.device)


@SCHEDULES.register("async-flow")
class AsyncFlow(_LinearFlow):
    """SFD's asynchronous linear flow, generalised to one lag per channel group (docs/methods.md §6.3, §6.6).

    Group g's time at global time τ ∈ [0, tau_max] is clamp(τ − lag_g, 0, 1), tau_max = 1 + max lag.
    SFD is delta_t = {"texture": 0.3}: t_sem = min(τ, 1), t_tex = max(τ − 0.3, 0). With every lag 0
    this is the synchronous flow, and gives the same x_t, target and time samples bit for bit.

    Args:
        groups: channel groups of the latent (dependency)
        delta_t: {group name: lag in [0, 1)}; groups not named lag 0
        time_dist, time_mean, time_std: as for "flow" (SFD: logit-normal(0, 1))
        prediction, loss_target, t_eps: as for "flow"; times are per group
    """

    def __init__(self, groups: Groups, delta_t: dict[str, float], time_dist: str = "uniform",
                 time_mean: float = 0.0, time_std: float = 1.0, prediction: str = "velocity",
                 loss_target: str | None = None, t_eps: float = DEFAULT_T_EPS) -> None:
        super().__init__(groups, time_dist, time_mean, time_std, prediction, loss_target, t_eps)
        unknown = sorted(set(delta_t) - set(groups.names))
        if unknown:
            raise ValueError(f"delta_t names unknown channel group(s) {unknown}; "
                             f"valid groups: {', '.join(groups.names)}")
        for name, lag in delta_t.items():
            # Δt ≥ 1 would leave a group with no overlap with the others (SFD asserts 0 < Δt < 1;
            # 0 is allowed here so that the knob-off run is the plain flow).
            if not 0 <= lag < 1:
                raise ValueError(f"delta_t[{name!r}] must be in [0, 1), got {lag}")
        self.lags = tuple(float(delta_t.get(name, 0.0)) for name in groups.names)
        self.tau_max = 1.0 + max(self.lags)
        self.num_time_inputs = len(groups.names)

    def _lags(self, like: Tensor) -> Tensor:
        return torch.tensor(self.lags, dtype=like.dtype, device=like.device)[None, :]   # (1, G)

    def group_times(self, tau: Tensor) -> Tensor:
        """(N,) -> (N, G): clamp(τ − lag_g, 0, 1)."""
        return (tau[:, None] - self._lags(tau)).clamp(0.0, 1.0)    # (N, G)

    def model_time(self, t_groups: Tensor) -> Tensor:
        """(N, G) -> (N, G): one time per group, in group order (the backbone's
        `time_embed_order` puts SFD's semantic embedding first, docs/methods.md §6.4)."""
        return t_groups

    def drift_mask(self, tau: Tensor) -> Tensor:
        """(N,) -> (N, G) bool: group g moves only while 0 ≤ τ − lag_g ≤ 1 (docs/methods.md §6.6: texture from
        τ ≥ Δt, semantics until τ ≤ 1), so a clamped group keeps its value exactly."""
        s = tau[:, None] - self._lags(tau)                          # (N, G)
        return (s >= 0) & (s <= 1)
