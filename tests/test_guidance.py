"""Guidance kinds (docs/methods.md §1, §3, §4, §5.4, §6.6, §11.11): formulas, channel subsets,
per-group intervals, one batched forward, and "scale 1 equals the unguided model" exactly."""
from __future__ import annotations

import pytest
import torch

from core.registry import SCHEDULES
from core.types import Groups
from methods.guidance import GUIDANCE, AutoGuidance, build_guidance
from methods.samplers import ODESampler
from repa_ref import repa_to_project

GROUPS = Groups(("texture", "semantic"), (3, 2))
NULL = 10
TEX, SEM = GROUPS.slice_of("texture"), GROUPS.slice_of("semantic")


class LabelModel:
    """A model whose output depends on x, t and y in every channel; records each call's batch."""

    def __init__(self, offset: float = 0.0, out_factor: int = 1) -> None:
        self.batches, self.offset, self.out_factor = [], offset, out_factor

    def __call__(self, x, t_model, y):
        self.batches.append((x.clone(), t_model.clone(), y.clone()))
        lab = torch.cos(y.to(x.dtype))[:, None, None, None]                  # (N, 1, 1, 1)
        out = torch.sin(3 * x) * (1 + lab) + t_model.mean(1)[:, None, None, None] + lab + self.offset
        return torch.cat([out * (k + 1) for k in range(self.out_factor)], dim=1)


def inputs(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, NULL, (n,), generator=g)
    return x, y


def times(n: int, t_tex: float, t_sem: float):
    t_groups = torch.tensor([[t_tex, t_sem]] * n, dtype=torch.float64)       # (N, G)
    return t_groups, t_groups                                                # async: t_model = t_groups


def cfg(**kw):
    return build_guidance({"name": "cfg", **kw}, null_label=NULL)


def same(a, b) -> bool:
    """Equal up to float64 rounding, for outputs whose conditional branch ran inside the batched forward on
    [x; x] while the reference ran on x alone: an elementwise kernel may round a tensor's tail differently
    from its vectorised body, and where that split falls depends on the length and the CPU's vector width
    (AVX2 vs AVX-512), so the two are not bit-equal on every machine. The model's few float64 operations
    on O(1) values stay within ~1e-15 of each other; a guided channel moves by O(1)."""
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Factory
# ----------------------------------------------------------------------------------------------

def test_factory_names_and_errors():
    assert {"cfg", "autoguidance", "representation", "none"} <= set(GUIDANCE.names())
    assert build_guidance(None, null_label=NULL) is None
    assert build_guidance({"name": "none"}, null_label=NULL) is None
    assert cfg(scale=1.5).null_label == NULL
    with pytest.raises(KeyError, match="autoguidance, cfg, none, representation"):
        build_guidance({"name": "cfgg", "scale": 2.0}, null_label=NULL)
    with pytest.raises(ValueError, match="needs a 'name'"):
        build_guidance({"scale": 2.0}, null_label=NULL)
    with pytest.raises(TypeError, match="sclae"):
        build_guidance({"name": "representation", "sclae": 2.0}, null_label=NULL)
    with pytest.raises(ValueError, match="start:stop"):
        cfg(scale=2.0, channels="first3")


# ----------------------------------------------------------------------------------------------
# CFG
# ----------------------------------------------------------------------------------------------

def test_cfg_scale_one_equals_conditional_exactly():
    x, y = inputs()
    t_groups, t_model = times(4, 0.4, 0.7)
    model = LabelModel()
    out = cfg(scale=1.0, channels="0:3")(model, x, t_model, t_groups, y, GROUPS)
    assert torch.equal(out, LabelModel()(x, t_model, y)) and len(model.batches) == 1


