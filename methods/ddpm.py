"""Discrete DDPM as DiT uses it (docs/methods.md §1): linear β schedule, ε-prediction with learned-range variance
(Nichol & Dhariwal, arXiv 2102.09672), the VLB term, and ancestral sampling on a respaced subset.

Time-convention boundary (the only place it is crossed): DiT's integer index i ∈ {0..T−1} has
i = 0 data and i = T−1 noise. The project time is t = 1 − i/(T−1) (t = 1 data, t = 0 noise), and
i = round((1 − t)·(T−1)) maps back exactly for float32 or wider t. The backbone embeds i as a float.
In this schedule x0 is the noise ε and x1 the data (DiT's "x_0").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from core.registry import LOSSES, SAMPLERS, SCHEDULES
from core.types import BackboneOut, Groups, LossOut
from methods.base import Loss, LossCtx

# ----------------------------------------------------------------------------------------------
# Schedule constants (float64, like DiT, so that ᾱ near index 999 keeps its precision)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionConsts:
    """Per-index constants of a Gaussian diffusion with the given betas; every field is (T,) float64."""

    betas: Tensor
    log_betas: Tensor
    alphas_cumprod: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor         # multiplies the clean sample
    posterior_mean_coef2: Tensor         # multiplies x_t

    @classmethod
    def from_betas(cls, betas: Tensor) -> "DiffusionConsts":
        betas = betas.to(torch.float64)
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, dim=0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        # The posterior variance is 0 at index 0; its log is clipped by reusing index 1's value.
        post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        return cls(betas=betas, log_betas=betas.log(), alphas_cumprod=ab, sqrt_alphas_cumprod=ab.sqrt(),
                   sqrt_one_minus_alphas_cumprod=(1.0 - ab).sqrt(),
                   sqrt_recip_alphas_cumprod=(1.0 / ab).sqrt(),
                   sqrt_recipm1_alphas_cumprod=(1.0 / ab - 1.0).sqrt(),
                   posterior_variance=post_var, posterior_log_variance_clipped=post_log_var,
                   posterior_mean_coef1=betas * ab_prev.sqrt() / (1.0 - ab),
                   posterior_mean_coef2=(1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab))

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> "DiffusionConsts":
        """A copy on `device` (the sampler moves the constants once instead of at every step)."""
        return DiffusionConsts(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _at(arr: Tensor, idx: Tensor, like: Tensor) -> Tensor:
    """Gather arr[idx] (idx (N,) long) and broadcast to like's rank in like's dtype: (N, 1, 1, 1)."""
    vals = arr.to(like.device)[idx].to(like.dtype)                  # (N,)
    return vals.reshape(-1, *([1] * (like.dim() - 1)))


def p_mean_logvar(c: DiffusionConsts, eps: Tensor, v: Tensor, xt: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Model mean and log-variance of p(x_{i−1} | x_i) from ε̂ and the learned-range output v.

    log σ² = f·log β_i + (1 − f)·log β̃_i with f = (v + 1)/2 (docs/methods.md §1); clip_denoised is off.
    Args: eps, v, xt (N, C, H, W); idx (N,) long indices into c.
    """
    min_log = _at(c.posterior_log_variance_clipped, idx, xt)
    max_log = _at(c.log_betas, idx, xt)
    frac = (v + 1) / 2
    logvar = frac * max_log + (1 - frac) * min_log
    x_clean = _at(c.sqrt_recip_alphas_cumprod, idx, xt) * xt - _at(c.sqrt_recipm1_alphas_cumprod, idx, xt) * eps
    mean = _at(c.posterior_mean_coef1, idx, xt) * x_clean + _at(c.posterior_mean_coef2, idx, xt) * xt
    return mean, logvar


