"""Pretrained tokenizers and encoders (encoders/pretrained.py, encoders/ldm_vae.py, DINOv2 entries): each
loads the weights of a small random-weight file written here in the real format, computes the same function
as an independent implementation, slots into prepare like texture-vae, and fails in one line without it."""
import functools
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from benchmarks.data.prepare import artifact_class, artifact_plan, build_encodings, build_node
from core.config import ConfigError, check_keys
from core.registry import ENCODERS
from core.types import ImageData, to_unit
from encoders.ldm_vae import convert_state, ldm_to_diffusers, read_checkpoint
from encoders.pretrained import (DinoV2B14Reg, DinoV2L14, LDMf16d32, SDVAEftEMA, SDVAEftMSE, VAVAEf16d32,
                                 load_latent_stats)
from encoders.dinov2 import IMAGENET_MEAN, IMAGENET_STD
from encoders.texture_vae import autoencoder_config
from methods.latents import VAELatent
from ldm_ref import CH, MULT, Z, ref_model, write_ldm_ckpt, write_vavae_pt

CPU = torch.device("cpu")


def toy_data(n: int = 6) -> ImageData:
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageData("toy", x, torch.arange(n) % 10, x.clone(), torch.arange(n) % 10, 10)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def fails_in_one_line(fn, *args, **kwargs) -> str:
    """The FileNotFoundError message of fn(...), asserted to be one line and to come fast (no retries)."""
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        fn(*args, **kwargs)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache with the hub offline: what a compute node without the files sees."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def fake_hub_cache(root, repo: str):
    """The snapshot folder huggingface_hub reads `repo`'s main revision from (offline reads need no more)."""
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    (base / "snapshots" / ("0" * 40)).mkdir(parents=True)
    return base / "snapshots" / ("0" * 40)


# -------------------- LDM f16d32 -> diffusers ---------------------------------------------------

@pytest.mark.parametrize("attn_levels", [(4,), ()])
@pytest.mark.parametrize("entry, write", [(LDMf16d32, write_ldm_ckpt), (VAVAEf16d32, write_vavae_pt)])
def test_ldm_conversion_computes_the_reference_function(entry, write, attn_levels, tmp_path):
    ref = ref_model(attn_levels=attn_levels)
    path = tmp_path / ("vae.ckpt" if entry is LDMf16d32 else "vae.pt")
    write(path, ref)
    model = entry.fit(toy_data(), {}, CPU, weights=str(path), eval_images=4)
    cfg = model.vae_config
    assert cfg["block_out_channels"] == [CH * m for m in MULT] and cfg["layers_per_block"] == 2
    assert model.downsample == 16 and model.latent_channels == Z and model.image_channels == 3
    assert cfg["down_block_types"][-1] == ("AttnDownEncoderBlock2D" if attn_levels else "DownEncoderBlock2D")
    assert model.summary()["dropped"] == ({"loss": 3} if entry is LDMf16d32 else {"loss": 1, "reverse_proj": 1})

    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        moments = ref.moments(x)                                            # (3, 2Z, 2, 2)
        z = torch.randn(3, Z, 2, 2)
        ref_img = ref.decode(z)
    assert rel_err(model.encode_mean(x), moments[:, :Z]) < 1e-5
    assert rel_err(model.vae.encode(x).latent_dist.logvar, moments[:, Z:].clamp(-30, 20)) < 1e-5
    assert rel_err(model.decode(z), ref_img) < 1e-5
    # The posterior sample is mean + std·ε with ε from the caller's generator (docs/methods.md §5.1: a sample).
    eps = torch.randn(3, Z, 2, 2, generator=torch.Generator().manual_seed(5))
    sample = model.encode(x, generator=torch.Generator().manual_seed(5))
    assert rel_err(sample, moments[:, :Z] + (0.5 * moments[:, Z:].clamp(-30, 20)).exp() * eps) < 1e-5


