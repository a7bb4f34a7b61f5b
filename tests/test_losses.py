"""Flow-loss knobs (docs/methods.md §11.7-11.9, knob-off equalities) and training_losses end to end."""
import pytest
import torch
from torch import nn

from core.registry import LOSSES, SCHEDULES
from core.types import BackboneOut, Batch, Groups
from methods import base
from methods.ddpm import DDPM, DDPMLoss
from methods.losses import FlowLoss, cosine_loss, mean_flat, repa_alignment
from methods.schedules import AsyncFlow, Flow

SFD_GROUPS = Groups(("texture", "semantic"), (32, 16))
SMALL = Groups(("texture", "semantic"), (3, 2))
HIDDEN, ENC = 16, 6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ctx(x1: torch.Tensor, aux=None, state=None, schedule=None) -> base.LossCtx:
    n = x1.shape[0]
    return base.LossCtx(x0=torch.zeros_like(x1), x1=x1, xt=x1, t_groups=torch.zeros(n, 2),
                        batch=Batch(x1, torch.zeros(n, dtype=torch.long), aux or {}),
                        schedule=schedule, state=state or {})


class TinyModel(nn.Module):
    """Stand-in backbone: 1×1 conv plus a time bias; hidden tokens = a linear map of the pixels."""

    def __init__(self, c_in: int, c_out: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)
        self.time = nn.Linear(k, c_out)
        self.tok = nn.Linear(c_in, HIDDEN)

    def forward(self, x, t, y, *, hidden_at=()):
        out = self.conv(x) + self.time(t)[:, :, None, None]
        h = self.tok(x.flatten(2).transpose(1, 2))                      # (N, H·W, D)
        return BackboneOut(out=out, hidden={d: h for d in hidden_at})


# -- knob off ------------------------------------------------------------------------------------

def test_knobs_off_is_plain_mse():
    g = _gen()
    pred, target = torch.randn(4, 5, 3, 3, generator=g), torch.randn(4, 5, 3, 3, generator=g)
    out, ctx = BackboneOut(pred), _ctx(target)
    plain = mean_flat((pred - target) ** 2).mean()
    a = FlowLoss(SMALL)(out, target, ctx)
    b = FlowLoss(SMALL, group_weights={"texture": 1.0, "semantic": 1.0}, cosine_weight=0.0)(out, target, ctx)
    assert torch.equal(a.total, plain) and torch.equal(b.total, plain)
    torch.testing.assert_close(a.total, ((pred - target) ** 2).mean())
    assert set(a.terms) == {"mse"}
    # SiT's vestigial learn_sigma half is ignored
    wide = BackboneOut(torch.cat([pred, torch.randn(4, 5, 3, 3, generator=g)], 1))
    assert torch.equal(FlowLoss(SMALL)(wide, target, ctx).total, plain)


# -- §11.7 SFD semantic weighting ------------------------------------------------------------------

def test_sfd_semantic_weight_four_thirds():
    target = torch.randn(2, 48, 4, 4, generator=_gen(1))
    loss = FlowLoss(SFD_GROUPS, group_weights={"semantic": 2.0})
    res = loss(BackboneOut(target + 1), target, _ctx(target))
    assert res.total.item() == pytest.approx(4 / 3, rel=1e-6)
    with pytest.raises(KeyError, match="texture, semantic"):
        FlowLoss(SFD_GROUPS, group_weights={"sem": 2.0})


# -- §11.8 cosine -----------------------------------------------------------------------------------

def test_cosine_loss_values():
    u = torch.randn(3, 48, 4, 4, generator=_gen(2))
    assert cosine_loss(2.5 * u, u).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(-u, u).item() == pytest.approx(2.0, abs=1e-6)
    res = FlowLoss(SFD_GROUPS, cosine_weight=1.0)(BackboneOut(-u), u, _ctx(u))
    assert res.terms["cos"].item() == pytest.approx(2.0, abs=1e-6)
    torch.testing.assert_close(res.total, res.terms["mse"] + res.terms["cos"])


# -- §11.9 REPA alignment --------------------------------------------------------------------------

def _repa_loss(weight: float, mode: str = "neg-cos", **kw) -> FlowLoss:
    return FlowLoss(SMALL, repa={"depth": 1, "weight": weight, "mode": mode, "projector_dim": 8},
                    hidden_size=HIDDEN, encoder_dim=ENC, **kw)


def test_repa_alignment_perfect():
    z = torch.randn(2, 9, ENC, generator=_gen(3))
    assert repa_alignment(z, 3 * z, "neg-cos").item() == pytest.approx(-1.0, abs=1e-6)
    assert repa_alignment(z, 3 * z, "cos").item() == pytest.approx(0.0, abs=1e-6)
    # through the loss: make the target equal the projector's own output
    for mode, expected in (("neg-cos", -0.5), ("cos", 0.0)):
        loss = _repa_loss(0.5, mode)
        h = torch.randn(2, 9, HIDDEN, generator=_gen(4))
        x1 = torch.randn(2, 5, 3, 3, generator=_gen(5))
        with torch.no_grad():
            tokens = loss.projector(h)
        res = loss(BackboneOut(x1, {1: h}), x1, _ctx(x1, aux={"tokens": tokens}))
        assert res.terms["repa"].item() == pytest.approx(expected, abs=1e-6)
        assert loss.hidden_at == (1,)