def q_posterior(c: DiffusionConsts, x_clean: Tensor, xt: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and clipped log-variance of the true posterior q(x_{i−1} | x_i, x_clean)."""
    mean = _at(c.posterior_mean_coef1, idx, xt) * x_clean + _at(c.posterior_mean_coef2, idx, xt) * xt
    return mean, _at(c.posterior_log_variance_clipped, idx, xt)


# ----------------------------------------------------------------------------------------------
# Variational bound (bits/dim)
# ----------------------------------------------------------------------------------------------

def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: Tensor) -> Tensor:
    # The tanh approximation of Φ that DiT's likelihood uses; kept so the VLB matches it.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_loglik(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of x ∈ [−1, 1] under a Gaussian discretised into 256 bins
    of width 2/255, with open-ended edge bins (Ho et al., arXiv 2006.11239, §3.3)."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_bits(c: DiffusionConsts, x_clean: Tensor, xt: Tensor, idx: Tensor, eps: Tensor, v: Tensor) -> Tensor:
    """Per-sample VLB term L_i in bits/dim: decoder NLL at i = 0, KL(q || p) otherwise.

    Args: x_clean, xt, eps, v (N, C, H, W); idx (N,) long. Returns (N,).
    """
    true_mean, true_logvar = q_posterior(c, x_clean, xt, idx)
    mean, logvar = p_mean_logvar(c, eps, v, xt, idx)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1) / math.log(2.0)       # (N,)
    nll = -discretized_gaussian_loglik(x_clean, mean, 0.5 * logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(idx == 0, nll, kl)


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------

@SCHEDULES.register("ddpm")
class DDPM:
    """DiT's discrete schedule: T steps, β linear in [beta_start, beta_end] (float64), ε target,
    learned-range σ (the model outputs 2C channels: ε̂ then v).

    Args:
        groups: channel groups of the latent (dependency; every group shares the one time)
        num_timesteps, beta_start, beta_end: DiT's values 1000, 1e-4, 0.02 (docs/methods.md §1)
    """

    family = "ddpm"     # samplers declare the families they integrate (methods/compose.py)
    prediction_name = "noise"   # ε with learned σ on the VP path; its own sampler, no velocity conversion
    singular_at = None

    tau_max = 1.0
    num_time_inputs = 1

    def __init__(self, groups: Groups, num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> None:
        if num_timesteps < 2 or not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need num_timesteps ≥ 2 and 0 < beta_start ≤ beta_end < 1, got "
                             f"{num_timesteps}, {beta_start}, {beta_end}")
        self.groups = groups
        self.num_timesteps = int(num_timesteps)
        betas = torch.linspace(beta_start, beta_end, self.num_timesteps, dtype=torch.float64)
        self.consts = DiffusionConsts.from_betas(betas)
        self._on_device: dict[torch.device, DiffusionConsts] = {}

    def consts_on(self, device: torch.device) -> DiffusionConsts:
        """The constants on `device`, copied there once: a copy from host memory at every training step
        would wait for the GPU to drain (and cannot be captured in a CUDA graph, core/graphs.py)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.consts
        if device not in self._on_device:
            self._on_device[device] = self.consts.to(device)
        return self._on_device[device]

    # -- the one conversion between DiT indices and project time --------------------------------
    def index_to_t(self, idx: Tensor) -> Tensor:
        """(N,) long index (0 data, T−1 noise) -> (N,) float32 project time t = 1 − i/(T−1)."""
        return 1.0 - idx.to(torch.float32) / (self.num_timesteps - 1)

    def t_to_index(self, t: Tensor) -> Tensor:
        """(N,) project time -> (N,) long index round((1 − t)(T−1)); exact inverse of index_to_t."""
        return ((1.0 - t.to(torch.float64)) * (self.num_timesteps - 1)).round().long()

    # -- Schedule protocol -----------------------------------------------------------------------
    def out_channels(self, in_channels: int) -> int:
        return 2 * in_channels                      # ε̂ and the variance interpolation v

    def sample_t(self, n: int, *, device: torch.device | str,
                 generator: torch.Generator | None = None) -> Tensor:
        """Index i ~ Uniform{0..T−1} (docs/methods.md §1), returned as project time (n,)."""
        idx = torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)
        return self.index_to_t(idx)

    def group_times(self, tau: Tensor) -> Tensor:
        return tau[:, None].expand(-1, len(self.groups.names))     # (N, G)

    def path(self, x0: Tensor, x1: Tensor, t_groups: Tensor) -> tuple[Tensor, Tensor]:
        """x_t = √ᾱ_i·x1 + √(1 − ᾱ_i)·x0 (x0 = ε); target ε. Shapes (N, C, H, W)."""
        idx, c = self.t_to_index(t_groups[:, 0]).to(x1.device), self.consts_on(x1.device)
        xt = _at(c.sqrt_alphas_cumprod, idx, x1) * x1 + _at(c.sqrt_one_minus_alphas_cumprod, idx, x1) * x0
        return xt, x0

    def model_time(self, t_groups: Tensor) -> Tensor:
        """(N, G) -> (N, 1): the integer index as float (DiT embeds 0..999, docs/methods.md §0.2)."""
        return self.t_to_index(t_groups[:, 0]).to(t_groups.dtype)[:, None]

    def drift_mask(self, tau: Tensor) -> Tensor:
        return torch.ones(tau.shape[0], len(self.groups.names), dtype=torch.bool, device=tau.device)


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

@LOSSES.register("ddpm")
class DDPMLoss(Loss):
    """ε-MSE + VLB (DiT `training_losses` with learned-range σ, docs/methods.md §1).

    The VLB sees ε̂ detached, so it trains only the variance output v. Terms: "mse", "vlb";
    total = mse + vlb. Needs ctx.schedule to be a `DDPM`.

    Args:
        groups: latent channel groups (dependency; unused, accepted like every loss)
    """

    def __init__(self, groups: Groups) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, out: BackboneOut, target: Tensor, ctx: LossCtx) -> LossOut:
        c = target.shape[1]
        if out.out.shape[1] != 2 * c:
            raise ValueError(f"ddpm loss needs a 2C = {2 * c}-channel output (ε̂, v), got {out.out.shape[1]}")
        eps, v = out.out[:, :c], out.out[:, c:]                         # (N, C, H, W) each
        mse = ((eps - target) ** 2).flatten(1).mean(1).mean()
        idx = ctx.schedule.t_to_index(ctx.t_groups[:, 0]).to(target.device)
        vlb = vlb_bits(ctx.schedule.consts_on(target.device), ctx.x1, ctx.xt, idx, eps.detach(), v).mean()
        return LossOut(total=mse + vlb, terms={"mse": mse.detach(), "vlb": vlb.detach()})