def test_cfg_formula_one_batched_forward():
    x, y = inputs()
    t_groups, t_model = times(4, 0.4, 0.7)
    model = LabelModel()
    out = cfg(scale=2.5)(model, x, t_model, t_groups, y, GROUPS)
    assert len(model.batches) == 1
    bx, bt, by = model.batches[0]
    assert bx.shape[0] == 8 and torch.equal(by, torch.cat([y, torch.full_like(y, NULL)]))
    cond = LabelModel()(x, t_model, y)
    uncond = LabelModel()(x, t_model, torch.full_like(y, NULL))
    torch.testing.assert_close(out, uncond + 2.5 * (cond - uncond))


@pytest.mark.parametrize("channels,guided", [("0:3", [0, 1, 2]), ([0, 4], [0, 4]), ("all", [0, 1, 2, 3, 4])])
def test_cfg_channel_subset_leaves_others_conditional(channels, guided):
    x, y = inputs()
    t_groups, t_model = times(4, 0.5, 0.5)
    out = cfg(scale=3.0, channels=channels)(LabelModel(), x, t_model, t_groups, y, GROUPS)
    cond = LabelModel()(x, t_model, y)
    for c in range(5):
        assert same(out[:, c], cond[:, c]) != (c in guided)


def test_cfg_learned_sigma_channels_follow_conditional():
    x, y = inputs()
    t_groups, t_model = times(4, 0.5, 0.5)
    cond = LabelModel(out_factor=2)(x, t_model, y)                          # (N, 2C, H, W)
    out = cfg(scale=3.0)(LabelModel(out_factor=2), x, t_model, t_groups, y, GROUPS)
    assert same(out[:, 5:], cond[:, 5:]) and not same(out[:, :5], cond[:, :5])
    legacy = cfg(scale=3.0, channels="0:3")(LabelModel(out_factor=2), x, t_model, t_groups, y, GROUPS)
    assert same(legacy[:, 3:], cond[:, 3:])                                  # DiT's first-3-of-8 rule
    with pytest.raises(ValueError, match="outputs 10 channels"):
        cfg(scale=3.0, channels="0:11")(LabelModel(out_factor=2), x, t_model, t_groups, y, GROUPS)


def test_cfg_interval_per_group_and_per_sample():
    x, y = inputs()
    g = cfg(scale=2.0, interval=[0.3, 1.0])
    # texture at t = 0.1 (outside), semantics at 0.5 (inside): only the semantic slice is guided.
    t_groups, t_model = times(4, 0.1, 0.5)
    out = g(LabelModel(), x, t_model, t_groups, y, GROUPS)
    cond = LabelModel()(x, t_model, y)
    assert same(out[:, TEX], cond[:, TEX]) and not same(out[:, SEM], cond[:, SEM])
    # per sample: sample 0 inside, the others outside
    t_groups = torch.tensor([[0.9, 0.9]] + [[0.2, 0.2]] * 3, dtype=torch.float64)
    out = g(LabelModel(), x, t_groups, t_groups, y, GROUPS)
    cond = LabelModel()(x, t_groups, y)
    assert not same(out[0], cond[0]) and same(out[1:], cond[1:])
    # nobody inside: the unconditional branch is skipped altogether
    model = LabelModel()
    t_groups, t_model = times(4, 0.1, 0.2)
    assert torch.equal(g(model, x, t_model, t_groups, y, GROUPS), cond_of(x, t_model, y))
    assert [b[0].shape[0] for b in model.batches] == [4]


def cond_of(x, t_model, y):
    return LabelModel()(x, t_model, y)


def test_repa_interval_conversion_is_inclusive():
    """REPA guides t_REPA ∈ [0, 0.7]; in project time that is t ∈ [0.3, 1] (docs/methods.md §3)."""
    low = float(repa_to_project(torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.0))[0])
    g = cfg(scale=2.0, interval=[low, 1.0])
    x, y = inputs()
    for t, guided in ((low, True), (0.29, False), (1.0, True)):
        t_groups, t_model = times(4, t, t)
        assert torch.equal(g(LabelModel(), x, t_model, t_groups, y, GROUPS), cond_of(x, t_model, y)) != guided


