"""REG (docs/methods.md §14): the class token as one more channel group. Each formula of the method, the
backbone's extra-token hook, the encoders' class token, "knob off equals REPA" bit for bit, and a tiny
train step + sample through the preset."""
import copy

import pytest
import torch
import torch.nn.functional as F

import methods  # noqa: F401  (registers every component)
from backbones.layers import RoPE2D, pack_token, sincos_pos_embed_2d, token_channels, unpack_token
from benchmarks import api
from core.config import ConfigError
from core.registry import BACKBONES, LATENTS
from core.types import BackboneOut, Batch, Groups
from methods.base import LossCtx, training_losses
from methods.compose import build_method, build_schedule
from methods.losses import FlowLoss
from methods.reg import RegLoss

E, SIZE, D = 20, 8, 128          # class-token width, latent side, tiny backbone width
REPA = {"depth": 1, "weight": 0.5, "mode": "neg-cos", "projector_dim": 32}


def backbone(extra: int = E, name: str = "lightningdit-tiny", seed: int = 0, tex: int = 4):
    torch.manual_seed(seed)
    c = tex + (token_channels(extra, SIZE) if extra else 0)
    kw = {"extra_token_dim": extra} if extra else {}
    return BACKBONES.build({"name": name, **kw}, in_channels=c, out_channels=c, input_size=SIZE, num_classes=10)


# ------------------------------------------------------------- packing ----------------------------------------

def test_pack_unpack_round_trip_with_zero_padding():
    v = torch.randn(3, 100)
    x = pack_token(v, SIZE)                                     # 100 elements on 8×8: 2 channels, 28 padding
    assert x.shape == (3, 2, SIZE, SIZE) and token_channels(100, SIZE) == 2
    assert torch.equal(unpack_token(x, 100), v)
    assert torch.equal(x.flatten(1)[:, 100:], torch.zeros(3, 28))
    assert torch.equal(x.flatten(1)[:, :100], v)                # row-major, channel by channel
    assert token_channels(64, SIZE) == 1 and token_channels(65, SIZE) == 2 and token_channels(768, 16) == 3
    with pytest.raises(ValueError, match="hold fewer than 200 elements"):
        unpack_token(x, 200)


# ------------------------------------------------------------- latent builder ---------------------------------

class _Tok:
    latent_channels = 4

    def encode(self, images, generator=None):
        return images[:, :1].repeat(1, 4, 1, 1)[..., ::4, ::4]          # (N, 4, 8, 8)

    def decode(self, z):
        return z[:, :1].repeat_interleave(4, -1).repeat_interleave(4, -2)


class _Enc:
    dim, grid = E, (SIZE, SIZE)

    def __init__(self, cls_token=True):
        self.cls_token = cls_token

    def tokens(self, images):
        g = torch.Generator().manual_seed(int(images.shape[0]))
        return torch.randn(images.shape[0], 1 + SIZE * SIZE, E, generator=g)   # class token first


def test_vae_cls_latent_packs_the_class_token_unnormalised():
    lat = LATENTS.build({"name": "vae-cls"}, artifacts={"texture-vae": _Tok(), "semantic-encoder": _Enc()})
    assert lat.groups == Groups(("texture", "cls"), (4, 1)) and lat.aux_keys == ("tokens",)
    images = torch.rand(5, 1, 32, 32) * 2 - 1
    out = lat.encode(images)
    tokens = _Enc().tokens(images)
    assert torch.equal(out["tokens"], tokens)                               # aux target: [cls, patches]
    assert torch.equal(out["x1"][:, 4:], pack_token(tokens[:, 0], SIZE))    # E=20 of 64 elements, rest 0
    mean, std = lat.stats_from(out["x1"])
    assert torch.equal(mean[:, 4:], torch.zeros(1, 1, 1, 1)) and torch.equal(std[:, 4:], torch.ones(1, 1, 1, 1))
    lat.set_stats(mean, std)
    assert torch.equal(lat.normalize(out["x1"])[:, 4:], out["x1"][:, 4:])   # no extra normalisation
    assert lat.decode(lat.normalize(out["x1"])).shape == (5, 1, 32, 32)     # texture only


