"""SFD SemVAE (docs/methods.md §6.2): shapes and grid layout, reparameterised sampling, the loss terms and cosine axis,
a short fit and save/load."""
import pytest
import torch
import torch.nn.functional as F

from core.registry import ENCODERS
from core.types import ImageData
from encoders.semvae import LOGVAR_RANGE, SemVAE, SemVAENet, sample, semvae_loss

NET = dict(dim=6, width=16, channels=2, depth=1, heads=2, grid=(3, 4))


def test_net_shapes_and_logvar_clamp():
    torch.manual_seed(0)
    net = SemVAENet(**NET)
    tokens = torch.randn(5, 12, 6)
    mean, logvar = net.moments(tokens)
    assert mean.shape == logvar.shape == (5, 2, 3, 4)
    assert net.decode(mean).shape == (5, 12, 6)
    with torch.no_grad():
        net.enc_out.bias.fill_(1e3)
    _, logvar = net.moments(tokens)
    assert float(logvar.detach().max()) == LOGVAR_RANGE[1]


def test_latent_is_on_the_token_grid_row_major():
    # The encoder output for token t must land at grid cell (t // w, t % w) of every channel.
    torch.manual_seed(0)
    net = SemVAENet(**NET)
    tokens = torch.randn(1, 12, 6)
    h = net.enc_in(tokens) + net.enc_pos
    raw = net.enc_out(net.enc_norm(net.enc_blocks(h)))                        # (1, T, 2c)
    mean, _ = net.moments(tokens)
    for t in range(12):
        assert torch.allclose(mean[0, :, t // 4, t % 4], raw[0, t, :2], atol=1e-6)


def test_sample_reparameterisation():
    mean = torch.randn(3, 2, 4, 4)
    a = sample(mean, torch.zeros_like(mean), torch.Generator().manual_seed(1))
    b = sample(mean, torch.zeros_like(mean), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sample(mean, torch.full_like(mean, 2 * torch.log(torch.tensor(3.0))),
                                 torch.Generator().manual_seed(1)), mean + 3 * eps, atol=1e-5)


def test_loss_terms_and_kl_normalisation():
    f = torch.randn(4, 12, 6)
    zero, one = torch.zeros(4, 2, 3, 4), torch.ones(4, 2, 3, 4)
    total, terms = semvae_loss(f, f, zero, zero, cos_weight=1.0, kl_weight=1.0, cos_axis="feature")
    assert abs(float(total)) < 1e-6 and terms["kl"] == 0.0
    # KL summed over c·h·w = 24 latent entries, averaged over the batch: mean 1, var 1 -> 0.5 per entry.
    _, terms = semvae_loss(f, f, one, zero, cos_weight=1.0, kl_weight=1e-7, cos_axis="feature")
    assert abs(terms["kl"] - 12.0) < 1e-5
    total, _ = semvae_loss(f, f, one, zero, cos_weight=1.0, kl_weight=1e-7, cos_axis="feature")
    assert abs(float(total) - 12e-7) < 1e-9


def test_cosine_axis_flag():
    f = torch.randn(4, 12, 6)
    zero = torch.zeros(4, 2, 3, 4)
    # Rescaling each token keeps its feature direction: feature-axis cosine 1, token-axis cosine < 1.
    scaled = f * torch.rand(4, 12, 1).add(0.1)
    _, feat = semvae_loss(scaled, f, zero, zero, cos_weight=1.0, kl_weight=0.0, cos_axis="feature")
    _, tok = semvae_loss(scaled, f, zero, zero, cos_weight=1.0, kl_weight=0.0, cos_axis="token")
    assert abs(feat["cos"] - 1.0) < 1e-5 and tok["cos"] < 0.999
    assert abs(tok["cos"] - float(F.cosine_similarity(scaled, f, dim=1).mean())) < 1e-6
    with pytest.raises(ValueError):
        semvae_loss(f, f, zero, zero, cos_weight=1.0, kl_weight=0.0, cos_axis="channel")


class RandomTokenEncoder:
    """Stand-in semantic encoder: 4×4 patches through a fixed random map, then LayerNorm -> (N, 64, 6)."""

    grid, dim = (8, 8), 6

    def __init__(self) -> None:
        self.w = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(images, 4, stride=4).transpose(1, 2)                # (N, 64, 16)
        return F.layer_norm(patches @ self.w, (6,))


def tiny_data() -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.zeros(64, dtype=torch.long)
    return ImageData("rand", x, y, x[:16].clone(), y[:16].clone(), 10)


def test_fit_encode_decode_and_round_trip(tmp_path):
    assert ENCODERS.get("semvae") is SemVAE and SemVAE.requires == ("semantic-encoder",)
    enc = RandomTokenEncoder()
    vae = SemVAE.fit(tiny_data(), {"semantic-encoder": enc}, "cpu", width=16, depth=1, heads=2, steps=3,
                     batch_size=8, warmup=1, fit_images=32, eval_images=16)
    s = vae.summary()
    assert {"test_recon_cos", "test_recon_cos_mean", "test_recon_mse", "seconds"} <= set(s)
    assert vae.latent_channels == 2 and vae.grid == (8, 8)
    tokens = enc.tokens(torch.rand(3, 1, 32, 32) * 2 - 1)
    z = vae.encode(tokens, torch.Generator().manual_seed(0))
    assert z.shape == (3, 2, 8, 8) and vae.decode(z).shape == (3, 64, 6)
    assert torch.equal(z, vae.encode(tokens, torch.Generator().manual_seed(0)))
    assert vae.encode_mean(tokens).shape == (3, 2, 8, 8)
    vae.save(tmp_path / "sv")
    back = SemVAE.load(tmp_path / "sv")
    assert torch.equal(back.encode_mean(tokens), vae.encode_mean(tokens)) and back.summary() == s


def test_training_lowers_the_loss():
    # A few dozen steps must improve reconstruction over the untrained net (catches a detached loss).
    enc = RandomTokenEncoder()
    common = dict(width=16, depth=1, heads=2, batch_size=16, warmup=1, fit_images=64, eval_images=16, lr=3e-3)
    before = SemVAE.fit(tiny_data(), {"semantic-encoder": enc}, "cpu", steps=0, **common).summary()
    after = SemVAE.fit(tiny_data(), {"semantic-encoder": enc}, "cpu", steps=60, **common).summary()
    assert after["test_recon_mse"] < before["test_recon_mse"]