def test_converter_rejects_what_it_cannot_map(tmp_path):
    state = ref_model().state_dict()
    with pytest.raises(KeyError, match="unknown LDM autoencoder key"):
        convert_state({**state, "encoder.down.0.block.0.extra.weight": torch.zeros(1)}, 5)
    with pytest.raises(ValueError, match="missing"):
        ldm_to_diffusers({k: v for k, v in state.items() if k != "decoder.up.4.attn.2.q.weight"})
    with pytest.raises(ValueError, match="not an LDM-format autoencoder"):
        ldm_to_diffusers({"model.weight": torch.zeros(1)})
    torch.save({"state_dict": {"a": torch.zeros(1)}, "opt": torch.optim.SGD}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="trust_pickle"):
        read_checkpoint(tmp_path / "x.ckpt")
    assert set(read_checkpoint(tmp_path / "x.ckpt", trust_pickle=True)) == {"a"}


def test_ldm_entry_saves_the_source_not_the_weights_and_detects_changes(tmp_path):
    path = tmp_path / "ldm-imagenet256-f16d32-50ep.ckpt"
    write_ldm_ckpt(path, ref_model(0))
    model = LDMf16d32.fit(toy_data(), {}, CPU, weights=str(path), eval_images=0)
    model.save(tmp_path / "art")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["config.json", "summary.json"]
    back = LDMf16d32.load(tmp_path / "art", CPU)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(back.encode_mean(x), model.encode_mean(x))
    write_ldm_ckpt(path, ref_model(1))              # the file changed under the cache: never used silently
    with pytest.raises(ValueError, match="changed since"):
        LDMf16d32.load(tmp_path / "art", CPU)


def test_ldm_weights_from_file_or_hf_cache_else_one_line_error(hub_cache):
    msg = fails_in_one_line(LDMf16d32.fit, toy_data(), {}, CPU, weights="/nope/ldm.ckpt")
    assert "/nope/ldm.ckpt" in msg and "huggingface.co/hustvl/va-vae-imagenet256-experimental-variants" in msg
    msg = fails_in_one_line(VAVAEf16d32.fit, toy_data(), {}, CPU)     # weights=None: the official file, HF cache
    assert str(hub_cache) in msg and "huggingface-cli download hustvl/vavae-imagenet256-f16d32-dinov2 " \
                                      "vavae-imagenet256-f16d32-dinov2.pt" in msg
    write_ldm_ckpt(fake_hub_cache(hub_cache, LDMf16d32.hub_repo) / LDMf16d32.hub_file_name, ref_model())
    assert LDMf16d32.fit(toy_data(), {}, CPU, eval_images=0).summary()["weights"].startswith(str(hub_cache))


# -------------------- SD-VAE (diffusers folders) ------------------------------------------------

