"""Texture VAE artifact: shapes, posterior sampling, seeding, save/load, pretrained loading errors."""
import pytest
import torch
from diffusers import AutoencoderKL

from core.registry import ENCODERS
from core.types import ImageData, to_unit
from encoders.texture_vae import TextureVAE, autoencoder_config, lr_at, match_channels, shuffled_batches




TINY = dict(block_out_channels=(8, 8, 8), norm_num_groups=4, steps=3, batch_size=8, eval_images=16)


def toy_data(n: int = 32, size: int = 16, channels: int = 1) -> ImageData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 10
    return ImageData("toy", x, y, x[:16].clone(), y[:16].clone(), 10)


@pytest.fixture(scope="module")
def vae() -> TextureVAE:
    return TextureVAE.fit(toy_data(), {}, "cpu", **TINY)


def test_registered_and_properties(vae):
    assert ENCODERS.get("texture-vae") is TextureVAE and TextureVAE.requires == ()
    assert vae.latent_channels == 4 and vae.downsample == 4 and vae.image_channels == 1


def test_encode_decode_shapes_and_sampling(vae):
    x = to_unit(toy_data().train_x[:5])  # (5, 1, 16, 16)
    z = vae.encode(x, generator=torch.Generator().manual_seed(1))
    assert z.shape == (5, 4, 4, 4) and not z.requires_grad
    z_again = vae.encode(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, z_again)  # the generator fixes the posterior sample
    mean = vae.encode_mean(x)
    assert not torch.equal(z, mean)  # encode draws a sample, encode_mean does not
    assert vae.decode(z).shape == (5, 1, 16, 16)
    rgb = x.expand(-1, 3, -1, -1)  # RGB input to a grey VAE is averaged to one channel
    torch.testing.assert_close(vae.encode_mean(rgb), mean)


def test_summary_numbers(vae):
    s = vae.summary()
    for key in ("test_recon_mse", "test_psnr_db", "fit_seconds", "eval_seconds", "params", "downsample"):
        assert key in s
    assert s["test_images"] == 16 and s["test_recon_mse"] > 0


def test_same_seed_same_weights_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = TextureVAE.fit(toy_data(), {}, "cpu", **TINY)
    after = torch.rand(1)
    b = TextureVAE.fit(toy_data(), {}, "cpu", **TINY)
    assert torch.equal(before, after)  # fit leaves the caller's global RNG stream alone
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_save_load_round_trip(vae, tmp_path):
    vae.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"weights.safetensors", "config.json", "summary.json"}
    back = TextureVAE.load(tmp_path, "cpu")
    x = to_unit(toy_data().test_x[:4])
    torch.testing.assert_close(back.encode_mean(x), vae.encode_mean(x), rtol=0, atol=0)
    assert back.summary()["test_recon_mse"] == vae.summary()["test_recon_mse"]
    assert back.fit_args == vae.fit_args


def test_fit_rejects_unknown_knob():
    with pytest.raises(TypeError):
        TextureVAE.fit(toy_data(), {}, "cpu", step=3)


def test_training_reduces_reconstruction_error():
    data = toy_data(64)
    data.train_x[:] = data.train_x[:1]  # one image repeated: easy to fit in a few steps
    data.test_x[:] = data.train_x[:1]
    short = TextureVAE.fit(data, {}, "cpu", **{**TINY, "steps": 1})
    longer = TextureVAE.fit(data, {}, "cpu", **{**TINY, "steps": 40})
    assert longer.summary()["test_recon_mse"] < 0.5 * short.summary()["test_recon_mse"]


def test_from_pretrained_folder_and_missing(tmp_path):
    cfg = autoencoder_config(3, 16, 4, (8, 8), 1, 4, False)
    AutoencoderKL(**cfg).save_pretrained(tmp_path / "sd", safe_serialization=True)
    vae = TextureVAE.from_pretrained(str(tmp_path), subfolder="sd")
    assert vae.image_channels == 3 and vae.downsample == 2 and vae.latent_channels == 4
    assert vae.encode(torch.zeros(2, 3, 16, 16)).shape == (2, 4, 8, 8)
    vae.save(tmp_path / "artifact")  # a loaded pretrained VAE caches like a trained one
    assert TextureVAE.load(tmp_path / "artifact").image_channels == 3
    with pytest.raises(FileNotFoundError, match="no diffusers AutoencoderKL"):
        TextureVAE.from_pretrained(str(tmp_path / "nope"))


def test_helpers():
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(99, 100, 1.0, warmup=10) == pytest.approx(0.1, abs=1e-3)  # ends at 10% of lr
    assert match_channels(torch.ones(2, 1, 4, 4), 3).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError):
        match_channels(torch.ones(2, 2, 4, 4), 3)
    with pytest.raises(ValueError, match="norm_num_groups"):
        autoencoder_config(1, 32, 4, (12, 16), 1, 8, False)


def test_fewer_images_than_the_batch_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="fewer than the batch size 8"):
        next(shuffled_batches(5, 8, torch.Generator().manual_seed(0)))
