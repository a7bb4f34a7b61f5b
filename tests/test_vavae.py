"""VA-VAE: the VF margin losses and the adaptive weight on toys, token-grid alignment, and the artifact
(trained against a stand-in semantic encoder) behaving like texture-vae."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.registry import ENCODERS
from core.types import ImageData, to_unit
from encoders.texture_vae import TextureVAE
from encoders.vavae import VAVAE, adaptive_weight, tokens_on_grid, vf_losses

TINY = dict(block_out_channels=(8, 8, 8), norm_num_groups=4, steps=3, batch_size=8, eval_images=16)




class StandInEncoder(nn.Module):
    """A frozen random conv with stride 4 (= the VAE's downsampling): tokens (N, h·w, D), row-major."""

    def __init__(self, dim: int = 12, stride: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(1, dim, stride, stride=stride)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
        self.requires_grad_(False)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.mean(dim=1, keepdim=True)).flatten(2).transpose(1, 2)  # (N, h·w, D)


def toy_data(n: int = 32, size: int = 16) -> ImageData:
    """Smooth images (bilinearly upsampled 4×4 noise): compressible into a 4×4 latent, unlike pixel noise."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    x = (F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 255).to(torch.uint8)
    y = torch.arange(n) % 10
    return ImageData("toy", x, y, x[:16].clone(), y[:16].clone(), 10)


# ----------------------------------------------------------------------------- pure losses
def test_vf_losses_zero_when_aligned_positive_otherwise():
    f = torch.randn(2, 9, 5)
    cos, dist = vf_losses(f.clone(), f)
    assert float(cos) == 0.0 and float(dist) == 0.0
    cos, dist = vf_losses(3.0 * f, f)  # cosine ignores scale
    assert float(cos) == 0.0 and float(dist) == pytest.approx(0.0, abs=1e-6)
    cos, dist = vf_losses(-f, f)  # cos = −1 everywhere: 1 − 0.5 + 1; similarity matrices unchanged
    assert float(cos) == pytest.approx(1.5) and float(dist) == pytest.approx(0.0, abs=1e-6)
    cos, dist = vf_losses(torch.randn(2, 9, 5), f)
    assert float(cos) > 0 and float(dist) > 0


def test_vf_losses_hand_computed():
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2): orthogonal tokens
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # second position points the wrong way
    cos, dist = vf_losses(z, f, m1=0.0, m2=0.0)
    assert float(cos) == pytest.approx((0.0 + 1.0) / 2)  # cos = (1, 0): ReLU(1 − cos) = (0, 1)
    # sim_z = [[1,1],[1,1]], sim_f = I: |Δ| = 1 off the diagonal, 0 on it -> mean over 4 pairs = 0.5
    assert float(dist) == pytest.approx(0.5)
    assert float(vf_losses(z, f, m1=0.5, m2=0.25)[1]) == pytest.approx(0.75 / 2)


def test_margins_clip_small_differences():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(3, 16, 8, generator=g), dim=-1)
    z = F.normalize(f + 0.03 * torch.randn(3, 16, 8, generator=g), dim=-1)  # close, not equal
    cos_nomargin, dist_nomargin = vf_losses(z, f, m1=0.0, m2=0.0)
    assert float(cos_nomargin) > 0 and float(dist_nomargin) > 0
    cos, dist = vf_losses(z, f, m1=0.5, m2=0.25)  # every cos > 0.5 and |Δ similarity| < 0.25 here
    assert float(cos) == 0.0 and float(dist) == 0.0


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    c = torch.tensor([0.3, 0.1, -0.2])
    rec = 3.0 * (w ** 2).sum()  # ∇ = 6w
    vf = (c * w).sum()  # ∇ = c
    got = adaptive_weight(rec, vf, w, eps=0.0)
    expected = (6.0 * w.detach()).norm() / c.norm()
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad
    rec.backward()  # the graph was retained for the real backward pass
    assert float(adaptive_weight(3.0 * (w ** 2).sum(), 0.0 * vf, w, eps=1e-4, max_weight=50.0)) == 50.0


def test_tokens_on_grid():
    t = torch.randn(2, 16, 3)
    assert tokens_on_grid(t, 4, 4) is t
    small = tokens_on_grid(t, 2, 2)  # a 4×4 token grid resized to the 2×2 latent grid
    grid = t.transpose(1, 2).reshape(2, 3, 4, 4)
    torch.testing.assert_close(small[:, 0], grid[:, :, 0:2, 0:2].mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="square"):
        tokens_on_grid(torch.randn(1, 15, 3), 4, 4)


# ----------------------------------------------------------------------------- the artifact
@pytest.fixture(scope="module")
def vavae() -> VAVAE:
    return VAVAE.fit(toy_data(), {"semantic-encoder": StandInEncoder()}, "cpu", **TINY)


def test_artifact_is_a_texture_vae(vavae):
    assert ENCODERS.get("vavae") is VAVAE and VAVAE.requires == ("semantic-encoder",)
    assert isinstance(vavae, TextureVAE) and vavae.kind == "vavae"
    assert vavae.latent_channels == 4 and vavae.downsample == 4 and vavae.image_channels == 1
    assert vavae.reverse_proj.weight.shape == (12, 4, 1, 1) and vavae.reverse_proj.bias is None
    x = to_unit(toy_data().test_x[:3])
    z = vavae.encode(x)
    assert z.shape == (3, 4, 4, 4) and vavae.decode(z).shape == (3, 1, 16, 16)
    s = vavae.summary()
    assert "test_vf_cos" in s and "test_psnr_db" in s and s["kind"] == "vavae"


def test_save_load_round_trip(vavae, tmp_path):
    vavae.save(tmp_path)
    back = VAVAE.load(tmp_path)
    x = to_unit(toy_data().test_x[:3])
    torch.testing.assert_close(back.encode_mean(x), vavae.encode_mean(x), rtol=0, atol=0)
    assert back.fit_args["encoder_dim"] == 12
    with pytest.raises(ValueError, match="vavae"):
        TextureVAE.load(tmp_path)  # kinds are checked, not silently mixed


def test_vf_loss_aligns_the_latent():
    data, enc = toy_data(64), StandInEncoder(dim=4)  # as wide as the latent: full alignment is reachable
    cfg = {**TINY, "steps": 60, "eval_images": 32}
    plain = VAVAE.fit(data, {"semantic-encoder": enc}, "cpu", **{**cfg, "vf_weight": 0.0})
    aligned = VAVAE.fit(data, {"semantic-encoder": enc}, "cpu", **{**cfg, "vf_weight": 1.0})
    assert aligned.summary()["test_vf_cos"] > plain.summary()["test_vf_cos"] + 0.2
