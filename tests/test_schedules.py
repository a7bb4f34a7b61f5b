"""Numerical invariants of the flow schedules and time helpers (docs/methods.md §11.1-11.4, §11.12)."""
import math

import pytest
import torch

from core.registry import SCHEDULES
from core.types import BackboneOut, Batch, Groups
from methods import base
from methods.losses import FlowLoss
from methods.schedules import AsyncFlow, Flow, linear_path, shift_tau, shift_time
from repa_ref import project_to_repa, repa_to_project

SFD_GROUPS = Groups(("texture", "semantic"), (32, 16))
SMALL = Groups(("texture", "semantic"), (3, 2))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- §11.1 linear path ------------------------------------------------------------------------------

def test_linear_path_endpoints_and_target():
    g = _gen()
    x0, x1 = torch.randn(4, 5, 3, 3, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    for t in (0.0, 1.0):
        xt, u = linear_path(x0, x1, torch.full((4, 2), t), SMALL)
        assert torch.equal(xt, x0 if t == 0.0 else x1)
        assert torch.equal(u, x1 - x0)
    t_groups = torch.rand(4, 2, generator=g)
    xt, u = linear_path(x0, x1, t_groups, SMALL)
    t = SMALL.expand(t_groups)                                         # (N, C, 1, 1)
    torch.testing.assert_close(xt + (1 - t) * u, x1)
    # each group follows its own time
    torch.testing.assert_close(xt[:, 3:], t_groups[:, 1, None, None, None] * x1[:, 3:]
                               + (1 - t_groups[:, 1, None, None, None]) * x0[:, 3:])


# -- §11.2 REPA conversion --------------------------------------------------------------------------

def test_repa_conversion_matches_repa_path():
    g = _gen(1)
    x, eps = torch.randn(6, 4, 2, 2, generator=g), torch.randn(6, 4, 2, 2, generator=g)
    t_repa = torch.rand(6, generator=g)
    tr = t_repa[:, None, None, None]
    xt_repa, v_repa = (1 - tr) * x + tr * eps, eps - x                # REPA loss.py convention
    assert torch.equal((1 - 0.0) * x + 0.0 * eps, x)                  # t_REPA = 0 is data
    t, v = repa_to_project(t_repa, v_repa)
    xt, u = Flow(Groups(("texture",), (4,))).path(eps, x, t[:, None])  # project: x0 = ε, x1 = x
    torch.testing.assert_close(xt, xt_repa)
    torch.testing.assert_close(v, u)
    t_back, v_back = project_to_repa(t, v)
    torch.testing.assert_close(t_back, t_repa)
    assert torch.equal(v_back, v_repa)


# -- §11.3 SFD time map ------------------------------------------------------------------------------

def test_sfd_time_map():
    sched = AsyncFlow(SFD_GROUPS, delta_t={"texture": 0.3})
    assert sched.tau_max == pytest.approx(1.3) and sched.num_time_inputs == 2
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)
    tg = sched.group_times(t * sched.tau_max)
    t_tex, t_sem = tg[:, 0], tg[:, 1]
    lo, hi = 0.3 / 1.3, 1 / 1.3
    assert lo == pytest.approx(0.230769, abs=1e-6) and hi == pytest.approx(0.769231, abs=1e-6)
    away = ((t - lo).abs() > 1e-9) & ((t - hi).abs() > 1e-9)           # skip rounding at the kinks
    assert torch.equal((t_tex == 0)[away], (t <= lo)[away])
    assert torch.equal((t_sem == 1)[away], (t >= hi)[away])
    mid = (t >= lo) & (t <= hi)
    torch.testing.assert_close(t_sem[mid] - t_tex[mid], torch.full_like(t_sem[mid], 0.3))
    assert (t_sem >= t_tex).all() and (tg >= 0).all() and (tg <= 1).all()
    assert sched.model_time(tg).shape == (t.shape[0], 2)


def test_drift_mask_phases():
    sched = AsyncFlow(SFD_GROUPS, delta_t={"texture": 0.3})
    tau = torch.tensor([0.0, 0.2, 0.3, 0.5, 1.0, 1.1, 1.3])
    m = sched.drift_mask(tau)
    assert m[:, 0].tolist() == [False, False, True, True, True, True, True]     # texture from τ ≥ Δt
    assert m[:, 1].tolist() == [True, True, True, True, True, False, False]     # semantic until τ ≤ 1
    assert Flow(SFD_GROUPS).drift_mask(tau).all()


# -- §11.4 clamp probabilities -----------------------------------------------------------------------

