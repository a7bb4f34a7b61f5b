"""Semantic encoders: the self-supervised stand-in (shapes, grid order, no labels in training, save/load)
and the timm DINOv2 path (real weights from a local file, fail fast offline, preprocessing)."""
import time

import pytest
import torch
import torch.nn.functional as F

from core.registry import ENCODERS
from core.types import ImageData
from encoders.dinov2 import DinoV2Encoder, resolve_dinov2_weights
from encoders.semantic import SemanticEncoder, TokenNet, augment, linear_probe, nt_xent


def tiny_data(n: int = 96, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData("rand", x, y, x[:32].clone(), y[:32].clone(), 10)


FIT = dict(steps=2, batch_size=8, probe_images=48, warmup=1)


# ----------------------------------------------------------------------------- stand-in network
def test_tokennet_shapes_and_final_norm():
    net = TokenNet(1, 32, patch=4, dim=16, depth=1, mlp_ratio=2.0)
    tokens = net(torch.randn(3, 1, 32, 32))
    assert net.grid == (8, 8) and tokens.shape == (3, 64, 16)
    # Final LayerNorm (init weight 1, bias 0): every token has mean 0 and variance 1 over D.
    assert torch.allclose(tokens.mean(-1), torch.zeros(3, 64), atol=1e-5)
    assert torch.allclose(tokens.var(-1, unbiased=False), torch.ones(3, 64), atol=1e-3)
    assert TokenNet(3, 32, patch=2, dim=8, depth=1, mlp_ratio=2.0)(torch.randn(1, 3, 32, 32)).shape == (1, 256, 8)
    with pytest.raises(ValueError):
        TokenNet(1, 32, patch=3, dim=8, depth=1, mlp_ratio=2.0)


def test_tokens_are_row_major_over_the_grid():
    # With no mixing blocks a token sees only its own patch: a pixel in patch (row 2, col 5) moves token 2·8+5.
    net = TokenNet(1, 32, patch=4, dim=8, depth=0, mlp_ratio=2.0).eval()
    x = torch.zeros(1, 1, 32, 32)
    x2 = x.clone()
    x2[0, 0, 2 * 4 + 1, 5 * 4 + 2] = 1.0
    changed = (net(x2) - net(x)).abs().sum(-1)[0] > 1e-6                      # (T,)
    assert changed.nonzero().flatten().tolist() == [2 * 8 + 5]


def test_augment_is_seeded_and_keeps_shape():
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and torch.isfinite(a).all()


def test_nt_xent_matches_definition():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.t() / 0.5
    ref = 0.0
    for i in range(10):
        j = (i + 5) % 10
        others = torch.cat([sim[i, :i], sim[i, i + 1:]])
        ref += -(sim[i, j] - torch.logsumexp(others, 0))
    assert torch.allclose(nt_xent(z1, z2, 0.5), ref / 10, atol=1e-5)
    # Identical, well separated pairs give a loss near 0.
    eye = torch.eye(4)
    assert nt_xent(eye, eye, 0.05) < 1e-6


def test_linear_probe_separable():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    feats = F.one_hot(y, 3).float() * 4 + 0.1 * torch.randn(300, 3, generator=g)
    assert linear_probe(feats[:200], y[:200], feats[200:], y[200:], 3) == 1.0


# ----------------------------------------------------------------------------- stand-in artifact
def test_registered():
    assert ENCODERS.get("semantic-encoder") is SemanticEncoder and ENCODERS.get("dinov2") is DinoV2Encoder
    assert SemanticEncoder.requires == () and DinoV2Encoder.requires == ()


def test_fit_ignores_labels_and_round_trips(tmp_path):
    data = tiny_data()
    enc = SemanticEncoder.fit(data, {}, "cpu", dim=16, depth=1, **FIT)
    # Labels only feed the report: permuted training labels give the same weights.
    perm = ImageData("rand", data.train_x, data.train_y.flip(0), data.test_x, data.test_y, 10)
    enc2 = SemanticEncoder.fit(perm, {}, "cpu", dim=16, depth=1, **FIT)
    for (k, a), b in zip(enc.net.state_dict().items(), enc2.net.state_dict().values()):
        assert torch.equal(a, b), k
    s = enc.summary()
    assert 0.0 <= s["linear_probe_acc"] <= 1.0 and s["seconds"] >= s["train_seconds"] >= 0
    assert enc.grid == (8, 8) and enc.dim == 16
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    tokens = enc.tokens(x)
    assert tokens.shape == (2, 64, 16) and not tokens.requires_grad
    enc.save(tmp_path / "enc")
    back = SemanticEncoder.load(tmp_path / "enc")
    assert torch.equal(back.tokens(x), tokens) and back.summary() == s


def test_fit_with_masked_token_term_runs():
    enc = SemanticEncoder.fit(tiny_data(), {}, "cpu", dim=16, depth=1, dense_weight=0.5, **FIT)
    assert torch.isfinite(torch.tensor(enc.summary()["final_loss"]))


def test_fit_rejects_unknown_knob():
    with pytest.raises(TypeError):
        SemanticEncoder.fit(tiny_data(), {}, "cpu", dimm=16)


# ----------------------------------------------------------------------------- DINOv2 (timm)
SMALL = "vit_small_patch14_reg4_dinov2.lvd142m"


@pytest.fixture(scope="module")
def vit_s_file(tmp_path_factory):
    """A ViT-S/14-reg4 checkpoint with random weights at timm's default 518 px (the real files' layout)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(SMALL, pretrained=False)
    path = tmp_path_factory.mktemp("dino") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_dinov2_loads_the_file_and_gives_patch_tokens(vit_s_file, tmp_path):
    from safetensors.torch import load_file

    enc = DinoV2Encoder.from_pretrained(SMALL, weights=str(vit_s_file))
    saved = load_file(str(vit_s_file))
    # The weights are the file's, not a fresh random init.
    assert torch.equal(enc.model.patch_embed.proj.weight, saved["patch_embed.proj.weight"])
    assert torch.equal(enc.model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
    assert enc.grid == (16, 16) and enc.dim == 384 and enc.model.num_prefix_tokens == 5   # CLS + 4 registers
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    tokens = enc.tokens(x)
    assert tokens.shape == (2, 256, 384)
    # Spec preprocessing: (x+1)/2 -> ImageNet mean/std -> bicubic 224 -> final-norm tokens minus prefix.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref_in = F.interpolate(((x.repeat(1, 3, 1, 1) + 1) / 2 - mean) / std, size=224, mode="bicubic")
    with torch.no_grad():
        ref = enc.model.norm(enc.model.blocks(enc.model._pos_embed(enc.model.patch_embed(ref_in))))[:, 5:]
    assert torch.allclose(tokens, ref, atol=1e-4)
    enc.save(tmp_path / "dino")
    assert torch.allclose(DinoV2Encoder.load(tmp_path / "dino").tokens(x), tokens)


def test_dinov2_missing_file_fails():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_dinov2_weights(SMALL, "/nonexistent/model.safetensors")


def test_dinov2_offline_without_cache_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        DinoV2Encoder.from_pretrained()
    msg = str(err.value)
    assert time.perf_counter() - start < 5
    assert "\n" not in msg and str(tmp_path) in msg and "weights=" in msg and "huggingface-cli download" in msg
