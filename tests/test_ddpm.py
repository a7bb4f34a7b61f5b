"""DDPM schedule, VLB and respaced ancestral sampler (docs/methods.md §1, §11.13)."""
import pytest
import torch

from core.registry import LOSSES, SAMPLERS, SCHEDULES
from core.types import BackboneOut, Batch, Groups
from methods import base
from methods.ddpm import (DDPM, DDPMLoss, DDPMSampler, p_mean_logvar, q_posterior, respace,
                          respaced_indices, vlb_bits)

G1 = Groups(("texture",), (2,))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_beta_schedule_values():
    c = DDPM(G1).consts
    assert c.betas.dtype == torch.float64 and c.num_timesteps == 1000
    assert c.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert c.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert c.alphas_cumprod[0].item() == pytest.approx(0.9999, rel=1e-12)
    assert c.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    assert c.posterior_variance[0] == 0 and torch.isfinite(c.posterior_log_variance_clipped).all()
    assert c.posterior_log_variance_clipped[0] == c.posterior_log_variance_clipped[1]


def test_time_conversion_round_trip_exact():
    s = DDPM(G1)
    idx = torch.arange(1000)
    t = s.index_to_t(idx)
    assert t.dtype == torch.float32 and t[0] == 1.0 and t[-1] == 0.0     # index 0 data = t 1
    assert torch.equal(s.t_to_index(t), idx)
    assert torch.equal(s.model_time(s.group_times(t)), idx.float()[:, None])
    drawn = s.sample_t(5000, device="cpu", generator=_gen())
    back = s.t_to_index(drawn)
    assert back.min() >= 0 and back.max() <= 999 and torch.equal(s.index_to_t(back), drawn)


def test_path_and_out_channels():
    s = SCHEDULES.build({"name": "ddpm"}, groups=G1)
    assert s.out_channels(4) == 8 and s.tau_max == 1.0 and s.drift_mask(torch.zeros(3)).all()
    g = _gen(1)
    x0, x1 = torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, 2, 2, 2, generator=g)
    idx = torch.tensor([0, 500, 999])
    xt, target = s.path(x0, x1, s.group_times(s.index_to_t(idx)))
    ab = s.consts.alphas_cumprod[idx].float()[:, None, None, None]
    torch.testing.assert_close(xt, ab.sqrt() * x1 + (1 - ab).sqrt() * x0)
    assert torch.equal(target, x0)


def test_vlb_zero_for_exact_model_and_detached_mean():
    s = DDPM(G1)
    g = _gen(2)
    x0 = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=g)
    x1 = torch.rand(4, 2, 3, 3, dtype=torch.float64, generator=g)
    idx = torch.tensor([1, 10, 500, 999])
    xt, eps = s.path(x0, x1, s.group_times(s.index_to_t(idx)))
    v = -torch.ones_like(eps)                        # f = 0: the model variance is β̃ (the posterior's)
    kl = vlb_bits(s.consts, x1, xt, idx, eps, v)
    torch.testing.assert_close(kl, torch.zeros(4, dtype=torch.float64), atol=1e-9, rtol=0)
    mean, logvar = p_mean_logvar(s.consts, eps, v, xt, idx)
    tm, tlv = q_posterior(s.consts, x1, xt, idx)
    torch.testing.assert_close(mean, tm)
    torch.testing.assert_close(logvar, tlv.expand_as(logvar))
    nll = vlb_bits(s.consts, x1, xt, torch.zeros(4, dtype=torch.long), eps, v)
    assert (nll > 0).all() and torch.isfinite(nll).all()


def test_loss_vlb_trains_only_variance():
    s, loss = DDPM(G1), LOSSES.build({"name": "ddpm"}, groups=G1)
    g = _gen(3)
    batch = Batch(torch.randn(4, 2, 3, 3, generator=g), torch.zeros(4, dtype=torch.long))
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    tg = s.group_times(s.index_to_t(torch.tensor([0, 3, 300, 999])))
    xt, target = s.path(x0, batch.x1, tg)
    out = torch.randn(4, 4, 3, 3, generator=g, requires_grad=True)
    ctx = base.LossCtx(x0=x0, x1=batch.x1, xt=xt, t_groups=tg, batch=batch, schedule=s)
    res = loss(BackboneOut(out), target, ctx)
    assert set(res.terms) == {"mse", "vlb"}
    res.total.backward()
    eps_grad = 2 * (out[:, :2] - target).detach() / out[:, :2].numel()   # d mean((ε̂ − ε)²) / dε̂
    torch.testing.assert_close(out.grad[:, :2], eps_grad)
    assert out.grad[:, 2:].abs().sum() > 0
    with pytest.raises(ValueError, match="2C"):
        loss(BackboneOut(out[:, :2]), target, ctx)


