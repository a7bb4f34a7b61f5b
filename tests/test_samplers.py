"""Samplers on an analytic Gaussian toy (the flow_matching test pattern) and SFD's phase invariants
(docs/methods.md §2, §6.6, §11.5, §11.12)."""
from __future__ import annotations

import pytest
import torch

from core.registry import SAMPLERS, SCHEDULES
from core.types import Groups
from methods.guidance import build_guidance
from methods.samplers import ODESampler, SDESampler, phases, time_grid

GROUPS = Groups(("texture", "semantic"), (3, 2))
GROUP_OF = torch.tensor([0, 0, 0, 1, 1])          # channel -> group
MU = torch.tensor([0.5, -1.0, 2.0, 1.0, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([0.5, 1.5, 0.3, 0.8, 1.2], dtype=torch.float64)
DT = 0.3


class GaussToy:
    """Exact velocity of the linear path x_t = t·x1 + (1 − t)·x0 for x1 ~ N(μ, σ²) per channel, x0 ~ N(0, 1).

    x_t ~ N(tμ, s_t²) with s_t² = t²σ² + (1 − t)²; E[x1 | x_t] = μ + tσ²(x_t − tμ)/s_t² and
    E[x0 | x_t] = (1 − t)(x_t − tμ)/s_t², so v = E[x1 − x0 | x_t] = μ + (tσ² − (1 − t))(x_t − tμ)/s_t²
    (no division by 1 − t). The flow map is x_t = tμ + s_t·x0, so x0 lands exactly on μ + σ·x0.
    Each channel uses its own group's time (t_model is (N, 1) for "flow", (N, G) for "async-flow").
    """

    def __init__(self, out_factor: int = 1) -> None:
        self.calls, self.times, self.out_factor = 0, [], out_factor

    def __call__(self, x, t_model, y):
        self.calls += 1
        self.times.append(t_model.clone())
        t = (t_model[:, GROUP_OF] if t_model.shape[1] > 1 else t_model)[:, :, None, None]   # (N, C|1, 1, 1)
        mu, s2 = MU.to(x)[None, :, None, None], (SIGMA.to(x) ** 2)[None, :, None, None]
        v = mu + (t * s2 - (1 - t)) / (t ** 2 * s2 + (1 - t) ** 2) * (x - t * mu)
        return torch.cat([v] * self.out_factor, dim=1)


def flow():
    return SCHEDULES.build({"name": "flow"}, groups=GROUPS)


def async_flow(lag: float = DT):
    return SCHEDULES.build({"name": "async-flow", "delta_t": {"texture": lag}}, groups=GROUPS)


def noise(n: int = 2000, seed: int = 0, dtype=torch.float64):
    return torch.randn(n, 5, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(n: int):
    return torch.zeros(n, dtype=torch.long)


def exact(x0):
    return MU[None, :, None, None].to(x0) + SIGMA[None, :, None, None].to(x0) * x0


def check_moments(x1, tol_mu, tol_sd):
    mean, std = x1.mean(dim=(0, 2, 3)), x1.std(dim=(0, 2, 3))
    assert torch.allclose(mean, MU, atol=tol_mu), (mean, MU)
    assert torch.allclose(std, SIGMA, atol=tol_sd), (std, SIGMA)


# ----------------------------------------------------------------------------------------------
# Registry, construction, grids
# ----------------------------------------------------------------------------------------------

def test_registered_and_built_from_config():
    assert {"ode", "sde"} <= set(SAMPLERS.names())
    s = SAMPLERS.build({"name": "ode", "solver": "heun", "steps": 5, "shift": 0.3})
    assert (s.solver, s.steps, s.shift) == ("heun", 5, 0.3)
    with pytest.raises(ValueError, match="euler, heun, dopri5"):
        ODESampler(solver="rk45")
    with pytest.raises(TypeError, match="stpes"):
        SAMPLERS.build({"name": "sde", "stpes": 10})


def test_shift_grid_endpoints_and_value():
    for tau_max in (1.0, 1.0 + DT):
        g = time_grid(tau_max, 11, shift=0.3)
        assert g[0] == 0.0 and g[-1] == tau_max
        assert all(a < b for a, b in zip(g[:-1], g[1:]))
    assert time_grid(1.0, 3, shift=0.3)[1] == pytest.approx(0.3 * 0.5 / (1 + (0.3 - 1) * 0.5))   # ≈ 0.2308
    assert time_grid(1.3, 14) == torch.linspace(0, 1.3, 14, dtype=torch.float64).tolist()[:-1] + [1.3]


def test_shifted_ode_sees_the_shifted_times_and_ends_at_tau_max():
    model, sch = GaussToy(), async_flow()
    ODESampler(solver="heun", steps=6, shift=0.3)(model, noise(4), labels(4), schedule=sch)
    t_sem = torch.stack([t[0, 1] for t in model.times])
    t_tex = torch.stack([t[0, 0] for t in model.times])
    assert t_sem[0] == 0 and t_tex.max() == 1.0          # Heun evaluates the last point τ = 1 + Δt
    # The first steps are short (s = 0.3 crowds the noisy end).
    assert t_sem[2] < (1 + DT) / 5 / 2


# ----------------------------------------------------------------------------------------------
# Gaussian toy: transport to the target
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,tol", [({"solver": "euler", "steps": 400}, 2e-2), ({"solver": "heun", "steps": 40}, 2e-3),
                                    ({"solver": "dopri5"}, 5e-2), ({"solver": "dopri5", "rtol": 1e-6}, 1e-4)])
def test_ode_transports_gaussian(kw, tol):
    x0 = noise()
    sampler = ODESampler(**kw)
    x1 = sampler(GaussToy(), x0, labels(len(x0)), schedule=flow())
    assert (x1 - exact(x0)).abs().max() < tol
    check_moments(x1, 0.1, 0.1)
    assert x1.dtype == x0.dtype and x1.shape == x0.shape


def test_heun_beats_euler_at_equal_steps():
    x0 = noise(500)
    err = {s: (ODESampler(solver=s, steps=12)(GaussToy(), x0, labels(500), schedule=flow()) - exact(x0)).abs().max()
           for s in ("euler", "heun")}
    assert err["heun"] < 0.2 * err["euler"]


def test_sde_reaches_target_distribution():
    x0 = noise(3000)
    gen = torch.Generator().manual_seed(1)
    x1 = SDESampler(steps=100)(GaussToy(), x0, labels(3000), schedule=flow(), generator=gen)
    check_moments(x1, 0.1, 0.12)


def test_sde_same_generator_same_sample_and_last_step_modes():
    x0, sch = noise(8), async_flow()
    a = SDESampler(steps=20)(GaussToy(), x0, labels(8), schedule=sch, generator=torch.Generator().manual_seed(3))
    b = SDESampler(steps=20)(GaussToy(), x0, labels(8), schedule=sch, generator=torch.Generator().manual_seed(3))
    c = SDESampler(steps=20, last_step_mode="euler")(GaussToy(), x0, labels(8), schedule=sch,
                                                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()


def test_float32_learned_sigma_channels_are_dropped():
    x0 = noise(16, dtype=torch.float32)
    plain = ODESampler(steps=8)(GaussToy(), x0, labels(16), schedule=flow())
    wide = ODESampler(steps=8)(GaussToy(out_factor=2), x0, labels(16), schedule=flow())
    assert wide.dtype == torch.float32 and torch.equal(plain, wide)


# ----------------------------------------------------------------------------------------------
# SFD invariants (§11.5) and knob-off (Δt = 0) equality
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver", ["euler", "heun", "dopri5"])
def test_sfd_phase_invariants(solver):
    x0, sch = noise(64), async_flow()
    sampler = ODESampler(solver=solver, steps=27)
    traj = sampler.trajectory(GaussToy(), x0, labels(64), schedule=sch, taus=[0.0, DT, 1.0, 1.0 + DT])
    assert [tau for tau, _ in traj] == [0.0, DT, 1.0, 1.0 + DT]
    states = [x for _, x in traj]
    tex, sem = GROUPS.slice_of("texture"), GROUPS.slice_of("semantic")
    assert torch.equal(states[0], x0)
    assert torch.equal(states[1][:, tex], x0[:, tex])             # texture frozen until τ = Δt
    assert not torch.equal(states[1][:, sem], x0[:, sem])         # semantics moved in phase I
    assert torch.equal(states[3][:, sem], states[2][:, sem])      # semantics frozen after τ = 1
    final = sampler(GaussToy(), x0, labels(64), schedule=sch)
    tol = {"euler": 0.4, "heun": 2e-2, "dopri5": 2e-2}[solver]
    assert (final - exact(x0)).abs().max() < tol                 # both groups ran their full time


def test_sfd_phases_end_exactly_at_tau_max():
    sch = async_flow()
    parts, kept = phases(sch, time_grid(sch.tau_max, 250), [])
    assert len(parts) == 3 and parts[-1][-1] == 1.0 + DT and parts[0][0] == 0.0
    assert parts[0][-1] == DT and parts[1][-1] == 1.0 and kept == []


def test_sfd_texture_model_input_is_noise_in_phase_one():
    seen = []

    def model(x, t, y):
        if t[0, 0] == 0:                                        # t_tex = 0: phase I
            seen.append(x[:, :3].clone())
        return GaussToy()(x, t, y)

    x0 = noise(4)
    SDESampler(steps=30)(model, x0, labels(4), schedule=async_flow(), generator=torch.Generator().manual_seed(0))
    assert len(seen) > 3 and all(torch.equal(s, x0[:, :3]) for s in seen)


@pytest.mark.parametrize("cfg", [{"name": "ode", "solver": "euler", "steps": 9},
                                 {"name": "ode", "solver": "heun", "steps": 9, "shift": 0.3},
                                 {"name": "ode", "solver": "dopri5"},
                                 {"name": "sde", "steps": 9}])
def test_async_with_zero_lag_equals_plain_flow_bit_for_bit(cfg):
    x0, y = noise(32, dtype=torch.float32), labels(32)
    out = []
    for sch in (flow(), async_flow(0.0)):
        gen = torch.Generator().manual_seed(5)
        out.append(SAMPLERS.build(cfg)(GaussToy(), x0, y, schedule=sch, generator=gen))
    assert torch.equal(out[0], out[1])


# ----------------------------------------------------------------------------------------------
# NFE and trajectories
# ----------------------------------------------------------------------------------------------

def test_nfe_counts_and_one_batched_cfg_forward_per_step():
    x0, y = noise(6), labels(6)
    cases = ((ODESampler(steps=11), 10), (ODESampler(solver="heun", steps=11), 20), (SDESampler(steps=11), 11))
    for sampler, nfe in cases:
        model = GaussToy()
        guidance = build_guidance({"name": "cfg", "scale": 2.0}, null_label=10)
        sampler(model, x0, y, schedule=flow(), guidance=guidance, generator=torch.Generator().manual_seed(0))
        assert sampler.last_nfe == model.calls == nfe
    dop = ODESampler(solver="dopri5")
    dop(GaussToy(), x0, y, schedule=flow())
    assert dop.last_nfe > 0


def test_trajectory_order_and_range():
    x0 = noise(4)
    s = ODESampler(steps=5)
    traj = s.trajectory(GaussToy(), x0, labels(4), schedule=flow(), taus=[1.0, 0.0, 0.5])
    assert [t for t, _ in traj] == [1.0, 0.0, 0.5]
    assert torch.equal(traj[0][1], s(GaussToy(), x0, labels(4), schedule=flow())) and torch.equal(traj[1][1], x0)
    with pytest.raises(ValueError, match="outside"):
        s.trajectory(GaussToy(), x0, labels(4), schedule=flow(), taus=[1.5])