def sd_like_folder(path) -> AutoencoderKL:
    """A 4-level (f8), 4-channel diffusers VAE with SD's scaling_factor in its config, random weights."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**autoencoder_config(3, 32, 4, (8, 16, 16, 16), 1, 4, True)).eval()
    vae.save_pretrained(path, safe_serialization=True)
    return vae


def test_sd_vae_local_folder_raw_latents_and_round_trip(tmp_path):
    vae = sd_like_folder(tmp_path / "sd")
    model = SDVAEftEMA.fit(toy_data(), {}, CPU, source=str(tmp_path / "sd"), eval_images=4)
    assert model.downsample == 8 and model.latent_channels == 4 and "test_psnr_db" in model.summary()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    expect = vae.encode(x).latent_dist.mean.detach()
    assert torch.equal(model.encode_mean(x), expect)         # raw: no 0.18215 applied (docs/methods.md §5.2)
    assert model.encode_mean(x.mean(1, keepdim=True)).shape == (2, 4, 4, 4)    # grey input: repeated to RGB
    model.save(tmp_path / "art")
    assert not list((tmp_path / "art").glob("*.safetensors"))
    assert torch.equal(SDVAEftEMA.load(tmp_path / "art").decode(expect), model.decode(expect))


def test_per_image_generators_follow_their_image_through_the_chunks(tmp_path):
    """A list of generators (one per image) gives image i the same noise whatever the chunk size."""
    sd_like_folder(tmp_path / "sd")
    model = SDVAEftEMA.fit(toy_data(), {}, CPU, source=str(tmp_path / "sd"), eval_images=0)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(5)]  # noqa: E731
    model.chunk = 2
    chunked = model.encode(x, generator=gens())
    model.chunk = 32
    # Batches of 2 and of 5 (and of 1) run other convolution kernels, whose blocking also differs between
    # CPU models: float32 rounding through the encoder's layers (a few 1e-7 per layer on O(1) latents;
    # 1e-6 measured here) is allowed, a wrong generator (an O(1) change of the noise) is not.
    assert torch.allclose(chunked, model.encode(x, generator=gens()), rtol=1e-5, atol=1e-5)
    assert torch.allclose(chunked[3:4], model.encode(x[3:4], generator=gens()[3:4]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 generators for 5 images"):
        model.encode(x, generator=gens()[:2])


def test_sd_vae_hub_ids_from_cache_or_one_line_error(hub_cache):
    sd_like_folder(fake_hub_cache(hub_cache, "stabilityai/sd-vae-ft-ema"))
    assert SDVAEftEMA.fit(toy_data(), {}, CPU, eval_images=0).summary()["source"] == "stabilityai/sd-vae-ft-ema"
    msg = fails_in_one_line(SDVAEftMSE.fit, toy_data(), {}, CPU)
    assert str(hub_cache) in msg and "huggingface-cli download stabilityai/sd-vae-ft-mse" in msg
    assert "/no/such/folder" in fails_in_one_line(SDVAEftEMA.fit, toy_data(), {}, CPU, source="/no/such/folder")


# -------------------- Registry, prepare's `use:` slot, latent builders, stats -------------------

def test_registered_and_config_keys_checked():
    for name, cls in [("sd-vae-ft-ema", SDVAEftEMA), ("sd-vae-ft-mse", SDVAEftMSE), ("ldm-f16d32", LDMf16d32),
                      ("vavae-f16d32", VAVAEf16d32), ("dinov2-b14-reg", DinoV2B14Reg), ("dinov2-l14", DinoV2L14)]:
        assert ENCODERS.get(name) is cls and cls.kind == name and cls.requires == ()
    deps = ("data", "deps", "device")
    check_keys("prepare.texture-vae", LDMf16d32.fit, {"weights": "x", "eval_images": 0}, deps=deps)
    with pytest.raises(ConfigError, match="unknown key 'steps'"):   # nothing to train: no training knobs
        check_keys("prepare.texture-vae", SDVAEftEMA.fit, {"steps": 3}, deps=deps)
    with pytest.raises(TypeError, match="name"):                    # the entry is the model: no name knob
        DinoV2L14.fit(toy_data(), {}, CPU, name=DinoV2B14Reg.timm_name)


def test_fills_the_texture_slot_in_prepare_and_the_latent_builder(tmp_path):
    path = tmp_path / "ldm.ckpt"
    write_ldm_ckpt(path, ref_model())
    cfg = {"method": {"latent": {"name": "vae", "tokenizer": "texture-vae", "aux_tokens": False}},
           "prepare": {"texture-vae": {"use": "ldm-f16d32", "weights": str(path), "eval_images": 0}},
           "data": {"name": "toy", "image_size": 32, "limit_train": None, "limit_test": None, "flips": True},
           "cache_dir": str(tmp_path / "cache")}
    data = toy_data()
    node = next(n for n in artifact_plan(cfg) if n.kind == "texture-vae")
    art_dir = build_node(node, cfg, data, {}, CPU)
    assert node.cls is LDMf16d32 and artifact_class(art_dir) is LDMf16d32
    enc = load_file(str(build_encodings(cfg, data, "texture-vae", art_dir, CPU) / "texture.safetensors"))
    assert enc["texture"].shape == enc["texture_flip"].shape == (6, Z, 2, 2)

    # SFD's stats files in the suite's (1, C, 1, 1) format drive the latent builder's normalisation.
    torch.save({"mean": torch.randn(1, Z, 1, 1), "std": torch.rand(1, Z, 1, 1) + 0.5}, tmp_path / "latents_stats.pt")
    latent = VAELatent({"texture-vae": LDMf16d32.load(art_dir, CPU)})
    latent.set_stats(*load_latent_stats(tmp_path / "latents_stats.pt", channels=Z))
    x1 = latent.normalize(latent.encode(to_unit(data.train_x[:2]))["x1"])    # (2, 32, 2, 2)
    assert latent.decode(x1).shape == (2, 3, 32, 32)


def sfd_latent_stats(texture, semantic) -> tuple[torch.Tensor, torch.Tensor]:
    """SFD's composite-latent stats (1, 32 + 16, 1, 1): latents_stats.pt then latents_sv_stats.pt, in the
    latent's channel order (texture first, semantic last, docs/methods.md §6.1)."""
    (m_tex, s_tex), (m_sem, s_sem) = load_latent_stats(texture), load_latent_stats(semantic)
    return torch.cat([m_tex, m_sem], dim=1), torch.cat([s_tex, s_sem], dim=1)