def test_repa_weight_zero_equals_flow_loss():
    g = _gen(6)
    pred, target = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    h, tokens = torch.randn(2, 9, HIDDEN, generator=g), torch.randn(2, 9, ENC, generator=g)
    ctx = _ctx(target, aux={"tokens": tokens})
    for cos_w in (0.0, 1.0):
        ref = FlowLoss(SMALL, cosine_weight=cos_w)(BackboneOut(pred), target, ctx)
        res = _repa_loss(0.0, cosine_weight=cos_w)(BackboneOut(pred, {1: h}), target, ctx)
        assert torch.equal(ref.total, res.total)
    # REPA is kept even with the cosine term off (docs/methods.md §6.5: SFD's silent drop is not reproduced)
    res = _repa_loss(1.0, cosine_weight=0.0)(BackboneOut(pred, {1: h}), target, ctx)
    torch.testing.assert_close(res.total, res.terms["mse"] + res.terms["repa"])


def test_repa_errors():
    x1 = torch.randn(2, 5, 3, 3)
    loss = _repa_loss(1.0)
    with pytest.raises(ValueError, match="tokens"):
        loss(BackboneOut(x1, {1: torch.randn(2, 9, HIDDEN)}), x1, _ctx(x1, aux={"tokens": torch.randn(2, 4, ENC)}))
    with pytest.raises(TypeError):
        FlowLoss(SMALL, repa={"depth": 1, "wieght": 1.0}, hidden_size=HIDDEN, encoder_dim=ENC)
    with pytest.raises(ValueError, match="hidden_size"):
        FlowLoss(SMALL, repa={"depth": 1})
    with pytest.raises(TypeError):
        LOSSES.build({"name": "flow", "cosine_weigth": 1.0}, groups=SMALL)


# -- ReDi per-group mean and DINO-drop -------------------------------------------------------------

def test_per_group_mean():
    g = _gen(7)
    pred, target = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    res = FlowLoss(SMALL, per_group_mean=True, group_weights={"semantic": 0.5})(BackboneOut(pred), target, _ctx(target))
    e = (pred - target) ** 2
    torch.testing.assert_close(res.total, (mean_flat(e[:, :3]) + 0.5 * mean_flat(e[:, 3:])).mean())


def _batch(seed: int) -> Batch:
    return Batch(torch.randn(4, 5, 3, 3, generator=_gen(seed)), torch.zeros(4, dtype=torch.long))


def test_drop_prob_zero_equals_per_group_loss():
    model = TinyModel(5, 5, 1)
    ref = base.training_losses(model, _batch(8), Flow(SMALL), FlowLoss(SMALL, per_group_mean=True), _gen(9))
    off = FlowLoss(SMALL, per_group_mean=True, drop={"group": "semantic", "prob": 0.0})
    res = base.training_losses(model, _batch(8), Flow(SMALL), off, _gen(9))
    assert torch.equal(ref.total, res.total)


def test_drop_prob_one_zeroes_semantic():
    loss = FlowLoss(SMALL, per_group_mean=True, drop={"group": "semantic", "prob": 1.0})
    batch = _batch(10)
    new, state = loss.pre_path(batch, _gen(11))
    assert (new.x1[:, 3:] == 0).all() and torch.equal(new.x1[:, :3], batch.x1[:, :3])
    assert not (batch.x1[:, 3:] == 0).all()                              # input batch untouched
    g = _gen(12)
    pred, target = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    res = loss(BackboneOut(pred), target, _ctx(target, state=state))
    torch.testing.assert_close(res.total, mean_flat((pred - target)[:, :3] ** 2).mean())
    # also with the all-element mean: the semantic elements contribute 0 (denominator unchanged)
    flat = FlowLoss(SMALL, drop={"group": "semantic", "prob": 1.0})
    res = flat(BackboneOut(pred), target, _ctx(target, state=state))
    torch.testing.assert_close(res.total, ((pred - target)[:, :3] ** 2).sum() / pred.numel())


# -- training_losses end to end ----------------------------------------------------------------------

SETUPS = {
    "flow": lambda: (Flow(SMALL), FlowLoss(SMALL)),
    "sfd": lambda: (AsyncFlow(SMALL, delta_t={"texture": 0.3}, time_dist="logit-normal"),
                    FlowLoss(SMALL, group_weights={"semantic": 2.0}, cosine_weight=1.0,
                             repa={"depth": 2, "weight": 1.0, "mode": "cos", "projector_dim": 8},
                             hidden_size=HIDDEN, encoder_dim=ENC)),
    "redi": lambda: (Flow(SMALL), FlowLoss(SMALL, per_group_mean=True, drop={"group": "semantic", "prob": 0.5},
                                           repa={"depth": 1, "projector_dim": 8},
                                           hidden_size=HIDDEN, encoder_dim=ENC)),
    "ddpm": lambda: (DDPM(SMALL), DDPMLoss(SMALL)),
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_training_losses_runs_and_backprops(setup):
    sched, loss = SETUPS[setup]()
    model = TinyModel(5, sched.out_channels(5), sched.num_time_inputs)
    batch = Batch(torch.randn(4, 5, 3, 3, generator=_gen(13)), torch.zeros(4, dtype=torch.long),
                  {"tokens": torch.randn(4, 9, ENC, generator=_gen(14))})
    res = base.training_losses(model, batch, sched, loss, generator=_gen(15))
    assert res.total.dim() == 0 and torch.isfinite(res.total)
    torch.testing.assert_close(res.total.detach(), sum(res.terms.values()))
    res.total.backward()
    params = list(model.named_parameters()) + list(loss.named_parameters())
    for name, p in params:
        if name.startswith("tok") and not loss.hidden_at:
            continue                                   # hidden tokens unused without REPA
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if loss.hidden_at:
        assert any(p.grad.abs().sum() > 0 for p in loss.projector.parameters())
    again = base.training_losses(model, batch, sched, loss, generator=_gen(15))   # same seed, same loss
    assert torch.equal(again.total, res.total)


def test_registered():
    assert {"flow", "ddpm"} <= set(LOSSES.names()) and "ddpm" in SCHEDULES
