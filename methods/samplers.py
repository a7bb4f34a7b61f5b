"""ODE and SDE samplers over the global time τ ∈ [0, schedule.tau_max] (t = 0 noise, t = 1 data).

SiT's transport samplers (arXiv 2401.08740, docs/methods.md §2) written once for per-group times, so that SFD's
three-phase sampler (arXiv 2512.04926, docs/methods.md §6.6), LightningDiT's shifted Euler (arXiv 2501.01423,
docs/methods.md §5.4) and the plain flow (the Δt = 0 case) are the same code.

Phases: a schedule's `drift_mask(τ)` is piecewise constant (SFD: texture moves from τ = Δt, semantics
until τ = 1). The samplers split [0, tau_max] where it changes and integrate each phase with the mask
of its interior, so no solver step straddles a change and a frozen group keeps its value bit for bit.

Extension points (all public; docs/adding_a_method.md):
- `VelocityField(model_fn, y, schedule, guidance)(x, τ) -> (v, t_groups)`: the drift every sampler
  integrates. It calls the (guided) model and converts its output with `schedule.to_velocity`
  (methods/prediction.py), so a sampler never sees the prediction type; velocity prediction is the
  identity. A new prediction type therefore needs no sampler change.
- `PhasedSampler`: subclass it and implement `grid(schedule) -> [τ]` and
  `integrate_phase(field, x, pts, mask, want, rec, generator) -> x` to add a sampler; phases, recorded
  trajectories and NFE counting come with it. Set `families` to the schedule families it integrates
  (methods/compose.py refuses any other pairing at build time).
- `singular_end(schedule, a, b)`: whether a step from a to b ends where a moving group's prediction is
  singular; the ODE sampler's `last_step="auto"` makes such a Heun step an Euler step (no model call there).
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torchdiffeq import odeint

from core.registry import SAMPLERS
from methods.base import ModelFn
from methods.schedules import shift_tau

SOLVERS = ("euler", "heun", "dopri5")
LAST_STEPS = ("auto", "euler", "heun")
_SNAP = 1e-9       # grid points closer than _SNAP·tau_max are the same time
_PROBES = 1024     # drift-mask probes over [0, tau_max]; phases shorter than tau_max/_PROBES are not resolved


# ----------------------------------------------------------------------------------------------
# Time grid and phases
# ----------------------------------------------------------------------------------------------

def time_grid(end: float, steps: int, shift: float = 0.0) -> list[float]:
    """`steps` points from 0 to `end`; with shift s > 0 each τ is moved to end·f_s(τ/end)
    (LightningDiT s = 0.3 crowds the noisy end; docs/methods.md §5.4, §11.12). Endpoints stay exactly 0 and end."""
    if steps < 2:
        raise ValueError(f"a time grid needs steps >= 2 points, got {steps}")
    taus = torch.linspace(0.0, end, steps, dtype=torch.float64)
    if shift > 0:
        taus = shift_tau(taus, shift, end)
    out = taus.tolist()
    out[0], out[-1] = 0.0, float(end)
    return out


def _mask_at(schedule: Any, tau: float) -> Tensor:
    return schedule.drift_mask(torch.tensor([tau], dtype=torch.float64))[0]            # (G,)


def phase_changes(schedule: Any) -> list[float]:
    """Global times in (0, tau_max) where `schedule.drift_mask` changes: probe, then bisect to 1 ulp."""
    probes = torch.linspace(0.0, float(schedule.tau_max), _PROBES + 1, dtype=torch.float64)
    masks = schedule.drift_mask(probes)                                                 # (P, G)
    changes = []
    for i in torch.nonzero((masks[1:] != masks[:-1]).any(dim=1)).flatten().tolist():
        lo, hi = probes[i].item(), probes[i + 1].item()
        while lo < (mid := 0.5 * (lo + hi)) < hi:
            if torch.equal(_mask_at(schedule, mid), masks[i]):
                lo = mid
            else:
                hi = mid
        # Either side of the change is within 1 ulp; prefer the shorter decimal (0.3 over 0.29999999999999993).
        changes.append(min((hi, lo), key=lambda v: len(repr(v))))
    return changes


def _insert(points: list[float], value: float, tol: float, replace: bool) -> float:
    """Put `value` into the sorted `points` (in place) unless a point lies within tol; then that point
    stands for it (and is moved to `value` if `replace`, endpoints excepted). Returns the point used."""
    i = bisect.bisect_left(points, value)
    for j in (i - 1, i):
        if 0 <= j < len(points) and abs(points[j] - value) <= tol:
            if replace and 0 < j < len(points) - 1:
                points[j] = value
            return points[j]
    points.insert(i, value)
    return value


def phases(schedule: Any, grid: Sequence[float], keep: Sequence[float]) -> tuple[list[list[float]], list[float]]:
    """Split `grid` plus the times in `keep` at the schedule's phase changes.

    Returns: the phases (each a sorted list of times; consecutive phases share their end point) and,
    for each time in `keep`, the grid time that now stands for it.
    """
    tau_max = float(schedule.tau_max)
    tol = _SNAP * tau_max
    for tau in keep:
        if not 0.0 <= tau <= tau_max:
            raise ValueError(f"trajectory time {tau} is outside [0, tau_max = {tau_max}]")
    points = list(grid)
    kept = [_insert(points, float(tau), tol, replace=True) for tau in keep]
    cuts = sorted({points.index(_insert(points, b, tol, replace=False))
                   for b in phase_changes(schedule) if b <= points[-1]})
    out, start = [], 0
    for k in cuts:
        if 0 < k < len(points) - 1:
            out.append(points[start:k + 1])
            start = k
    out.append(points[start:])
    return out, kept


# ----------------------------------------------------------------------------------------------
# The velocity field
# ----------------------------------------------------------------------------------------------

class VelocityField:
    """The (guided) velocity at global time τ, dropping learned-σ channels; counts model calls.

    The model's output is in the schedule's prediction space; `schedule.to_velocity` converts it
    (identity for velocity prediction and for schedules without the method).
    """

    def __init__(self, model_fn: ModelFn, y: Tensor, schedule: Any, guidance: Any) -> None:
        self.model_fn, self.y, self.schedule, self.guidance = model_fn, y, schedule, guidance
        self.nfe = 0
        self._to_velocity = getattr(schedule, "to_velocity", None)

    def model(self, x: Tensor, t_model: Tensor, y: Tensor) -> Tensor:
        """One counted model call (a batched CFG forward is one call)."""
        self.nfe += 1
        return self.model_fn(x, t_model, y)

    def output(self, x: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W) at τ -> the (guided) model output in prediction space (N, C, H, W) and t_groups (N, G)."""
        tdt = torch.promote_types(x.dtype, torch.float32)
        tau_n = torch.as_tensor(tau, dtype=tdt, device=x.device).reshape(1).repeat(x.shape[0])   # (N,)
        t_groups = self.schedule.group_times(tau_n)                                          # (N, G)
        t_model = self.schedule.model_time(t_groups)                                         # (N, K)
        if self.guidance is None:
            out = self.model(x, t_model, self.y)
        else:
            out = self.guidance(self.model, x, t_model, t_groups, self.y, self.schedule.groups)
        return out[:, :x.shape[1]].to(x.dtype), t_groups

    def __call__(self, x: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
        """x (N, C, H, W) at τ -> velocity (N, C, H, W) and per-group times (N, G)."""
        out, t_groups = self.output(x, tau)
        if self._to_velocity is None:
            return out, t_groups
        return self._to_velocity(out, x, t_groups), t_groups


_Field = VelocityField     # the name before it was public


def singular_end(schedule: Any, a: float, b: float) -> bool:
    """Whether the step a -> b ends where a group that moves during it sits at the time where the
    schedule's prediction is singular (data prediction: a group reaching t = 1)."""
    s = getattr(schedule, "singular_at", None)
    if s is None:
        return False
    moving = schedule.drift_mask(torch.tensor([0.5 * (a + b)], dtype=torch.float64))[0]     # (G,)
    t_end = schedule.group_times(torch.tensor([b], dtype=torch.float64))[0]                 # (G,)
    return bool(((t_end == s) & moving).any())


class PhasedSampler:
    """Shared driver: builds the grid, splits it into phases, records states at requested times.

    A sampler implements `grid(schedule)` (its time points on [0, tau_max]) and `integrate_phase`
    (one phase: steps over `pts` with the drift mask `mask` (1, C, 1, 1); store x in `rec[b]` for
    each step end b in `want`). `field(x, τ)` returns the velocity whatever the prediction type.
    """

    last_nfe: int = 0
    families: tuple[str, ...] = ("flow",)    # schedule families this sampler can integrate

    def grid(self, schedule: Any) -> list[float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_schedule(self, schedule: Any) -> None:
        """Raise ValueError (with the fix) if this sampler cannot integrate `schedule` correctly; called by
        methods/compose.py at build time, after the family check. Default: every schedule of `families`."""

    def integrate_phase(self, field: VelocityField, x: Tensor, pts: list[float], mask: Tensor, want: set[float],
                        rec: dict[float, Tensor], generator: torch.Generator | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, model_fn: ModelFn, noise: Tensor, y: Tensor, *, schedule: Any,
                 guidance: Any = None, generator: torch.Generator | None = None) -> Tensor:
        """noise (N, C, H, W) at τ = 0 -> x1 (N, C, H, W) at τ = tau_max, same dtype and device."""
        return self._run(model_fn, noise, y, schedule, guidance, generator, ())[0]

    def trajectory(self, model_fn: ModelFn, noise: Tensor, y: Tensor, *, schedule: Any, taus: Sequence[float],
                   guidance: Any = None, generator: torch.Generator | None = None) -> list[tuple[float, Tensor]]:
        """States at the global times `taus` (e.g. SFD's phase picture at 0, Δt, 1, 1 + Δt).

        The times are added to the sampler's grid, so when they are off the grid a fixed-step result
        differs slightly from `__call__` (and an SDE draws its noise on the finer grid).
        Returns [(τ, x (N, C, H, W))] in the order given.
        """
        return self._run(model_fn, noise, y, schedule, guidance, generator, tuple(taus))[1]

    @torch.no_grad()
    def _run(self, model_fn: ModelFn, noise: Tensor, y: Tensor, schedule: Any, guidance: Any,
             generator: torch.Generator | None, taus: tuple[float, ...]) -> tuple[Tensor, list[tuple[float, Tensor]]]:
        parts, kept = phases(schedule, self.grid(schedule), taus)
        want, rec = set(kept), {0.0: noise}
        field, x = VelocityField(model_fn, y, schedule, guidance), noise
        for pts in parts:
            mid = 0.5 * (pts[0] + pts[-1])
            mask = schedule.groups.expand(schedule.drift_mask(torch.tensor([mid], dtype=torch.float64)))
            x = self.integrate_phase(field, x, pts, mask.to(x.device), want, rec, generator)   # mask (1, C, 1, 1)
        self.last_nfe = field.nfe
        return x, [(tau, rec[k]) for tau, k in zip(taus, kept)]


_PhasedSampler = PhasedSampler


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------

@SAMPLERS.register("ode")
class ODESampler(PhasedSampler):
    """Probability-flow ODE dx/dτ = mask(τ)·v(x, τ) from τ = 0 to tau_max (SiT ODE, SFD 3-phase, LightningDiT).

    Args:
        solver: "euler" | "heun" | "dopri5" (torchdiffeq, adaptive; SiT/SFD default)
        steps: grid points; fixed solvers take steps − 1 steps on linspace(0, tau_max, steps) plus the
            phase changes (SFD: τ = Δt and 1); for dopri5 only output times (unused by __call__)
        shift: timestep shift s on τ/tau_max (LightningDiT 0.3); 0 = off
        atol, rtol: dopri5 tolerances (SiT/SFD: 1e-6, 1e-3)
        last_step: the Heun rule at the end (docs/methods.md §15.3): "auto" (default) makes every Heun step
            that ends where a moving group's prediction is singular an Euler step (data prediction: the
            final step; no model call at t = 1, and with an exact x̂1 it lands on x̂1 as JiT's sampler);
            "euler": the final step (ending at tau_max) is always Euler; "heun": never switch (a model
            call at the end point, through the t_eps floor). Velocity prediction with "auto" is plain Heun.
            Euler ignores it (it never calls the model at a step's end); dopri5 with a prediction singular
            at the end is refused at build time (`check_schedule`).
    """

    def __init__(self, solver: str = "euler", steps: int = 250, shift: float = 0.0,
                 atol: float = 1e-6, rtol: float = 1e-3, last_step: str = "auto") -> None:
        if solver not in SOLVERS:
            raise ValueError(f"unknown ode solver {solver!r}; valid: {', '.join(SOLVERS)}")
        if shift < 0:
            raise ValueError(f"shift must be >= 0 (0 = off), got {shift}")
        if last_step not in LAST_STEPS:
            raise ValueError(f"unknown last_step {last_step!r}; valid: {', '.join(LAST_STEPS)}")
        self.solver, self.steps, self.shift = solver, int(steps), float(shift)
        self.atol, self.rtol = float(atol), float(rtol)
        self.last_step = last_step

    def check_schedule(self, schedule: Any) -> None:
        """dopri5 evaluates the end point t = 1, where a data-type prediction is singular: refused."""
        if self.solver == "dopri5" and singular_end(schedule, 0.0, float(schedule.tau_max)):
            name = getattr(getattr(schedule, "prediction", None), "name", "?")
            raise ValueError(f"ode solver 'dopri5' evaluates the model at t = 1, where prediction {name!r} is "
                             f"singular; use solver heun or euler (last_step auto makes no call there)")

    def euler_step_at(self, schedule: Any, a: float, b: float) -> bool:
        """Whether the Heun step a -> b is taken as an Euler step under `last_step` (public rule)."""
        if self.last_step == "heun":
            return False
        if self.last_step == "euler":
            return b == float(schedule.tau_max)
        return singular_end(schedule, a, b)

    def grid(self, schedule: Any) -> list[float]:
        tau_max = float(schedule.tau_max)
        return [0.0, tau_max] if self.solver == "dopri5" else time_grid(tau_max, self.steps, self.shift)

    def integrate_phase(self, field: VelocityField, x: Tensor, pts: list[float], mask: Tensor, want: set[float],
               rec: dict[float, Tensor], generator: torch.Generator | None) -> Tensor:
        if self.solver == "dopri5":
            return self._adaptive(field, x, pts, mask, want, rec)
        for a, b in zip(pts[:-1], pts[1:]):
            h = b - a
            d1 = field(x, a)[0]
            if self.solver == "euler" or self.euler_step_at(field.schedule, a, b):
                x = torch.where(mask, x + h * d1, x)
            else:                                        # Heun: trapezoid on an Euler predictor
                d2 = field(torch.where(mask, x + h * d1, x), b)[0]
                x = torch.where(mask, x + 0.5 * h * (d1 + d2), x)
            if b in want:
                rec[b] = x
        return x

    def _adaptive(self, field: VelocityField, x: Tensor, pts: list[float], mask: Tensor, want: set[float],
                  rec: dict[float, Tensor]) -> Tensor:
        """dopri5 over one phase; output only at the phase ends and the requested times."""
        out_t = [pts[0]] + [p for p in pts[1:-1] if p in want] + [pts[-1]]
        t = torch.tensor(out_t, dtype=torch.float64, device=x.device)

        def drift(tau: Tensor, z: Tensor) -> Tensor:
            return torch.where(mask, field(z, tau)[0], torch.zeros((), dtype=z.dtype, device=z.device))

        # step_t: the last step lands on the phase end instead of overshooting it (no model call
        # past tau_max, where a synchronous schedule's time would exceed 1).
        xs = odeint(drift, x, t, method="dopri5", atol=self.atol, rtol=self.rtol,
                    options={"step_t": t[-1:]})                                        # (len(t), N, C, H, W)
        # Outputs are interpolated, which can move a frozen group by an ulp; keep it exact.
        xs = torch.where(mask, xs, x)
        for p, xp in zip(out_t[1:], xs[1:]):
            if p in want:
                rec[p] = xp
        return xs[-1]


@SAMPLERS.register("sde")
class SDESampler(PhasedSampler):
    """Euler–Maruyama on the reverse SDE with SiT's "sigma" diffusion (SiT / REPA / ReDi headline, docs/methods.md §2-§4).

    Per group g with time t_g: w = 1 − t_g, score s = (t_g·v − x)/(1 − t_g) (linear path), drift
    v + w·s = v + t_g·v − x (the product needs no division, so t_g = 1 is safe), noise √(2w)·√Δτ·ξ.
    The grid has `steps` points on [0, tau_max − last_step]; then one deterministic step of size
    last_step to tau_max: "mean" uses the SDE drift (SiT's `last_step="Mean"`, REPA's last step),
    "euler" the velocity (SiT's "Euler"). NFE = steps. Drift and noise are both masked per phase.

    Args:
        steps: grid points (SiT/REPA/ReDi: 250)
        last_step: size of the final deterministic step (0.04); 0 = none
        last_step_mode: "mean" | "euler"
    """

    def __init__(self, steps: int = 250, last_step: float = 0.04, last_step_mode: str = "mean") -> None:
        if last_step_mode not in ("mean", "euler"):
            raise ValueError(f"unknown last_step_mode {last_step_mode!r}; valid: mean, euler")
        if last_step < 0:
            raise ValueError(f"last_step must be >= 0, got {last_step}")
        self.steps, self.last_step, self.last_step_mode = int(steps), float(last_step), last_step_mode

    def grid(self, schedule: Any) -> list[float]:
        tau_max = float(schedule.tau_max)
        if not self.last_step < tau_max:
            raise ValueError(f"last_step {self.last_step} must be < tau_max {tau_max}")
        grid = time_grid(tau_max - self.last_step, self.steps)
        return grid + [tau_max] if self.last_step > 0 else grid

    def integrate_phase(self, field: VelocityField, x: Tensor, pts: list[float], mask: Tensor, want: set[float],
               rec: dict[float, Tensor], generator: torch.Generator | None) -> Tensor:
        tau_max = float(field.schedule.tau_max)
        deterministic_from = tau_max - self.last_step - _SNAP * tau_max
        for a, b in zip(pts[:-1], pts[1:]):
            h = b - a
            v, t_groups = field(x, a)
            t = field.schedule.groups.expand(t_groups).to(x.dtype)      # (N, C, 1, 1)
            drift = v + (t * v - x)                                     # v + w·s
            if self.last_step > 0 and a >= deterministic_from:
                step = drift if self.last_step_mode == "mean" else v
                x = torch.where(mask, x + h * step, x)
            else:
                xi = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
                noise = torch.sqrt(2 * (1 - t).clamp_min(0)) * math.sqrt(h) * xi
                x = torch.where(mask, x + h * drift + noise, x)
            if b in want:
                rec[b] = x
        return x