def test_vae_cls_latent_errors_name_the_fix():
    arts = {"texture-vae": _Tok(), "semantic-encoder": _Enc(cls_token=False)}
    with pytest.raises(ConfigError, match=r"^latent vae-cls needs the semantic encoder's class token: set "
                                          r"prepare.semantic-encoder.cls_token=true"):
        LATENTS.build({"name": "vae-cls"}, artifacts=arts)
    lat = LATENTS.build({"name": "vae-cls", "latent_size": 16}, artifacts={**arts, "semantic-encoder": _Enc()})
    with pytest.raises(ConfigError, match=r"built for a 16×16 latent .* set method.latent.latent_size=8$"):
        lat.encode(torch.zeros(2, 1, 32, 32))


# ------------------------------------------------------------- path -------------------------------------------

def test_cls_group_path_same_t_own_noise():
    """REG: c_s = (1 − s)c + s·ε_c, target ε_c − c (s = 0 data); here t = 1 − s, so x_t = t·c + (1 − t)·ε_c and
    the velocity is c − ε_c = −(ε_c − c); the class token shares the latent's t and has its own noise."""
    groups = Groups(("texture", "cls"), (4, 1))
    sched = build_schedule({"schedule": {"name": "flow", "time_dist": "uniform"}}, groups)
    g = torch.Generator().manual_seed(0)
    x1, x0 = torch.randn(6, 5, SIZE, SIZE, generator=g), torch.randn(6, 5, SIZE, SIZE, generator=g)
    t = torch.rand(6, generator=g)
    tg = sched.group_times(t * sched.tau_max)
    assert torch.equal(tg[:, 0], tg[:, 1])                                  # same t for both groups
    xt, target = sched.path(x0, x1, tg)
    s = (1 - t).view(6, 1, 1, 1)
    torch.testing.assert_close(xt[:, 4:], (1 - s) * x1[:, 4:] + s * x0[:, 4:])
    torch.testing.assert_close(target[:, 4:], -(x0[:, 4:] - x1[:, 4:]))


# ------------------------------------------------------------- loss -------------------------------------------

