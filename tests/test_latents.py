"""Latent builders with stand-in artifacts: requirements, channel layout (§11.6), per-group normalisation
round trip (§11.15), decode from the texture group only, grid resizing."""
import pytest
import torch
import torch.nn.functional as F

from core.registry import LATENTS
from encoders.pca import TokenPCA, fit_pca
from encoders.semvae import SemVAE, SemVAENet
from methods.latents import VAELatent, VAEPCALatent, VAESemVAELatent


class FakeTokenizer:
    """Parameter-free texture VAE stand-in: 32×32 -> (4, 8, 8) posterior sample; works in any float dtype."""

    latent_channels, downsample = 4, 4

    def encode(self, images, generator=None):
        pooled = F.avg_pool2d(images, 4)                                          # (N, 1, 8, 8)
        z = torch.cat([pooled * (k + 1) + k for k in range(4)], dim=1)            # (N, 4, 8, 8)
        return z + 0.1 * torch.randn(z.shape, generator=generator, dtype=z.dtype)

    def decode(self, z):
        return torch.tanh(F.interpolate(z.mean(1, keepdim=True), scale_factor=4))  # (N, 1, 32, 32)


class FakeEncoder:
    """Semantic-encoder stand-in: patch pixels through a fixed map -> (N, T, 10) tokens on a (32/p)² grid."""

    dim = 10

    def __init__(self, patch: int = 4) -> None:
        self.patch, self.grid = patch, (32 // patch, 32 // patch)
        self.w = torch.randn(patch * patch, 10, generator=torch.Generator().manual_seed(0))

    def tokens(self, images):
        patches = F.unfold(images.float(), self.patch, stride=self.patch).transpose(1, 2)   # (N, T, p²)
        return F.layer_norm(patches @ self.w, (10,))


def images(n=5, seed=0):
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def artifacts(patch: int = 4) -> dict:
    enc = FakeEncoder(patch)
    pca = TokenPCA(10, enc.grid)
    for name, value in fit_pca(enc.tokens(images(40, seed=1)).reshape(-1, 10)).items():
        getattr(pca, name).copy_(value)
    torch.manual_seed(0)
    semvae = SemVAE(SemVAENet(dim=10, width=16, channels=2, depth=1, heads=2, grid=enc.grid), {}, {})
    return {"texture-vae": FakeTokenizer(), "vavae": FakeTokenizer(), "semantic-encoder": enc, "pca": pca,
            "semvae": semvae}


def gen():
    return torch.Generator().manual_seed(7)


# ----------------------------------------------------------------------------- requirements
@pytest.mark.parametrize("cfg, kinds", [
    ({"name": "vae"}, ("texture-vae",)),
    ({"name": "vae", "tokenizer": "vavae"}, ("vavae",)),
    ({"name": "vae", "aux_tokens": True}, ("texture-vae", "semantic-encoder")),
    ({"name": "vae-pca", "rank": 4}, ("texture-vae", "semantic-encoder", "pca")),
    ({"name": "vae-semvae"}, ("texture-vae", "semantic-encoder", "semvae")),
    ({"name": "vae-semvae", "tokenizer": "vavae"}, ("vavae", "semantic-encoder", "semvae")),
])
def test_requires_before_and_after_build(cfg, kinds):
    rest = {k: v for k, v in cfg.items() if k != "name"}
    assert LATENTS.get(cfg["name"]).requires_for(**rest) == kinds
    assert LATENTS.build(cfg, artifacts=artifacts()).requires == kinds


def test_unknown_key_missing_artifact_and_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        VAEPCALatent(artifacts(), rank=11)
    with pytest.raises(TypeError):
        VAEPCALatent.requires_for(rnak=4)
    with pytest.raises(TypeError):
        LATENTS.build({"name": "vae", "aux_token": True}, artifacts=artifacts())
    with pytest.raises(KeyError, match="semvae"):
        LATENTS.build({"name": "vae-semvae"}, artifacts={"texture-vae": FakeTokenizer(),
                                                         "semantic-encoder": FakeEncoder()})


# ----------------------------------------------------------------------------- shapes and layout
def test_vae_shapes_and_aux():
    arts = artifacts()
    plain = VAELatent(arts)
    out = plain.encode(images(), gen())
    assert set(out) == {"x1"} and out["x1"].shape == (5, 4, 8, 8) and plain.aux_keys == ()
    assert plain.groups.names == ("texture",) and plain.groups.sizes == (4,)
    assert torch.equal(out["x1"], FakeTokenizer().encode(images(), gen()))
    repa = VAELatent(arts, aux_tokens=True)
    out = repa.encode(images(), gen())
    assert repa.aux_keys == ("tokens",) and out["tokens"].shape == (5, 64, 10)


def test_redi_layout_texture_first_then_pca():
    arts = artifacts()
    redi = VAEPCALatent(arts, rank=3)
    x1 = redi.encode(images(), gen())["x1"]
    assert x1.shape == (5, 7, 8, 8) and redi.groups.names == ("texture", "semantic")
    assert redi.groups.slice_of("texture") == slice(0, 4) and redi.groups.slice_of("semantic") == slice(4, 7)
    assert torch.equal(x1[:, :4], FakeTokenizer().encode(images(), gen()))
    pcs = arts["pca"].project(arts["semantic-encoder"].tokens(images()), 3)
    assert torch.allclose(x1[:, 4:], pcs)                                          # not rescaled
    assert VAEPCALatent(arts).groups.sizes == (4, 8)                               # default rank 8


def test_sfd_layout_semantic_last():
    arts = artifacts()
    sfd = VAESemVAELatent(arts)
    out = sfd.encode(images(), gen())
    assert out["x1"].shape == (5, 6, 8, 8) and sfd.groups.names == ("texture", "semantic")
    assert sfd.groups.slice_of("semantic") == slice(4, 6) and out["tokens"].shape == (5, 64, 10)
    g = gen()
    tex = FakeTokenizer().encode(images(), g)
    sem = arts["semvae"].encode(arts["semantic-encoder"].tokens(images()), g)    # same generator, same order
    assert torch.equal(out["x1"][:, :4], tex) and torch.equal(out["x1"][:, 4:], sem)


def test_coarser_token_grid_is_resized_bilinear():
    arts = artifacts(patch=8)                                                      # 4×4 token grid
    x1 = VAEPCALatent(arts, rank=2).encode(images(), gen())["x1"]
    assert x1.shape == (5, 6, 8, 8)
    pcs = arts["pca"].project(arts["semantic-encoder"].tokens(images()), 2)      # (5, 2, 4, 4)
    assert torch.allclose(x1[:, 4:], F.interpolate(pcs, size=(8, 8), mode="bilinear", align_corners=False))
    assert VAESemVAELatent(arts).encode(images(), gen())["x1"].shape == (5, 6, 8, 8)


# ----------------------------------------------------------------------------- stats, normalisation, decode
@pytest.mark.parametrize("name", ["vae", "vae-pca", "vae-semvae"])
def test_normalisation_round_trip_float64(name):
    b = LATENTS.build({"name": name}, artifacts=artifacts())
    c = b.groups.channels
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, c, 8, 8, generator=g, dtype=torch.float64) * torch.rand(1, c, 1, 1, generator=g,
                                                                                  dtype=torch.float64) * 5 + 2
    mean, std = b.stats_from(x)
    assert mean.shape == std.shape == (1, c, 1, 1) and mean.dtype == torch.float64
    b.set_stats(mean, std)
    assert torch.allclose(b.denormalize(b.normalize(x)), x, atol=1e-12)
    xn = b.normalize(x)
    norm_ch = [i for i, s in enumerate(b.groups.slices) if b.normalized[i] for i in range(s.start, s.stop)]
    assert torch.allclose(xn[:, norm_ch].mean((0, 2, 3)), torch.zeros(len(norm_ch), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(xn[:, norm_ch].std((0, 2, 3)), torch.ones(len(norm_ch), dtype=torch.float64), atol=1e-12)


def test_redi_semantic_group_unnormalised_by_default():
    arts = artifacts()
    x = torch.randn(20, 12, 8, 8, dtype=torch.float64) * 3 + 1
    redi = VAEPCALatent(arts)
    redi.set_stats(*redi.stats_from(x))
    assert torch.equal(redi.normalize(x)[:, 4:], x[:, 4:])
    assert not torch.allclose(redi.normalize(x)[:, :4], x[:, :4])
    normed = VAEPCALatent(arts, normalize_semantic=True)
    normed.set_stats(*normed.stats_from(x))
    assert torch.allclose(normed.normalize(x)[:, 4:].std((0, 2, 3)), torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("name", ["vae-pca", "vae-semvae"])
def test_decode_uses_only_the_texture_channels(name):
    b = LATENTS.build({"name": name}, artifacts=artifacts())
    x = b.encode(images(), gen())["x1"].double()
    b.set_stats(*b.stats_from(x))
    xn = b.normalize(x)
    tex = b.groups.slice_of("texture")
    decoded = b.decode(xn)
    assert decoded.shape == (5, 1, 32, 32)
    # Texture stats applied to the texture channels after dropping the others (docs/methods.md §11.15).
    assert torch.allclose(decoded, FakeTokenizer().decode(x[:, tex]), atol=1e-12)
    changed = xn.clone()
    changed[:, b.groups.slice_of("semantic")] = torch.randn_like(changed[:, b.groups.slice_of("semantic")]) * 100
    assert torch.equal(b.decode(changed), decoded)


def test_stats_errors():
    b = VAELatent(artifacts())
    with pytest.raises(RuntimeError):
        b.normalize(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError):
        b.set_stats(torch.zeros(4), torch.ones(4))