def test_cfg_without_groups_single_group_schedule():
    x, y = inputs()
    t = torch.full((4, 1), 0.5, dtype=torch.float64)
    out = cfg(scale=2.0)(LabelModel(), x, t, t, y)                          # DDPM-style call, G = 1
    assert not torch.equal(out, cond_of(x, t, y))


def test_cfg_in_sampler_one_batched_forward_per_step():
    sch = SCHEDULES.build({"name": "async-flow", "delta_t": {"texture": 0.3}}, groups=GROUPS)
    x, y = inputs()
    model = LabelModel()
    sampler = ODESampler(steps=8)
    sampler(model, x.float(), y, schedule=sch, guidance=cfg(scale=2.0))
    assert sampler.last_nfe == len(model.batches) == 9                     # 7 steps + phase changes 0.3, 1.0
    assert all(b[0].shape[0] == 8 for b in model.batches)


# ----------------------------------------------------------------------------------------------
# AutoGuidance and representation guidance
# ----------------------------------------------------------------------------------------------

def test_autoguidance_scale_one_equals_main_model():
    x, y = inputs()
    t_groups, t_model = times(4, 0.3, 0.6)
    g = build_guidance({"name": "autoguidance", "scale": 1.0}, null_label=NULL)
    assert g.guide is None                                                 # not needed at w = 1
    assert torch.equal(g(LabelModel(), x, t_model, t_groups, y, GROUPS), cond_of(x, t_model, y))


def test_autoguidance_formula_and_group_scales():
    x, y = inputs()
    t_groups, t_model = times(4, 0.3, 0.6)
    f, guide = cond_of(x, t_model, y), LabelModel(offset=0.5)
    g = AutoGuidance(scale=1.5)
    with pytest.raises(RuntimeError, match="guide"):
        g(LabelModel(), x, t_model, t_groups, y, GROUPS)
    g.guide = guide
    gout = LabelModel(offset=0.5)(x, t_model, y)
    torch.testing.assert_close(g(LabelModel(), x, t_model, t_groups, y, GROUPS), gout + 1.5 * (f - gout))
    assert torch.equal(guide.batches[0][2], y)                            # same conditional label
    per = AutoGuidance(scale=2.0, group_scales={"semantic": 1.0})
    per.guide = LabelModel(offset=0.5)
    out = per(LabelModel(), x, t_model, t_groups, y, GROUPS)
    assert torch.equal(out[:, SEM], f[:, SEM])
    torch.testing.assert_close(out[:, TEX], gout[:, TEX] + 2.0 * (f[:, TEX] - gout[:, TEX]))
    with pytest.raises(KeyError, match="texture, semantic"):
        AutoGuidance(scale=2.0, group_scales={"sem": 1.0})(LabelModel(), x, t_model, t_groups, y, GROUPS)


def test_representation_guidance():
    x, y = inputs()
    t_groups, t_model = times(4, 0.5, 0.5)
    one = build_guidance({"name": "representation", "scale": 1.0}, null_label=NULL)
    assert torch.equal(one(LabelModel(), x, t_model, t_groups, y, GROUPS), cond_of(x, t_model, y))
    model = LabelModel()
    out = build_guidance({"name": "representation", "scale": 2.0}, null_label=NULL)(
        model, x, t_model, t_groups, y, GROUPS)
    (bx, _, by), = model.batches                                           # one batched forward
    assert torch.equal(by, torch.cat([y, y])) and torch.equal(bx[:4], x)
    assert (bx[4:, SEM] == 0).all() and torch.equal(bx[4:, TEX], x[:, TEX])   # noisy input zeroed
    x_zeroed = x.clone()
    x_zeroed[:, SEM] = 0
    full, zeroed = cond_of(x, t_model, y), cond_of(x_zeroed, t_model, y)
    torch.testing.assert_close(out, zeroed + 2.0 * (full - zeroed))
    with pytest.raises(KeyError, match="unknown channel group"):
        build_guidance({"name": "representation", "scale": 2.0, "group": "dino"}, null_label=NULL)(
            LabelModel(), x, t_model, t_groups, y, GROUPS)
