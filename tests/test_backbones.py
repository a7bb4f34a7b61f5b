"""Contract and numerical tests for the backbones (docs/methods.md §0.2, §5.3, §6.4, §7, §11.10, §11.16, §11.18)."""
from __future__ import annotations

import pytest
import torch

import backbones  # noqa: F401  (registers the presets)
from backbones.dit import DiT
from backbones.layers import RoPE2D, TimestepEmbedder
from core.registry import BACKBONES
from core.types import BackboneOut

TINY = [n for n in BACKBONES.names() if n.split("-")[1] == "tiny"]
LARGE = [n for n in BACKBONES.names() if n.split("-")[1] != "tiny"]
C_IN, C_OUT, SIZE, CLASSES = 4, 6, 8, 10


def build(name: str, **kw) -> DiT:
    """Build a preset on the test's small latent; `kw` may override the defaults below."""
    args = dict(in_channels=C_IN, out_channels=C_OUT, input_size=SIZE, num_classes=CLASSES)
    return BACKBONES.build({"name": name}, **{**args, **kw})


def batch(n: int = 3, k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, C_IN, SIZE, SIZE, generator=g)
    t = torch.rand(n, k, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return x, t, y


def randomize_zero_inits(model: torch.nn.Module) -> None:
    """Zero-initialised layers block gradients to everything before them; give them random values."""
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.normal_(0, 0.02)


def test_registered_names():
    for family, sizes in [("dit", "tiny s b l xl"), ("lightningdit", "tiny s b l xl 1p0b")]:
        for size in sizes.split():
            for patch in (1, 2):
                assert f"{family}-{size}-{patch}" in BACKBONES
        assert f"{family}-tiny" in BACKBONES


# ----------------------------------------------------------------------------- contract (tiny presets)

@pytest.mark.parametrize("name", TINY)
def test_forward_shapes_and_hidden(name):
    torch.manual_seed(0)
    model = build(name)
    x, t, y = batch()
    tokens = (SIZE // model.patch_size) ** 2
    for hidden_at in [(), (1,), (2, model.depth)]:
        out = model(x, t, y, hidden_at=hidden_at)
        assert isinstance(out, BackboneOut)
        assert out.out.shape == (3, C_OUT, SIZE, SIZE)
        assert torch.isfinite(out.out).all()
        assert sorted(out.hidden) == sorted(hidden_at)
        for h in out.hidden.values():
            assert h.shape == (3, tokens, model.hidden_size)
    with pytest.raises(ValueError):
        model(x, t, y, hidden_at=(model.depth + 1,))


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build(name, time_inputs=2, qk_norm=True).train()
    randomize_zero_inits(model)
    x, t, y = batch(k=2)
    out = model(x, t, y, hidden_at=(1,))
    (out.out.square().mean() + out.hidden[1].mean()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", TINY)
def test_zero_init_outputs_zero(name):
    model = build(name).eval()
    x, t, y = batch()
    assert torch.equal(model(x, t, y).out, torch.zeros(3, C_OUT, SIZE, SIZE))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("layout,qk_norm,time_inputs", [("bhsd", True, 2), ("bshd", True, 1), ("bhsd", False, 1)])
def test_forward_backward_never_syncs(name, layout, qk_norm, time_inputs):
    """A training forward + backward on a non-host device (`meta`) reads no device value on the host and
    copies no host tensor to the device (tests/host_traffic.py): no hidden sync in the GPU hot loop and
    nothing a CUDA graph capture cannot take (core/graphs.py)."""
    from host_traffic import HostTraffic

    with torch.device("meta"):
        model = build(name, time_inputs=time_inputs, qk_norm=qk_norm, attn_layout=layout).train()
        x, t = torch.randn(3, C_IN, SIZE, SIZE), torch.rand(3, time_inputs)
        y = torch.zeros(3, dtype=torch.long)
    rec = HostTraffic()
    with rec:
        out = model(x, t, y, hidden_at=(1,))
        (out.out.square().mean() + out.hidden[1].mean()).backward()
    assert not rec.found, sorted(rec.found)


@pytest.mark.parametrize("name", LARGE)
def test_large_presets_shapes_on_meta(name):
    """Shape propagation only (meta tensors hold no data), so B/L/XL cost no memory or time."""
    with torch.device("meta"):
        model = build(name, in_channels=4, out_channels=4, input_size=16)
        x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.zeros(2, dtype=torch.long)
        out = model(x, t, y, hidden_at=(2,))
    assert out.out.shape == (2, 4, 16, 16)
    assert out.hidden[2].shape == (2, (16 // model.patch_size) ** 2, model.hidden_size)


def test_t_as_vector_equals_one_column():
    model = build("lightningdit-tiny")
    randomize_zero_inits(model)
    x, t, y = batch()
    assert torch.equal(model(x, t[:, 0], y).out, model(x, t, y).out)
    with pytest.raises(ValueError):
        model(x, torch.rand(3, 2), y)


# ----------------------------------------------------------------------------- parameter counts (§7, §11.18)

@pytest.mark.parametrize("name,c_in,c_out,expected", [
    ("dit-b-2", 4, 8, 130e6),
    ("dit-l-2", 4, 8, 458e6),
    ("dit-xl-2", 4, 8, 675e6),
    ("lightningdit-b-1", 32, 32, 130e6),
    ("lightningdit-l-1", 32, 32, 458e6),
    ("lightningdit-xl-1", 32, 32, 675.26e6),
    ("lightningdit-1p0b-1", 32, 32, 1.03e9),
])
def test_parameter_counts(name, c_in, c_out, expected):
    with torch.device("meta"):
        model = BACKBONES.build({"name": name}, in_channels=c_in, out_channels=c_out,
                                input_size=32 if name.endswith("-2") else 16, num_classes=1000)
    # The fixed sin-cos table is a buffer here (a frozen Parameter in the reference code): count it too.
    n = sum(p.numel() for p in model.parameters()) + model.pos_embed.numel()
    assert abs(n - expected) / expected < 0.01, n


# ----------------------------------------------------------------------------- embeddings (§6.4, §11.10, §11.16)

def test_dual_time_embedding_halves():
    """SFD: t = (t_tex, t_sem) columns, order (1, 0) -> t_emb[:, :D/2] from t_sem, t_emb[:, D/2:] from t_tex."""
    torch.manual_seed(0)
    model = build("lightningdit-tiny", time_inputs=2, time_embed_order=(1, 0))
    half = model.hidden_size // 2
    assert [e.mlp[2].out_features for e in model.t_embedders] == [half, half]
    t = torch.rand(5, 2)
    base = model.time_embedding(t)
    assert base.shape == (5, model.hidden_size)
    t_tex_moved = t.clone()
    t_tex_moved[:, 0] += 0.3
    t_sem_moved = t.clone()
    t_sem_moved[:, 1] += 0.3
    e_tex, e_sem = model.time_embedding(t_tex_moved), model.time_embedding(t_sem_moved)
    assert torch.equal(e_tex[:, :half], base[:, :half]) and not torch.allclose(e_tex[:, half:], base[:, half:])
    assert torch.equal(e_sem[:, half:], base[:, half:]) and not torch.allclose(e_sem[:, :half], base[:, :half])


def test_time_embed_order_validation_and_odd_split():
    with pytest.raises(ValueError):
        build("dit-tiny", time_inputs=2, time_embed_order=(0, 0))
    model = build("dit-tiny", time_inputs=3)
    assert sum(e.mlp[2].out_features for e in model.t_embedders) == model.hidden_size


def test_timestep_sinusoid_not_scaled():
    """Features are [cos, sin] of t·exp(-ln(1e4)·k/128): t is used as given (no ×1000)."""
    t = torch.tensor([0.0, 0.5])
    f = TimestepEmbedder.sinusoid(t, 256)
    assert torch.equal(f[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    half = torch.tensor(0.5)
    assert torch.allclose(f[1, 0], half.cos()) and torch.allclose(f[1, 128], half.sin())  # k = 0: frequency 1


def test_label_dropout():
    model = build("dit-tiny", class_dropout=1.0)
    assert model.null_label == model.num_classes == CLASSES
    table = model.y_embedder.embedding_table
    assert table.num_embeddings == CLASSES + 1
    y = torch.arange(CLASSES)
    null = table.weight[CLASSES].expand(CLASSES, -1)
    assert torch.equal(model.y_embedder.train()(y), null)  # training, p = 1: every label is null
    assert torch.equal(model.y_embedder.eval()(y), table.weight[:CLASSES])  # eval: never dropped


def test_label_dropout_follows_global_rng():
    emb = build("dit-tiny", class_dropout=0.5).y_embedder.train()
    y = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(1)
    a = emb(y)
    torch.manual_seed(1)
    assert torch.equal(a, emb(y))


def test_misspelled_kwarg_raises():
    with pytest.raises(TypeError, match="qk_nrom"):
        build("lightningdit-tiny", qk_nrom=True)
    with pytest.raises(TypeError):  # fixed preset args cannot be overridden
        build("dit-tiny", patch_size=1)


# ----------------------------------------------------------------------------- RoPE (§5.3)

def test_rope_identity_at_origin_and_relative():
    torch.manual_seed(0)
    grid, hd = 6, 16
    rope = RoPE2D(hd, grid)
    q, k = torch.randn(hd), torch.randn(hd)
    rq = rope(q.expand(1, 1, grid * grid, hd))[0, 0]  # (T, hd): the same q placed at every position
    rk = rope(k.expand(1, 1, grid * grid, hd))[0, 0]
    assert torch.allclose(rq[0], q, atol=0, rtol=0)  # token (0, 0) is not rotated

    def score(a: tuple[int, int], b: tuple[int, int]) -> torch.Tensor:
        return rq[a[0] * grid + a[1]] @ rk[b[0] * grid + b[1]]

    # Same (row, column) offset at different absolute places -> same score.
    assert torch.allclose(score((0, 0), (2, 3)), score((3, 2), (5, 5)), atol=1e-5)
    assert torch.allclose(score((4, 1), (1, 0)), score((5, 5), (2, 4)), atol=1e-5)
    assert torch.allclose(score((2, 2), (2, 2)), q @ k, atol=1e-5)
    assert not torch.allclose(score((0, 0), (0, 1)), score((0, 0), (1, 0)), atol=1e-3)  # rows != columns


def test_bf16_autocast_forward():
    model = build("lightningdit-tiny", qk_norm=True)
    randomize_zero_inits(model)
    x, t, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, hidden_at=(1,)).out
    assert torch.isfinite(out).all()
    assert torch.allclose(out.float(), model(x, t, y).out, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("layout,kernels", [("bshd", "torch"), ("bhsd", "triton")])
@pytest.mark.parametrize("name,qk_norm", [("lightningdit-tiny", True), ("lightningdit-tiny", False),
                                          ("dit-tiny", False)])
def test_attention_layouts_give_the_same_model(name, qk_norm, layout, kernels):
    """attn_layout and kernels are speed choices only: same state dict keys, same outputs and gradients.
    (On the CPU kernels="triton" runs the module math; tests/test_fused_*.py check the Triton kernels.)"""
    ref = build(name, qk_norm=qk_norm)
    randomize_zero_inits(ref)
    alt = build(name, qk_norm=qk_norm, attn_layout=layout, kernels=kernels)
    alt.load_state_dict(ref.state_dict())                        # strict: the same keys
    x, t, y = batch()
    outs, grads = [], []
    for m in (ref, alt):
        torch.manual_seed(1)                                        # the same label drops
        out = m(x, t, y, hidden_at=(1,))
        (out.out.square().mean() + out.hidden[1].mean()).backward()
        outs.append(out.out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="valid: bhsd, bshd"):
        build(name, attn_layout="bsdh")
    with pytest.raises(ValueError, match="valid: torch, triton"):
        build(name, kernels="cuda")