# ----------------------------------------------------------------------------------------------
# Ancestral sampler on a respaced index subset
# ----------------------------------------------------------------------------------------------

def respaced_indices(num_timesteps: int, steps: int) -> Tensor:
    """`steps` evenly spaced original indices from 0 to T−1 inclusive, ascending (DiT's
    `space_timesteps(T, [steps])`): round(k·(T−1)/(steps−1)), k = 0..steps−1. (steps,) long."""
    if not 2 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [2, {num_timesteps}], got {steps}")
    k = torch.arange(steps, dtype=torch.float64)
    return torch.round(k * (num_timesteps - 1) / (steps - 1)).long()


def respace(c: DiffusionConsts, kept: Tensor) -> DiffusionConsts:
    """Constants of the process visiting only `kept`: β'_j = 1 − ᾱ_{k_j}/ᾱ_{k_{j−1}}, ᾱ_{k_{−1}} = 1."""
    ab = c.alphas_cumprod[kept]
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    return DiffusionConsts.from_betas(1.0 - ab / ab_prev)


@SAMPLERS.register("ddpm")
class DDPMSampler:
    """Ancestral DDPM sampling (`p_sample_loop`) on `steps` respaced indices; the model still receives
    the ORIGINAL indices (docs/methods.md §1). Needs a `DDPM` schedule and a 2C-channel model output.

    Args:
        steps: number of respaced steps (DiT: 250)
    """

    families = ("ddpm",)

    def __init__(self, steps: int = 250) -> None:
        self.steps = int(steps)

    @torch.no_grad()
    def __call__(self, model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], noise: Tensor, y: Tensor, *,
                 schedule: DDPM, guidance: Any = None, generator: torch.Generator | None = None) -> Tensor:
        """noise (N, C, H, W) at index T−1 -> sample x1 (N, C, H, W) at index 0."""
        return self._run(model_fn, noise, y, schedule, guidance, generator, ())[0]

    def trajectory(self, model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], noise: Tensor, y: Tensor, *,
                   schedule: DDPM, taus: Sequence[float], guidance: Any = None,
                   generator: torch.Generator | None = None) -> list[tuple[float, Tensor]]:
        """States at the project times `taus` (the phase figure): for each τ the first state of the respaced
        chain at t ≥ τ (the chain's grid is not refined, so the samples equal `__call__`'s)."""
        return self._run(model_fn, noise, y, schedule, guidance, generator, tuple(taus))[1]

    @torch.no_grad()
    def _run(self, model_fn: Callable[[Tensor, Tensor, Tensor], Tensor], noise: Tensor, y: Tensor, schedule: DDPM,
             guidance: Any, generator: torch.Generator | None, taus: tuple[float, ...]
             ) -> tuple[Tensor, list[tuple[float, Tensor]]]:
        kept = respaced_indices(schedule.num_timesteps, self.steps)
        c = respace(schedule.consts, kept).to(noise.device)
        n, ch = noise.shape[0], noise.shape[1]
        x, rec = noise, {}

        def record(t_state: float, state: Tensor) -> None:
            for tau in taus:
                if tau not in rec and t_state >= tau - 1e-9:
                    rec[tau] = state

        for j in reversed(range(self.steps)):
            t_state = float(schedule.index_to_t(torch.tensor(int(kept[j]))))
            if t_state < 1.0:                             # index 0 is still noisy: t = 1 is the chain's output
                record(t_state, x)
            orig = torch.full((n,), int(kept[j]), dtype=torch.long, device=noise.device)
            t_model = orig.to(noise.dtype)[:, None]                              # (N, 1)
            t_groups = schedule.group_times(schedule.index_to_t(orig))           # (N, G)
            if guidance is None:
                out = model_fn(x, t_model, y)
            else:                                         # same call as the flow samplers' guidance
                out = guidance(model_fn, x, t_model, t_groups, y, schedule.groups)
            if out.shape[1] != 2 * ch:
                raise ValueError(f"ddpm sampler needs a 2C = {2 * ch}-channel output, got {out.shape[1]}")
            jj = torch.full((n,), j, dtype=torch.long, device=noise.device)      # respaced index
            mean, logvar = p_mean_logvar(c, out[:, :ch], out[:, ch:], x, jj)
            if j == 0:
                x = mean                                  # no noise on the last step
            else:
                z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
                x = mean + torch.exp(0.5 * logvar) * z
        record(1.0, x)
        return x, [(tau, rec[tau]) for tau in taus]