def clamp_probability(delta_t: float, mean: float = 0.0, std: float = 1.0) -> float:
    """P(t_tex = 0) under logit-normal(mean, std) for SFD lag Δt: Φ((logit(Δt/(1+Δt)) − mean)/std).

    With mean 0, std 1 this is Φ(ln Δt) (docs/methods.md §6.3, §11.4); by symmetry it is also P(t_sem = 1).
    """
    z = (math.log(delta_t) - mean) / std                       # logit(Δt/(1+Δt)) = ln Δt
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_clamp_probability_logit_normal():
    assert clamp_probability(0.3) == pytest.approx(0.1143, abs=1e-4)
    sched = AsyncFlow(SFD_GROUPS, delta_t={"texture": 0.3}, time_dist="logit-normal")
    t = sched.sample_t(200_000, device="cpu", generator=_gen(2))
    tg = sched.group_times(t * sched.tau_max)
    assert (tg[:, 0] == 0).double().mean().item() == pytest.approx(0.1143, abs=0.005)
    assert (tg[:, 1] == 1).double().mean().item() == pytest.approx(0.1143, abs=0.005)


def test_time_samples_in_range_and_seeded():
    for dist in ("uniform", "logit-normal"):
        s = Flow(SMALL, time_dist=dist)
        a = s.sample_t(1000, device="cpu", generator=_gen(3))
        assert a.shape == (1000,) and (a >= 0).all() and (a <= 1).all()
        assert torch.equal(a, s.sample_t(1000, device="cpu", generator=_gen(3)))
    ln = Flow(SMALL, time_dist="logit-normal", time_mean=0.5, time_std=2.0).sample_t(
        4, device="cpu", generator=_gen(4))
    torch.testing.assert_close(ln, torch.sigmoid(torch.randn(4, generator=_gen(4)) * 2.0 + 0.5))


# -- §11.12 timestep shift ---------------------------------------------------------------------------

def test_shift_time():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.3, 1.0, 3.0):
        f = shift_time(t, s)
        assert f[0] == 0 and f[-1] == 1 and (f.diff() > 0).all()
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert shift_time(torch.tensor(0.5, dtype=torch.float64), 0.3).item() == pytest.approx(0.3 / 1.3)
    tau = torch.tensor([0.0, 0.65, 1.3], dtype=torch.float64)
    out = shift_tau(tau, 0.3, 1.3)
    assert out[0] == 0 and out[-1] == 1.3          # endpoints exact: the sampler ends at tau_max
    assert out[1].item() == pytest.approx(1.3 * 0.3 / 1.3)
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


# -- knob off: async flow with Δt = 0 is the flow -----------------------------------------------------

class _FixedModel(torch.nn.Module):
    """A deterministic stand-in that uses x and the first model time."""

    def forward(self, x, t, y, *, hidden_at=()):
        return BackboneOut(out=0.5 * x + t[:, :1, None, None], hidden={})


@pytest.mark.parametrize("dist", ["uniform", "logit-normal"])
def test_async_zero_lag_equals_flow_bit_for_bit(dist):
    flow = Flow(SMALL, time_dist=dist)
    for delta in ({}, {"texture": 0.0}):
        asyn = AsyncFlow(SMALL, delta_t=delta, time_dist=dist)
        assert asyn.tau_max == 1.0
        outs = []
        for sched in (flow, asyn):
            g = _gen(5)
            x1 = torch.randn(8, 5, 4, 4, generator=_gen(6))
            x0 = torch.randn(x1.shape, generator=g)
            t = sched.sample_t(8, device="cpu", generator=g)
            tg = sched.group_times(t * sched.tau_max)
            outs.append((t, tg, *sched.path(x0, x1, tg), sched.model_time(tg)[:, :1]))
        for a, b in zip(*outs):
            assert torch.equal(a, b)
        losses = [base.training_losses(_FixedModel(), Batch(torch.randn(8, 5, 4, 4, generator=_gen(7)),
                                                              torch.zeros(8, dtype=torch.long)),
                                       s, FlowLoss(SMALL), generator=_gen(8)).total for s in (flow, asyn)]
        assert torch.equal(losses[0], losses[1])


# -- construction and validation ---------------------------------------------------------------------

def test_registry_and_validation():
    for name in ("flow", "async-flow"):
        assert name in SCHEDULES
    s = SCHEDULES.build({"name": "async-flow", "delta_t": {"texture": 0.3}, "time_dist": "logit-normal"},
                        groups=SFD_GROUPS)
    assert isinstance(s, AsyncFlow) and s.out_channels(48) == 48
    with pytest.raises(TypeError):
        SCHEDULES.build({"name": "flow", "time_distt": "uniform"}, groups=SMALL)
    with pytest.raises(ValueError, match="valid groups: texture, semantic"):
        AsyncFlow(SMALL, delta_t={"textur": 0.3})
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            AsyncFlow(SMALL, delta_t={"texture": bad})
    with pytest.raises(ValueError, match="time_dist"):
        Flow(SMALL, time_dist="lognorm")


def test_flow_model_time_and_scale():
    tg = torch.rand(3, 2, generator=_gen(9))
    tg[:, 1] = tg[:, 0]
    assert torch.equal(Flow(SMALL).model_time(tg), tg[:, :1])
    torch.testing.assert_close(Flow(SMALL, model_time_scale=1000.0).model_time(tg), 1000 * tg[:, :1])
    assert math.isclose(AsyncFlow(SMALL, delta_t={"semantic": 0.2}).tau_max, 1.2)