def test_latent_stats_files(tmp_path):
    tex, sem = tmp_path / "latents_stats.pt", tmp_path / "latents_sv_stats.pt"
    m_tex, s_tex = torch.randn(1, 32, 1, 1), torch.rand(1, 32, 1, 1) + 0.1
    torch.save({"mean": m_tex, "std": s_tex}, tex)
    torch.save({"mean": torch.zeros(16), "std": torch.ones(16).double()}, sem)     # flat shapes are accepted
    mean, std = load_latent_stats(tex)
    assert torch.equal(mean, m_tex) and torch.equal(std, s_tex) and mean.dtype == torch.float32
    mean, std = sfd_latent_stats(tex, sem)
    assert mean.shape == std.shape == (1, 48, 1, 1)                  # texture first, semantic last (docs/methods.md §6.1)
    assert torch.equal(mean[:, :32], m_tex) and torch.equal(std[:, 32:], torch.ones(1, 16, 1, 1))
    assert "SFD-Project/SFD" in fails_in_one_line(load_latent_stats, tmp_path / "none.pt")
    with pytest.raises(ValueError, match="one value per channel for 16"):
        load_latent_stats(tex, channels=16)
    torch.save({"mu": m_tex}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        load_latent_stats(tmp_path / "bad.pt")
    torch.save({"mean": m_tex, "std": torch.zeros(1, 32, 1, 1)}, tmp_path / "zero.pt")
    with pytest.raises(ValueError, match="std > 0"):
        load_latent_stats(tmp_path / "zero.pt")


# -------------------- DINOv2 entries (timm) -----------------------------------------------------

def test_dinov2_b14_reg_loads_a_real_size_file(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model(DinoV2B14Reg.timm_name, pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    del src
    enc = ENCODERS.get("dinov2-b14-reg").fit(toy_data(), {}, CPU, weights=str(path))
    got = enc.model.state_dict()    # every tensor is the file's; pos_embed is resampled from 37² to 16²
    assert all(torch.equal(got[k], v) for k, v in load_file(str(path)).items() if k != "pos_embed")
    assert enc.grid == (16, 16) and enc.dim == 768 and enc.model.num_prefix_tokens == 5   # CLS + 4 registers
    assert enc.summary()["kind"] == "dinov2-b14-reg"
    assert enc.tokens(torch.rand(1, 3, 32, 32) * 2 - 1).shape == (1, 256, 768)


def test_dinov2_l14_outputs_equal_the_file_model(tmp_path, monkeypatch):
    """ViT-L/14 at its real width, depth cut to 2 so the test stays fast; .pth container."""
    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=2))
    torch.manual_seed(0)
    src = timm.create_model(DinoV2L14.timm_name, pretrained=False).eval()
    torch.save(src.state_dict(), tmp_path / "dinov2_vitl14.pth")
    enc = DinoV2L14.fit(toy_data(), {}, CPU, weights=str(tmp_path / "dinov2_vitl14.pth"), img_size=518)
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    ref_in = F.interpolate(((x.expand(-1, 3, -1, -1) + 1) / 2 - mean) / std, size=518, mode="bicubic")
    with torch.no_grad():
        ref = src.forward_features(ref_in)[:, 1:]                              # no registers: CLS only
    tokens = enc.tokens(x)
    assert tokens.shape == (1, 37 * 37, 1024) and rel_err(tokens, ref) < 1e-5
    enc.save(tmp_path / "art")
    assert torch.equal(ENCODERS.get("dinov2-l14").load(tmp_path / "art").tokens(x), tokens)


def test_dinov2_entries_fail_in_one_line_without_weights(tmp_path, hub_cache):
    msg = fails_in_one_line(DinoV2B14Reg.fit, toy_data(), {}, CPU, weights=str(tmp_path / "none.safetensors"))
    assert str(tmp_path / "none.safetensors") in msg and "timm/vit_base_patch14_reg4_dinov2.lvd142m" in msg
    msg = fails_in_one_line(DinoV2L14.fit, toy_data(), {}, CPU)
    assert str(hub_cache) in msg and "huggingface-cli download timm/vit_large_patch14_dinov2.lvd142m" in msg
