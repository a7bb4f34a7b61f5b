"""Prediction types of the flow (docs/methods.md §15) checked against an exact Gaussian solution, the
velocity/velocity path bit-identical to the plain flow, the last-step rule, and JiT's formulas (§13)."""
from __future__ import annotations

import pytest
import torch
import yaml
from pathlib import Path
from torch import nn

from core.registry import PREDICTIONS
from core.types import BackboneOut, Batch, Groups
from methods.base import LossCtx, training_losses
from methods.compose import build_method
from methods.losses import FlowLoss, mean_flat
from methods.prediction import DataPrediction, NoisePrediction, VelocityPrediction, build_prediction, convert
from methods.samplers import ODESampler, SDESampler, VelocityField, singular_end
from methods.schedules import AsyncFlow, Flow, linear_path

G1 = Groups(("texture",), (3,))
G2 = Groups(("texture", "semantic"), (3, 2))
GROUP_OF = torch.tensor([0, 0, 0, 1, 1])
MU = torch.tensor([0.5, -1.0, 2.0, 1.0, -0.5], dtype=torch.float64)
SIG = torch.tensor([0.5, 1.5, 0.3, 0.8, 1.2], dtype=torch.float64)
JIT_YAML = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "method" / "jit.yaml"


def _per_channel(t_model: torch.Tensor) -> torch.Tensor:
    """(N, 1) or (N, G=2) model times -> (N, 5, 1, 1) per-channel times (flow t_model is the raw t)."""
    return (t_model[:, GROUP_OF] if t_model.shape[1] > 1 else t_model)[:, :, None, None]