def _loss_inputs(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(3, 2 + k, 4, 4, generator=g), torch.randn(3, 2 + k, 4, 4, generator=g)
    hidden = torch.randn(3, 1 + 4, 16, generator=g)                       # class token + a 2×2 token grid
    tokens = torch.randn(3, 1 + 16, E, generator=g)                       # class token + the 4×4 encoder grid
    return pred, target, hidden, tokens


def _ctx(tokens, target):
    return LossCtx(x0=target, x1=target, xt=target, t_groups=torch.zeros(3, 2),
                   batch=Batch(target, torch.zeros(3, dtype=torch.long), {"tokens": tokens}), schedule=None)


def test_reg_loss_is_the_hand_computed_total():
    k = token_channels(E, 4)                                                # 20 of 32 elements: 2 channels
    groups = Groups(("texture", "cls"), (2, k))
    torch.manual_seed(0)
    loss = RegLoss(groups, REPA, cls_weight=0.03, hidden_size=16, encoder_dim=E)
    pred, target, hidden, tokens = _loss_inputs(k)
    out = loss(BackboneOut(pred, {1: hidden}), target, _ctx(tokens, target))

    mse = ((pred[:, :2] - target[:, :2]) ** 2).mean()
    cls = ((pred[:, 2:].flatten(1)[:, :E] - target[:, 2:].flatten(1)[:, :E]) ** 2).mean()   # mean over E, batch
    patches = tokens[:, 1:].reshape(3, 2, 2, 2, 2, E).mean(dim=(2, 4)).reshape(3, 4, E)    # 4×4 -> 2×2 mean
    y = torch.cat([tokens[:, :1], patches], dim=1)                          # (3, 1 + 4, E): class token first
    z = loss.projector(hidden)
    proj = -F.cosine_similarity(z, y, dim=-1).mean()                        # mean over 1 + T tokens and batch
    torch.testing.assert_close(out.terms["mse"], mse)
    torch.testing.assert_close(out.terms["cls"], 0.03 * cls)
    torch.testing.assert_close(out.terms["repa"], 0.5 * proj)
    torch.testing.assert_close(out.total, mse + 0.03 * cls + 0.5 * proj)

    # the padding elements never count
    noisy = pred.clone()
    noisy[:, 2:].view(3, -1)[:, E:] += 100.0
    assert torch.equal(loss(BackboneOut(noisy, {1: hidden}), target, _ctx(tokens, target)).total, out.total)


def test_reg_alignment_uses_every_token_including_the_class_token():
    k = token_channels(E, 4)
    torch.manual_seed(0)
    loss = RegLoss(Groups(("texture", "cls"), (2, k)), {**REPA, "weight": 1.0}, cls_weight=0.0,
                   hidden_size=16, encoder_dim=E)
    pred, target, hidden, tokens = _loss_inputs(k, seed=1)
    base = loss(BackboneOut(pred, {1: hidden}), target, _ctx(tokens, target)).terms["repa"]
    moved = tokens.clone()
    moved[:, 0] = loss.projector(hidden)[:, 0].detach()                     # class-token cosine -> 1
    after = loss(BackboneOut(pred, {1: hidden}), target, _ctx(moved, target)).terms["repa"]
    cos0 = F.cosine_similarity(loss.projector(hidden)[:, 0], tokens[:, 0], dim=-1).mean()
    torch.testing.assert_close(base - after, (1 - cos0) / 5)                # one token of 1 + 4
    with pytest.raises(ValueError, match="extra_token_dim"):
        loss(BackboneOut(pred, {1: hidden[:, 1:]}), target, _ctx(tokens, target))


# ------------------------------------------------------------- backbone hook ----------------------------------

@pytest.mark.parametrize("name", ["dit-tiny", "lightningdit-tiny"])
def test_backbone_extra_token_init_positions_and_padding(name):
    model = backbone(name=name).eval()
    k = model.extra_channels
    assert k == 1 and model.x_embedder.in_channels == 4
    lin, norm = model.extra_embedder
    assert (lin.in_features, lin.out_features) == (E, D)
    assert norm.elementwise_affine and norm.eps == 1e-6 and norm.normalized_shape == (D,)
    head = model.final_layer.linear_cls
    assert (head.in_features, head.out_features) == (D, E)
    assert torch.equal(head.weight, torch.zeros(E, D)) and torch.equal(head.bias, torch.zeros(E))
    assert torch.equal(model.pos_embed[:, 0], torch.zeros(1, D))            # zero row for the class token
    assert torch.equal(model.pos_embed[:, 1:], sincos_pos_embed_2d(D, model.grid))
    rope = model.blocks[0].attn.rope
    if rope is not None:                                                    # identity rotation for token 0
        plain = RoPE2D(D // model.num_heads, model.grid)
        assert torch.equal(rope.cos[0], torch.ones_like(rope.cos[0])) and torch.equal(rope.sin[0], torch.zeros_like(rope.sin[0]))
        assert torch.equal(rope.cos[1:], plain.cos) and torch.equal(rope.sin[1:], plain.sin)

    x, t, y = torch.randn(2, 5, SIZE, SIZE), torch.rand(2, 1), torch.tensor([1, 2])
    out = model(x, t, y, hidden_at=(2,))
    assert out.hidden[2].shape == (2, 1 + model.grid ** 2, D)               # every block sees T + 1 tokens
    assert torch.equal(out.out[:, 4:], torch.zeros(2, 1, SIZE, SIZE))       # zero-init head
    torch.nn.init.normal_(head.weight)
    torch.nn.init.normal_(head.bias)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight)
    out = model(x, t, y).out
    assert out[:, 4:].flatten(1)[:, :E].abs().min() > 0
    assert torch.equal(out[:, 4:].flatten(1)[:, E:], torch.zeros(2, SIZE * SIZE - E))   # padding written as 0
    x2 = x.clone()
    x2[:, 4:].view(2, -1)[:, E:] = 7.0                                      # padding is never read
    assert torch.equal(model(x2, t, y).out, out)
    x2[:, 4, 0, 0] += 1.0                                                   # a real class-token element is
    assert not torch.equal(model(x2, t, y).out[:, 4:], out[:, 4:])


def test_backbone_extra_token_refuses_a_latent_too_small():
    with pytest.raises(ValueError, match=r"extra_token_dim 200 packs into 4 channel\(s\) of 8×8"):
        BACKBONES.build({"name": "dit-tiny", "extra_token_dim": 200}, in_channels=4, out_channels=4,
                        input_size=SIZE, num_classes=10)


# ------------------------------------------------------------- knob off == REPA -------------------------------

def test_knob_off_equals_repa_bit_for_bit():
    """No class token (latent "vae", backbone extra_token_dim 0) and cls_weight 0: REG's loss, gradients and
    backbone are REPA's, bit for bit on this machine."""
    groups = Groups(("texture",), (4,))
    ref = backbone(extra=0)
    torch.manual_seed(0)
    plain = BACKBONES.build({"name": "lightningdit-tiny"}, in_channels=4, out_channels=4, input_size=SIZE,
                            num_classes=10)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), plain.state_dict().values()))
    torch.manual_seed(1)
    repa = FlowLoss(groups, repa=REPA, hidden_size=D, encoder_dim=E)
    torch.manual_seed(1)
    reg = RegLoss(groups, REPA, cls_weight=0.0, hidden_size=D, encoder_dim=E)
    assert all(torch.equal(a, b) for a, b in zip(repa.state_dict().values(), reg.state_dict().values()))
    sched = build_schedule({"schedule": {"name": "flow", "time_dist": "uniform"}}, groups)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(8, 4, SIZE, SIZE, generator=g), torch.arange(8) % 10,
                  {"tokens": torch.randn(8, SIZE * SIZE, E, generator=g)})
    results = []
    for loss in (repa, reg):
        model = copy.deepcopy(ref).train()
        torch.manual_seed(5)                                                # label dropout
        out = training_losses(model, batch, sched, loss, generator=torch.Generator().manual_seed(3))
        out.total.backward()
        results.append((out, [p.grad for p in [*model.parameters(), *loss.parameters()]]))
    (a, ga), (b, gb) = results
    assert torch.equal(a.total, b.total) and torch.equal(a.terms["mse"], b.terms["mse"])
    assert torch.equal(a.terms["repa"], b.terms["repa"])
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# ------------------------------------------------------------- end to end -------------------------------------

