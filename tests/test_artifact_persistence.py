"""Every registered artifact class saves and loads through encoders/base.py's `Artifact`: save -> load gives the
same summary and the same outputs on a small input, and saving the loaded artifact writes the same bytes.
Each is built tiny here (a few training steps, random-weight files for the pretrained entries)."""
import functools

import pytest
import timm
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

import encoders  # noqa: F401  (registers every artifact class)
from core.registry import ENCODERS
from core.seed import seeded_init
from core.types import ImageData
from encoders.base import Artifact
from encoders.texture_vae import autoencoder_config
from ldm_ref import ref_model, write_ldm_ckpt, write_vavae_pt

CPU = torch.device("cpu")
VIT_S = "vit_small_patch14_reg4_dinov2.lvd142m"
TINY_VAE = dict(latent_channels=2, block_out_channels=(8, 8, 8), norm_num_groups=4, steps=2, batch_size=4,
                eval_images=4)


def toy_data(n: int = 16) -> ImageData:
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    return ImageData("toy", x, torch.arange(n) % 10, x.clone(), torch.arange(n) % 10, 10)


def one_block_vit(name: str, path) -> str:
    """A random-weight file for timm `name` cut to one block (what `timm_depth_1` builds back)."""
    with seeded_init(0):
        model = timm.create_model(name, pretrained=False, depth=1)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The toy data, the dependencies (tiny semantic encoder and FD net) and the pretrained entries' files."""
    root = tmp_path_factory.mktemp("sources")
    data = toy_data()
    fd = ENCODERS.get("fd-net").fit(data, {}, CPU, width=4, feature_dim=8, steps=2, batch_size=8)
    sem = ENCODERS.get("semantic-encoder").fit(data, {}, CPU, dim=16, depth=1, steps=2, batch_size=8,
                                               probe_images=16)
    with seeded_init(0):
        AutoencoderKL(**autoencoder_config(3, 32, 4, (8, 8, 8, 8), 1, 4, False)).save_pretrained(root / "sd")
    write_ldm_ckpt(root / "ldm.ckpt", ref_model(0))
    write_vavae_pt(root / "vavae.pt", ref_model(1))
    vits = {name: one_block_vit(name, root / f"{name}.safetensors")
            for name in (VIT_S, ENCODERS.get("dinov2-b14-reg").timm_name, ENCODERS.get("dinov2-l14").timm_name)}
    return dict(data=data, deps={"fd-net": fd, "semantic-encoder": sem}, root=root, vits=vits)


@pytest.fixture
def timm_depth_1(monkeypatch):
    monkeypatch.setattr(timm, "create_model", functools.partial(timm.create_model, depth=1))


def fit(kind: str, env: dict, **cfg):
    cls = ENCODERS.get(kind)
    return cls.fit(env["data"], {d: env["deps"][d] for d in cls.requires}, CPU, **cfg)


X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1       # (2, 3, 32, 32) in [-1, 1]
images = lambda a: a.encode_mean(X)                                                       # (2, c, h, w)
tokens = lambda a: a.tokens(X)                                                            # (2, T, D)

# kind -> (builds the artifact from env, the outputs compared after loading)
BUILDERS = {
    "fd-net": (lambda e: e["deps"]["fd-net"], lambda a: a.features(((X + 1) * 127.5).to(torch.uint8))),
    "texture-vae": (lambda e: fit("texture-vae", e, **TINY_VAE), images),
    "vavae": (lambda e: fit("vavae", e, **TINY_VAE), images),
    "semantic-encoder": (lambda e: e["deps"]["semantic-encoder"], tokens),
    "supervised-encoder": (lambda e: fit("supervised-encoder", e, dim=8, width=4, steps=2, batch_size=8,
                                         probe_images=16, cls_token=True), tokens),
    "fdnet-oracle": (lambda e: fit("fdnet-oracle", e, probe_images=16), tokens),
    "semvae": (lambda e: fit("semvae", e, width=8, depth=1, heads=2, steps=2, batch_size=4, warmup=1,
                             fit_images=8, eval_images=4), lambda a: a.encode_mean(X.new_ones(2, 64, 16))),
    "pca": (lambda e: fit("pca", e, max_images=8), lambda a: a.project(X.new_ones(2, 64, 16), 3)),
    "sd-vae-ft-ema": (lambda e: fit("sd-vae-ft-ema", e, source=str(e["root"] / "sd"), eval_images=4), images),
    "sd-vae-ft-mse": (lambda e: fit("sd-vae-ft-mse", e, source=str(e["root"] / "sd"), eval_images=0), images),
    "ldm-f16d32": (lambda e: fit("ldm-f16d32", e, weights=str(e["root"] / "ldm.ckpt"), eval_images=4), images),
    "vavae-f16d32": (lambda e: fit("vavae-f16d32", e, weights=str(e["root"] / "vavae.pt"), eval_images=0), images),
    "dinov2": (lambda e: fit("dinov2", e, name=VIT_S, weights=e["vits"][VIT_S], img_size=28, cls_token=True),
               tokens),
    "dinov2-b14-reg": (lambda e: fit("dinov2-b14-reg", e, weights=e["vits"][ENCODERS.get("dinov2-b14-reg").timm_name],
                                     img_size=28), tokens),
    "dinov2-l14": (lambda e: fit("dinov2-l14", e, weights=e["vits"][ENCODERS.get("dinov2-l14").timm_name],
                                 img_size=28), tokens),
}


def test_every_registered_artifact_class_uses_the_base_and_is_covered_here():
    ours = [n for n in ENCODERS.names() if ENCODERS.get(n).__module__.startswith("encoders.")]
    assert sorted(BUILDERS) == ours
    assert all(issubclass(ENCODERS.get(n), Artifact) for n in ours)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_save_load_round_trip(kind, env, tmp_path, timm_depth_1):
    cls = ENCODERS.get(kind)
    build, outputs = BUILDERS[kind]
    art = build(env)
    art.save(tmp_path / "a")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["config.json", "summary.json"] + (["weights.safetensors"] if cls.stores_weights else [])
    back = cls.load(tmp_path / "a", CPU)
    assert type(back) is cls
    assert back.summary() == art.summary()
    assert torch.equal(outputs(back), outputs(art))
    back.save(tmp_path / "b")
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