def exact(x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact posterior means for x1 ~ N(μ, σ²) per channel, x0 ~ N(0, 1), x_t = t·x1 + (1 − t)·x0:
    s_t² = t²σ² + (1 − t)², E[x1|x_t] = μ + tσ²(x_t − tμ)/s_t², E[x0|x_t] = (1 − t)(x_t − tμ)/s_t²."""
    mu, s2 = MU.to(x)[None, :, None, None], (SIG.to(x) ** 2)[None, :, None, None]
    st2 = t ** 2 * s2 + (1 - t) ** 2
    x1 = mu + t * s2 * (x - t * mu) / st2
    x0 = (1 - t) * (x - t * mu) / st2
    return {"data": x1, "noise": x0, "velocity": x1 - x0}


class Oracle:
    """The exact network of a prediction type: returns E[x1|x_t], E[x0|x_t] or the exact velocity."""

    def __init__(self, kind: str) -> None:
        self.kind, self.calls, self.times = kind, 0, []

    def __call__(self, x, t_model, y):
        self.calls += 1
        self.times.append(t_model.clone())
        return exact(x, _per_channel(t_model).to(x))[self.kind]


# ----------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------

def test_registry_has_the_builtins_with_their_singular_points():
    assert {"velocity", "data", "noise"} <= set(PREDICTIONS.names())
    assert (VelocityPrediction().singular_at, DataPrediction().singular_at, NoisePrediction().singular_at) == (None, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"unknown prediction 'x'; valid: .*data.*noise.*velocity"):
        build_prediction("x")
    with pytest.raises(ValueError, match=r"t_eps must be in \(0, 1\), got 0"):
        DataPrediction(t_eps=0)


@pytest.mark.parametrize("kind", ["data", "noise", "velocity"])
def test_conversion_gives_the_exact_velocity(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, 2, 2, generator=g, dtype=torch.float64) * 2
    t = torch.rand(64, 5, 1, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05     # the floor inactive
    ex = exact(x, t)
    p = build_prediction(kind, t_eps=0.01)
    v = p.to_velocity(ex[kind], x, t)
    torch.testing.assert_close(v, ex["velocity"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.from_velocity(ex["velocity"], x, t), ex[kind], rtol=1e-12, atol=1e-12)
    for other in ("data", "noise", "velocity"):                              # any space to any space
        q = build_prediction(other, t_eps=0.01)
        torch.testing.assert_close(convert(ex[kind], x, t, p, q), ex[other], rtol=1e-10, atol=1e-10)


def test_from_path_targets_and_floor():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 4, 5, 2, 2, generator=g, dtype=torch.float64)
    t = torch.full((4, 5, 1, 1), 0.3, dtype=torch.float64)
    xt = t * x1 + (1 - t) * x0
    for p in (DataPrediction(), NoisePrediction(), VelocityPrediction()):
        torch.testing.assert_close(p.to_velocity(p.from_path(x0, x1, xt, t), xt, t), x1 - x0, rtol=1e-12, atol=1e-12)
    t1 = torch.ones_like(t)                                         # t = 1: 1 − t floored at 0.05, finite
    torch.testing.assert_close(DataPrediction(0.05).to_velocity(x1 + 1, x1, t1), torch.full_like(x1, 20.0))
    torch.testing.assert_close(NoisePrediction(0.05).to_velocity(x0 - 1, x0, torch.zeros_like(t)),
                               torch.full_like(x0, 20.0))


def test_schedule_converts_with_per_group_times():
    """async-flow: each channel group uses its own time in the conversion (groups.expand, like linear_path)."""
    s = AsyncFlow(G2, {"texture": 0.3}, prediction="data")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, 2, 2, generator=g, dtype=torch.float64)
    tg = s.group_times(torch.linspace(0.1, 1.2, 8, dtype=torch.float64))    # (8, 2), semantic ahead
    t = G2.expand(tg)
    ex = exact(x, t)
    torch.testing.assert_close(s.to_velocity(ex["data"], x, tg)[:, :3], ex["velocity"][:, :3], rtol=1e-12, atol=1e-12)
    sem_ok = tg[:, 1] <= 0.95                                                 # semantic group not floored
    torch.testing.assert_close(s.to_velocity(ex["data"], x, tg)[sem_ok, 3:], ex["velocity"][sem_ok, 3:],
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Velocity prediction is the plain flow, bit for bit
# ----------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(5, 5, 1)

    def forward(self, x, t, y, hidden_at=()):
        return BackboneOut(self.conv(x) + t[:, :1, None, None])


def _batch() -> Batch:
    x1 = torch.randn(6, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    return Batch(x1, torch.zeros(6, dtype=torch.long), {})


def test_velocity_prediction_loss_is_bit_identical_to_the_old_formula():
    torch.manual_seed(0)
    model, sched, loss = Tiny(), Flow(G2, time_dist="logit-normal"), FlowLoss(G2)
    got = training_losses(model, _batch(), sched, loss, torch.Generator().manual_seed(7)).total
    g = torch.Generator().manual_seed(7)                       # the old training_losses, written out
    x1 = _batch().x1
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.sigmoid(torch.randn(6, generator=g))
    tt = t[:, None, None, None]
    xt = tt * x1 + (1 - tt) * x0
    ref = mean_flat((model(xt, t[:, None], None).out - (x1 - x0)) ** 2).mean()
    assert torch.equal(got, ref)
    x0b, x1b, tg = torch.randn(2, 6, 5, 4, 4), torch.randn(6, 5, 4, 4), torch.rand(6, 2)
    assert all(torch.equal(a, b) for a, b in zip(sched.path(x0b, x1b, tg), linear_path(x0b, x1b, tg, G2)))
    out = torch.randn(6, 5, 4, 4)
    assert sched.to_velocity(out, x1b, tg) is out                             # identity: the same tensor
    p, q = sched.to_loss_space(out, x1b, x0b, tg)
    assert p is out and q is x1b


def test_velocity_prediction_heun_is_bit_identical_to_a_hand_written_heun():
    sched, noise = Flow(G2), torch.randn(16, 5, 2, 2, generator=torch.Generator().manual_seed(4))
    model = Oracle("velocity")
    got = ODESampler("heun", steps=6)(model, noise, torch.zeros(16), schedule=sched)
    x, ts = noise, torch.linspace(0, 1, 6, dtype=torch.float64).tolist()
    ts[0], ts[-1] = 0.0, 1.0
    for a, b in zip(ts[:-1], ts[1:]):
        ta = torch.full((16, 1), a, dtype=torch.float32)
        d1 = model(x, ta, None)
        d2 = model(x + (b - a) * d1, torch.full((16, 1), b, dtype=torch.float32), None)
        x = x + 0.5 * (b - a) * (d1 + d2)
    assert torch.equal(got, x)


# ----------------------------------------------------------------------------------------------
# Sampling with the exact oracle
# ----------------------------------------------------------------------------------------------

def _target(noise: torch.Tensor) -> torch.Tensor:
    """The exact flow map of the Gaussian toy sends x0 to μ + σ·x0."""
    return MU.to(noise)[None, :, None, None] + SIG.to(noise)[None, :, None, None] * noise


def test_data_prediction_heun_lands_on_the_target_and_makes_no_call_at_t1():
    """t_eps small so that the floor never bites on the grid (JiT's 0.05 floors the steps from t > 0.95,
    docs/methods.md §13): then Heun with the Euler last step converges to the exact flow map, while Heun
    evaluating t = 1 (x̂1 = x there, so the floored velocity is 0) stops short and does not converge."""
    sched = Flow(G2, prediction="data", t_eps=1e-3)
    noise = torch.randn(256, 5, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    errs = {}
    for steps in (21, 51):
        for rule in ("auto", "euler", "heun"):
            oracle = Oracle("data")
            s = ODESampler("heun", steps=steps, last_step=rule)
            x = s(oracle, noise, torch.zeros(256), schedule=sched)
            errs[steps, rule] = (x - _target(noise)).abs().max().item()
            top = max(t.max().item() for t in oracle.times)
            assert (top < 1.0) == (rule != "heun"), (rule, top)
            assert s.last_nfe == 2 * (steps - 1) - (rule != "heun")
    assert errs[21, "auto"] == errs[21, "euler"] < 0.02 and errs[51, "auto"] == errs[51, "euler"] < 3e-3
    assert errs[51, "heun"] > 20 * errs[51, "auto"] and errs[51, "heun"] > 0.3 * errs[21, "heun"]


def test_velocity_and_data_oracles_agree_and_euler_ignores_the_rule():
    noise = torch.randn(64, 5, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    xv = ODESampler("heun", steps=21)(Oracle("velocity"), noise, torch.zeros(64), schedule=Flow(G2))
    assert (xv - _target(noise)).abs().max() < 0.02                  # velocity prediction: plain Heun
    e1 = ODESampler("euler", steps=41, last_step="heun")(Oracle("data"), noise, torch.zeros(64), schedule=Flow(G2, prediction="data"))
    e2 = ODESampler("euler", steps=41, last_step="auto")(Oracle("data"), noise, torch.zeros(64), schedule=Flow(G2, prediction="data"))
    assert torch.equal(e1, e2)


def test_async_data_prediction_switches_at_each_groups_end():
    """SFD's schedule with x-prediction: the semantic group reaches t = 1 at τ = 1 (a phase end) and the
    texture group at τ = 1.3; neither end is evaluated, and the sample lands on the target."""
    sched = AsyncFlow(G2, {"texture": 0.3}, prediction="data", t_eps=1e-3)
    assert singular_end(sched, 0.9, 1.0) and singular_end(sched, 1.2, 1.3) and not singular_end(sched, 0.5, 0.6)
    assert not singular_end(AsyncFlow(G2, {"texture": 0.3}), 1.2, 1.3)
    noise = torch.randn(64, 5, 2, 2, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    oracle = Oracle("data")
    x = ODESampler("heun", steps=27)(oracle, noise, torch.zeros(64), schedule=sched)
    assert (x - _target(noise)).abs().max() < 0.03
    assert all(t[0, 0] < 1.0 for t in oracle.times)                  # texture (moves last) never called at 1


def test_sde_integrates_the_converted_velocity():
    sched = Flow(G1, prediction="data")
    noise = torch.randn(1024, 3, 2, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def oracle(x, t_model, y):
        mu, s2 = MU[:3].to(x)[None, :, None, None], (SIG[:3].to(x) ** 2)[None, :, None, None]
        t = t_model[:, :, None, None].to(x)
        return mu + t * s2 * (x - t * mu) / (t ** 2 * s2 + (1 - t) ** 2)

    x = SDESampler(steps=100)(oracle, noise, torch.zeros(1024), schedule=sched,
                              generator=torch.Generator().manual_seed(0))
    flat = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(flat.mean(1), MU[:3], atol=0.08, rtol=0)
    torch.testing.assert_close(flat.std(1), SIG[:3], atol=0.08, rtol=0.1)


def test_velocity_field_is_public_and_counts_calls():
    field = VelocityField(Oracle("data"), torch.zeros(4), Flow(G2, prediction="data"), None)
    x = torch.randn(4, 5, 2, 2, dtype=torch.float64)
    v, tg = field(x, 0.4)
    torch.testing.assert_close(v, exact(x, G2.expand(tg).to(x))["velocity"], rtol=1e-12, atol=1e-12)
    out, _ = field.output(x, 0.4)
    assert field.nfe == 2 and out.shape == x.shape


def test_last_step_value_is_checked():
    with pytest.raises(ValueError, match=r"unknown last_step 'midpoint'; valid: auto, euler, heun"):
        ODESampler("heun", last_step="midpoint")


# ----------------------------------------------------------------------------------------------
# JiT (docs/methods.md §13)
# ----------------------------------------------------------------------------------------------

def test_jit_x_prediction_v_loss_equals_the_hand_formula():
    """JiT: v̂ = (x̂ − z)/max(1 − t, t_eps), v = (x − z)/max(1 − t, t_eps), loss = mean((v̂ − v)²); the clamp
    bites at t > 0.95 (t = 0.99 divides by 0.05, not 0.01)."""
    sched = Flow(G1, prediction="data", loss_target="velocity", t_eps=0.05)
    g = torch.Generator().manual_seed(10)
    x0, x1, xhat = torch.randn(3, 4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.97, 0.99], dtype=torch.float64)
    xt, target = sched.path(x0, x1, t[:, None])
    assert torch.equal(target, x1)                                          # target in prediction space
    pred, tgt = sched.to_loss_space(xhat, target, xt, t[:, None])
    den = (1 - t).clamp_min(0.05)[:, None, None, None]
    torch.testing.assert_close(pred, (xhat - xt) / den, rtol=1e-14, atol=0)
    torch.testing.assert_close(tgt, (x1 - xt) / den, rtol=1e-14, atol=0)
    assert den[3].item() == 0.05 and abs(den[0].item() - 0.8) < 1e-15
    torch.testing.assert_close(tgt[:2], (x1 - x0)[:2], rtol=1e-12, atol=1e-12)   # unclamped: v = x1 − x0
    ctx = LossCtx(x0=x0, x1=x1, xt=xt, t_groups=t[:, None], batch=Batch(x1, torch.zeros(4), {}), schedule=sched)
    loss = FlowLoss(G1)(BackboneOut(pred), tgt, ctx).total
    torch.testing.assert_close(loss, (((xhat - x1) / den) ** 2).flatten(1).mean(1).mean(), rtol=1e-12, atol=0)


def test_jit_training_losses_feed_the_loss_in_velocity_space():
    sched = Flow(G2, prediction="data", loss_target="velocity", time_dist="logit-normal", time_mean=-0.8, time_std=0.8)
    torch.manual_seed(0)
    model = Tiny()
    got = training_losses(model, _batch(), sched, FlowLoss(G2), torch.Generator().manual_seed(11)).total
    g = torch.Generator().manual_seed(11)
    x1 = _batch().x1
    x0 = torch.randn(x1.shape, generator=g)
    t = torch.sigmoid(torch.randn(6, generator=g) * 0.8 - 0.8)
    tt = t[:, None, None, None]
    xt = tt * x1 + (1 - tt) * x0
    den = (1 - tt).clamp_min(0.05)
    ref = mean_flat(((model(xt, t[:, None], None).out - xt) / den - (x1 - xt) / den) ** 2).mean()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_jit_preset_builds_with_the_papers_sampler():
    m = yaml.safe_load(JIT_YAML.read_text())["method"]
    meth = build_method(m, groups=Groups(("texture",), (4,)), null_label=10)
    s = meth.schedule
    assert (s.prediction.name, s.loss_target.name, s.t_eps, s.time_mean, s.time_std) == ("data", "velocity", 0.05, -0.8, 0.8)
    assert (meth.sampler.solver, meth.sampler.steps, meth.sampler.last_step) == ("heun", 51, "auto")
    noise = torch.randn(2, 4, 2, 2)
    meth.sampler(lambda x, t, y: torch.zeros_like(x), noise, torch.zeros(2), schedule=s)
    assert meth.sampler.last_nfe == 99                                   # 49 Heun steps + 1 Euler step