def test_respacing():
    kept = respaced_indices(1000, 250)
    assert kept.shape == (250,) and kept[0] == 0 and kept[-1] == 999 and (kept.diff() > 0).all()
    c = DDPM(G1).consts
    r = respace(c, kept)
    torch.testing.assert_close(r.alphas_cumprod, c.alphas_cumprod[kept])
    full = respace(c, respaced_indices(1000, 1000))
    torch.testing.assert_close(full.betas, c.betas)
    with pytest.raises(ValueError):
        respaced_indices(1000, 1)


def _oracle(schedule: DDPM, mu: float, sd: float, seen: list):
    """Exact E[ε | x_i] for data ~ N(mu, sd²) elementwise; v = 0 (variance halfway in log space)."""
    ab_all = schedule.consts.alphas_cumprod

    def model(x, t_model, y):
        seen.append(t_model[0, 0].item())
        ab = ab_all[t_model[:, 0].long()].to(x.dtype)[:, None, None, None]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * sd ** 2 + 1 - ab)
        return torch.cat([eps, torch.zeros_like(eps)], 1)
    return model


def test_sampler_gaussian_toy_reaches_data():
    s, mu, sd = DDPM(G1), 0.5, 0.3
    seen: list = []
    sampler = SAMPLERS.build({"name": "ddpm", "steps": 100})
    noise = torch.randn(500, 2, 4, 4, generator=_gen(4))
    x = sampler(_oracle(s, mu, sd, seen), noise, torch.zeros(500, dtype=torch.long), schedule=s, generator=_gen(5))
    assert x.shape == noise.shape
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(sd, abs=0.03)
    assert seen == respaced_indices(1000, 100).flip(0).double().tolist()    # original indices, noisy first


def test_sampler_guidance_hook():
    s = DDPM(G1)
    noise = torch.randn(8, 2, 2, 2, generator=_gen(6))
    y = torch.zeros(8, dtype=torch.long)
    calls: list = []

    def guidance(model_fn, x, t_model, t_groups, y, groups):
        calls.append(t_groups.shape)
        assert groups == G1
        torch.testing.assert_close(s.t_to_index(t_groups[:, 0]).float(), t_model[:, 0])
        return model_fn(x, t_model, y)

    run = DDPMSampler(steps=10)
    a = run(_oracle(s, 0.0, 1.0, []), noise, y, schedule=s, generator=_gen(7))
    b = run(_oracle(s, 0.0, 1.0, []), noise, y, schedule=s, guidance=guidance, generator=_gen(7))
    assert torch.equal(a, b) and calls == [(8, 1)] * 10


def test_trajectory_states_and_final_sample_equal_the_chain():
    s, run = DDPM(G1), DDPMSampler(steps=10)
    noise = torch.randn(8, 2, 2, 2, generator=_gen(8))
    y = torch.zeros(8, dtype=torch.long)
    x = run(_oracle(s, 0.5, 0.3, []), noise, y, schedule=s, generator=_gen(9))
    traj = run.trajectory(_oracle(s, 0.5, 0.3, []), noise, y, schedule=s, taus=[0.0, 0.5, 1.0], generator=_gen(9))
    assert [t for t, _ in traj] == [0.0, 0.5, 1.0]
    assert torch.equal(traj[0][1], noise) and torch.equal(traj[-1][1], x)     # same chain, same noise draws
    assert not torch.equal(traj[1][1], noise) and not torch.equal(traj[1][1], x)


def test_method_sample_counts_model_calls_for_every_sampler():
    """The evaluation protocol's NFE is measured by Method.sample around the model, not read from the sampler:
    the DDPM sampler keeps no count of its own (DiT's runs recorded NFE 0), and a flow sampler's own count agrees."""
    from methods.compose import Method
    from methods.samplers import ODESampler
    from methods.schedules import Flow

    s = DDPM(G1)
    oracle = _oracle(s, 0.0, 1.0, [])

    class Net:
        def __call__(self, x, t, y, hidden_at=()):
            return BackboneOut(out=oracle(x, t, y))

    noise, y = torch.randn(4, 2, 2, 2, generator=_gen(8)), torch.zeros(4, dtype=torch.long)
    m = Method(name="dit", schedule=s, loss=None, sampler=DDPMSampler(steps=10))
    m.sample(Net(), noise, y, generator=_gen(9))
    assert m.last_nfe == 10

    class Flat:
        def __call__(self, x, t, y, hidden_at=()):
            return BackboneOut(out=torch.zeros_like(x))

    heun = ODESampler(solver="heun", steps=8)
    f = Method(name="sit", schedule=Flow(G1), loss=None, sampler=heun)
    f.sample(Flat(), noise, y)
    assert f.last_nfe == heun.last_nfe == 14