def test_tiny_train_step_and_sample_through_the_preset():
    groups = Groups(("texture", "cls"), (4, token_channels(E, SIZE)))
    mcfg = api.preset("reg", "smoke")
    assert mcfg["loss"]["cls_weight"] == 0.03 and mcfg["loss"]["repa"]["weight"] == 0.5
    model = backbone(extra=E)
    method = build_method(mcfg, groups=groups, hidden_size=D, encoder_dim=E, null_label=10,
                          sampler_overrides={"name": "ode", "solver": "euler", "steps": 4})
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(8, 1 + SIZE * SIZE, E, generator=g)
    x1 = torch.cat([torch.randn(8, 4, SIZE, SIZE, generator=g), pack_token(tokens[:, 0], SIZE)], dim=1)
    batch = Batch(x1, torch.arange(8), {"tokens": tokens})
    params = [*model.parameters(), *method.loss.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    for step in range(2):
        out = method.losses(model.train(), batch, generator=torch.Generator().manual_seed(step))
        assert set(out.terms) == {"mse", "cls", "repa"} and torch.isfinite(out.total)
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert model.final_layer.linear_cls.weight.abs().sum() > 0             # the class-token head trains
    noise = torch.randn(4, *x1.shape[1:], generator=g)
    sample = method.sample(model.eval(), noise, torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert sample.shape == noise.shape and torch.isfinite(sample).all()
    # padding elements are never driven: the model's velocity there is exactly 0, so they keep their start
    pad = (slice(None), slice(4, None))
    assert torch.equal(sample[pad].flatten(1)[:, E:], noise[pad].flatten(1)[:, E:])
    assert not torch.equal(sample[pad].flatten(1)[:, :E], noise[pad].flatten(1)[:, :E])


# ------------------------------------------------------------- encoders' class token --------------------------

def test_stand_in_class_token_is_its_trained_global_embedding(tmp_path):
    from encoders.semantic import SemanticEncoder, TokenNet

    config = dict(in_channels=1, image_size=16, patch=4, dim=16, depth=1, mlp_ratio=2.0)
    torch.manual_seed(0)
    net = TokenNet(**config)
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    plain = SemanticEncoder(net, dict(config), {})
    cls, patches = plain.encode_with_cls(images)
    assert torch.equal(patches, plain.tokens(images))                     # default output unchanged
    assert torch.equal(cls, patches.mean(1))                               # what SimCLR's loss trains
    plain.save(tmp_path / "old")                                           # config without the knob: loads as before
    assert SemanticEncoder.load(tmp_path / "old").cls_token is False
    with_cls = SemanticEncoder(net, {**config, "cls_token": True}, {})
    assert torch.equal(with_cls.tokens(images), torch.cat([cls[:, None], patches], dim=1))
    with_cls.save(tmp_path / "new")
    back = SemanticEncoder.load(tmp_path / "new")
    assert back.cls_token and torch.equal(back.tokens(images), with_cls.tokens(images))


def test_dinov2_class_token_is_x_norm_clstoken():
    import timm

    from encoders.dinov2 import DinoV2Encoder

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, img_size=28, depth=1).eval()
    enc = DinoV2Encoder(model, "x", None, 28, cls_token=True)
    images = torch.rand(2, 3, 28, 28) * 2 - 1
    cls, patches = enc.encode_with_cls(images)
    feats = enc.features(images)                                            # (N, 1 + 4 registers + 4, D)
    assert feats.shape == (2, 1 + 4 + 4, 384)
    assert torch.equal(cls, feats[:, 0]) and torch.equal(patches, feats[:, 5:])
    assert torch.equal(enc.tokens(images), torch.cat([feats[:, :1], feats[:, 5:]], dim=1))
    assert torch.equal(DinoV2Encoder(model, "x", None, 28).tokens(images), feats[:, 5:])


# ------------------------------------------------------------- fused kernels ----------------------------------

def _triton_case() -> None:
    """kernels=triton (q/k norm + RoPE with the identity row, SwiGLU, adaLN) on T + 1 tokens equals the torch path."""
    def build(kernels):
        torch.manual_seed(0)
        return BACKBONES.build({"name": "lightningdit-tiny", "extra_token_dim": E, "kernels": kernels,
                                "qk_norm": True}, in_channels=5, out_channels=5, input_size=SIZE, num_classes=10)

    ref, fused = build("torch"), build("triton")
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fused.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(2, 5, SIZE, SIZE), torch.rand(2, 1), torch.tensor([1, 2])
    outs = []
    for model in (ref, fused):
        out = model.eval()(x, t, y, hidden_at=(2,))
        out.out.square().sum().backward()
        outs.append((out, [p.grad for p in model.parameters()]))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(b.out, a.out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.hidden[2], a.hidden[2], rtol=1e-4, atol=1e-5)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_extra_token_with_the_triton_kernels():
    pytest.importorskip("triton")
    from triton_util import run_interpreted

    run_interpreted(__file__)


if __name__ == "__main__":    # under TRITON_INTERPRET=1 (tests/triton_util.py): the kernels on CPU tensors
    _triton_case()
    print("cases passed")
