"""Sharded extraction for streamed image folders (benchmarks/extract.py): two simulated ranks write the
same shards as one, which equal the in-memory encodings of the same images with the same seeds; a killed
or torn shard is redone and nothing else; the sharded feed gives the in-memory feed's batches; the
statistics follow prepare's recipe; and the artifact plan follows `prepare.<slot>.use`."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from benchmarks.data import extract
from benchmarks import extract as extract_cmd
from benchmarks.build.components import LatentFeed, ShardedLatentFeed, build_run
from benchmarks.data.datasets import load_image_folder
from benchmarks.config.grid import resolve
from benchmarks.data.prepare import (ENCODER, artifact_order, artifact_plan, build_encodings, build_latent, build_latent_cache, load_artifacts, load_latent_cache, prepare_run, stream_cache_dirs)
from benchmarks.data.shards import ShardWriter, open_sharded
from core.cache import MARKER
from core.config import ConfigError
from core.registry import ENCODERS
from core.seed import generator
from core.types import to_unit

CPU = torch.device("cpu")
SHARD, BATCH = 5, 3              # 22 training images -> shards of 5, 5, 5, 5, 2; batches of 3 + 2 inside each
OPTS = dict(batch_size=BATCH, workers=0, shard_images=SHARD)


def write_folder(root, classes=("ant", "bee", "cat"), per_class=8):
    """3 × 8 random RGB images, not square (the ADM crop has work to do); 10% (2) become the test split."""
    rng = np.random.RandomState(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 256, (36, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def config(root, cache, method="sfd", grid_overrides=()):
    return resolve("smoke", {"method": method, "seed": 0}, list(grid_overrides), [
        f"cache_dir={cache}", "data.name=image-folder", f"data.root={root}", "data.stream=true",
        "data.limit_train=null", "data.limit_test=null",
        "prepare.fd-net.batch_size=8"])    # the FD net's batches must fit in 11 images (half the split)


def fresh_cache(ref_cache, dest):
    """A cache holding the reference's sample and artifacts but no encodings or latents."""
    for d in ref_cache.iterdir():
        if d.is_dir() and not d.name.startswith((".", "enc-", "latents-")):
            shutil.copytree(d, dest / d.name)
    return dest


def shard_tensors(folder):
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*-0*.safetensors"))}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract")
    write_folder(base / "folder")
    cfg = config(base / "folder", base / "cache")
    latent_dir = extract.extract_run(cfg, 0, 1, CPU, **OPTS)
    dirs = extract.stream_artifacts(cfg, CPU)
    enc_dirs, _ = stream_cache_dirs(cfg, dirs)
    return {"base": base, "cfg": cfg, "latent_dir": latent_dir, "dirs": dirs, "enc": enc_dirs}


def test_two_simulated_ranks_write_the_shards_of_one(ref, tmp_path):
    cfg = {**ref["cfg"], "cache_dir": str(fresh_cache(ref["base"] / "cache", tmp_path))}
    out = extract.extract_run(cfg, 0, 2, CPU, **OPTS)
    assert out.name == ref["latent_dir"].name and not (out / MARKER).exists() and not (out / "index.json").exists()
    assert sorted(p.name for p in out.glob("train-*")) == ["train-00000.safetensors", "train-00001.safetensors"]
    extract.extract_run(cfg, 1, 2, CPU, **{**OPTS, "workers": 1})  # the last rank merges; a reader process
    for folder in [*ref["enc"].values(), ref["latent_dir"]]:
        mine = tmp_path / folder.name
        assert (mine / MARKER).exists()
        a, b = shard_tensors(mine), shard_tensors(folder)           # plain safetensors files
        assert list(a) == list(b) and len(a) == 5
        for name in a:
            assert a[name].keys() == b[name].keys()
            assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name
        for f in ("index.json", "key.json", "plan.json"):
            assert (mine / f).read_text() == (folder / f).read_text()
    stats = load_file(str(tmp_path / ref["latent_dir"].name / "stats.safetensors"))
    assert all(torch.equal(v, load_file(str(ref["latent_dir"] / "stats.safetensors"))[k]) for k, v in stats.items())


def test_shards_equal_the_in_memory_encodings_of_the_same_images(ref, tmp_path):
    cfg, dirs = ref["cfg"], ref["dirs"]
    data = load_image_folder(cfg["data"]["root"], 32)              # the small-profile reader: same 22 images
    tex = {k: torch.from_numpy(v.numpy()) for k, v in open_sharded(ref["enc"]["texture-vae"]).items()}
    tok = {k: torch.from_numpy(v.numpy()) for k, v in open_sharded(ref["enc"][ENCODER]).items()}
    lat = {k: torch.from_numpy(v.numpy()) for k, v in open_sharded(ref["latent_dir"]).items()}
    assert torch.equal(lat["y"], data.train_y)
    # tokens: prepare's in-memory encodings (whole split in one batch) with the same encoder
    mem_cfg = {**cfg, "data": {**cfg["data"], "stream": False}, "cache_dir": str(tmp_path)}
    arts = load_artifacts(dirs, CPU)
    mem = load_file(str(build_encodings(mem_cfg, data, ENCODER, dirs[ENCODER], CPU) / "tokens.safetensors"))
    for k in ("tokens", "tokens_flip"):
        assert tok[k].dtype == torch.float16 and tok[k].shape == (22, 64, arts[ENCODER].dim)
        torch.testing.assert_close(tok[k], mem[k], rtol=1e-3, atol=1e-3)
    # texture: the posterior sample of image i (or its flip) with the generator seeded image_seed(split, i)
    x = to_unit(data.train_x)
    for split, sfx in enumerate(("", "_flip")):
        imgs = x.flip(-1) if split else x
        want = torch.cat([arts["texture-vae"].encode(imgs[i:i + 1], generator=generator(extract.image_seed(split, i)))
                          for i in range(22)])
        # One image at a time here, batches of 3 in the extractor: other convolution kernels (per shape and
        # per CPU model), so float32 rounding through the encoder on latents up to ~10: 2.4e-6 measured on
        # AVX2 and on scalar/SSE kernels; a wrong seed moves a sample by O(1).
        torch.testing.assert_close(tex[f"texture{sfx}"], want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(tex[f"texture{sfx}"], arts["texture-vae"].encode_mean(imgs), atol=1e-3)   # a sample
    # latents: texture channels copied, SemVAE channels from the same shard's tokens and compose seed
    latent = build_latent(cfg, arts)
    for s, (a, b) in enumerate(extract.shard_bounds(22, SHARD)):
        for split, sfx in enumerate(("", "_flip")):
            x1 = latent.compose(tex[f"texture{sfx}"][a:b], tok[f"tokens{sfx}"][a:b].float(),
                                generator(extract.compose_seed(split, a)))["x1"]
            assert torch.equal(lat[f"x1{sfx}"][a:b], x1), (s, sfx)
            assert torch.equal(lat[f"x1{sfx}"][a:b, :4], tex[f"texture{sfx}"][a:b])


def test_killed_and_torn_shards_are_redone_and_the_rest_skipped(ref, tmp_path, monkeypatch):
    class Killed(BaseException):
        pass

    cfg = {**ref["cfg"], "cache_dir": str(fresh_cache(ref["base"] / "cache", tmp_path))}
    extract.extract_run(cfg, 0, 2, CPU, **OPTS)                    # shards 0, 1
    with pytest.raises(RuntimeError, match="another file list or shard size"):
        extract.extract_run(cfg, 1, 2, CPU, **{**OPTS, "shard_images": 7})
    real_commit, commits = ShardWriter.commit, []

    def killed_on_second(self):
        commits.append(self.path.name)
        if len(commits) == 2:
            raise Killed(self.path.name)                           # dies with the shard still a temp file
        return real_commit(self)

    monkeypatch.setattr(ShardWriter, "commit", killed_on_second)
    with pytest.raises(Killed):
        extract.extract_run(cfg, 1, 2, CPU, **OPTS)                # shards 2, 3, 4: killed in shard 2's tokens
    monkeypatch.undo()
    tok_dir, tex_dir = tmp_path / ref["enc"][ENCODER].name, tmp_path / ref["enc"]["texture-vae"].name
    assert list(tok_dir.glob("tokens-00002.safetensors.tmp*")) and not (tok_dir / "tokens-00002.safetensors").exists()
    torn = tex_dir / "texture-00000.safetensors"                   # a torn copy of a finished shard of rank 0
    torn.write_bytes(torn.read_bytes()[:-100])

    written = []
    real_init = ShardWriter.__init__

    def record(self, path, *a, **k):
        written.append(path.name)
        real_init(self, path, *a, **k)

    monkeypatch.setattr(ShardWriter, "__init__", record)
    out = extract.extract_run(cfg, 1, 2, CPU, **OPTS)
    assert written == ["tokens-00002.safetensors", "texture-00003.safetensors", "tokens-00003.safetensors",
                       "texture-00004.safetensors", "tokens-00004.safetensors", "train-00002.safetensors",
                       "train-00003.safetensors", "train-00004.safetensors"]
    assert not (out / MARKER).exists() and not (tex_dir / MARKER).exists()     # shard 0 is torn: no merge
    written.clear()
    extract.extract_run(cfg, 0, 2, CPU, **OPTS)
    assert written == ["texture-00000.safetensors"] and (out / MARKER).exists()
    assert not list(tmp_path.rglob("*.tmp*"))
    for folder in [*ref["enc"].values(), ref["latent_dir"]]:
        a, b = shard_tensors(tmp_path / folder.name), shard_tensors(folder)
        assert all(torch.equal(a[n][k], b[n][k]) for n in b for k in b[n])


def test_sharded_feed_gives_the_in_memory_feeds_batches(ref):
    cfg = ref["cfg"]
    latent = build_latent(cfg, load_artifacts(ref["dirs"], CPU))
    sharded, mean, std = load_latent_cache(ref["latent_dir"])
    latent.set_stats(mean, std)
    in_memory = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v.numpy()) for k, v in sharded.items()}
    assert set(in_memory) == {"x1", "x1_flip", "y", "tokens", "tokens_flip"}
    kw = dict(batch_size=16, seed=3, flips=True, device=CPU)
    feeds = [LatentFeed(in_memory, latent, **kw), LatentFeed(sharded, latent, **kw),
             ShardedLatentFeed(sharded, latent, **kw, prefetch=True)]
    assert [type(f) for f in feeds] == [LatentFeed, ShardedLatentFeed, ShardedLatentFeed]
    for step in (0, 1, 2, 7, 3):                                   # out of order: prefetch must not matter
        want = feeds[0].batch(step)
        assert want.x1.shape == (16, 6, 8, 8) and want.aux["tokens"].dtype == torch.float32
        for feed in feeds[1:]:
            got = feed.batch(step)
            assert torch.equal(got.x1, want.x1) and torch.equal(got.y, want.y)
            assert torch.equal(got.aux["tokens"], want.aux["tokens"])
            part = feed.batch(step, slice(4, 12))                  # one rank's rows of the same batch
            assert torch.equal(part.x1, want.x1[4:12]) and torch.equal(part.aux["tokens"], want.aux["tokens"][4:12])
    idx = np.array([21, 0, 7, 7, 12, 5, 4])                        # across shards, repeated, unsorted
    assert np.array_equal(sharded["x1"].take(idx), in_memory["x1"].numpy()[idx])


def test_statistics_and_info_follow_the_in_memory_recipe(ref, tmp_path):
    cfg, dirs = ref["cfg"], ref["dirs"]
    latent = build_latent(cfg, load_artifacts(dirs, CPU))
    x1 = torch.from_numpy(open_sharded(ref["latent_dir"])["x1"].numpy())
    mean, std = latent.stats_from(x1[torch.randperm(22, generator=generator(0))[:10_000]])
    stats = load_file(str(ref["latent_dir"] / "stats.safetensors"))
    assert torch.equal(stats["mean"], mean.float()) and torch.equal(stats["std"], std.float())
    # the in-memory cache of the same images and artifacts: same info fields, and a different folder
    mem_cfg = {**cfg, "data": {**cfg["data"], "stream": False}, "cache_dir": str(tmp_path)}
    mem_dir = build_latent_cache(mem_cfg, load_image_folder(cfg["data"]["root"], 32), dirs, CPU)
    info, mem_info = (json.loads((d / "info.json").read_text()) for d in (ref["latent_dir"], mem_dir))
    assert mem_dir.name != ref["latent_dir"].name and info.keys() == mem_info.keys()
    assert {k: info[k] for k in ("groups", "sizes", "shape")} == {k: mem_info[k] for k in ("groups", "sizes", "shape")}
    assert info["aux"] == {"tokens": ref["enc"][ENCODER].name}


def test_prepare_and_the_training_job_read_the_sharded_cache(ref, tmp_path):
    prepared = prepare_run(ref["cfg"], CPU)
    assert prepared.latent_dir == ref["latent_dir"] and prepared.data.train_x.shape == (22, 3, 32, 32)
    parts = build_run(ref["cfg"], prepared, CPU)
    assert isinstance(parts.feed, ShardedLatentFeed) and parts.latent_shape == (6, 8, 8)
    out = parts.method.losses(parts.model, parts.feed.batch(0))
    assert torch.isfinite(out.total)
    missing = {**ref["cfg"], "cache_dir": str(fresh_cache(ref["base"] / "cache", tmp_path))}
    with pytest.raises(FileNotFoundError, match="benchmarks.extract"):
        prepare_run(missing, CPU)


def test_artifacts_asking_for_more_images_than_the_sample_are_flagged(ref, caplog):
    extract.stream_artifacts(ref["cfg"], CPU)                      # smoke: semvae.fit_images=500 > 22 held
    assert "prepare.semvae.fit_images=500, but a streamed dataset keeps 22" in caplog.text


def test_cli_grid_and_config(ref, tmp_path, capsys):
    root, cache = ref["cfg"]["data"]["root"], fresh_cache(ref["base"] / "cache", tmp_path)
    args = ["data.name=image-folder", f"data.root={root}", "data.stream=true", "data.limit_train=null",
            "data.limit_test=null", f"cache_dir={cache}", "workers=0", "batch_size=3", "shard_images=5", "device=cpu"]
    assert extract_cmd.main(["grid=smoke", "rank=0", "world=1", *args]) == 0       # SiT: texture latents only
    assert "complete" in capsys.readouterr().out
    (out,) = cache.glob("latents-*")
    assert json.loads((out / "info.json").read_text())["aux"] == {} and not list(cache.glob("enc-semantic-*"))
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(json.dumps(ref["cfg"]))                                # a run folder's config.yaml
    assert extract_cmd.main([f"config={cfg_file}", "workers=0"]) == 0              # already complete: a no-op
    assert extract_cmd.main(["grid=smoke", f"cache_dir={cache}"]) == 2            # not streamed
    assert extract_cmd.main(["grid=smoke", "rank=1", *args]) == 2                  # rank without world
    assert "data.stream is false" in capsys.readouterr().err


@pytest.mark.parametrize("env,want", [
    ({}, (0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, (3, 8, 3)),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "2"}, (2, 4, 2)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "16"}, (5, 16, 0)),
    ({"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "13",
      "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}, (3, 8, 1)),     # array × tasks
])
def test_rank_and_world_from_torchrun_or_slurm(env, want, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
              "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert extract.rank_world() == want
    assert extract.rank_world(1, 2) == (1, 2, 0)                   # the command line wins
    with pytest.raises(ConfigError):
        extract.rank_world(2, 2)


def test_artifact_plan_follows_the_class_named_by_use(tmp_path):
    # A pretrained VA-VAE (`requires = ()`) fills the vavae slot: no semantic encoder to train or load.
    assert artifact_order(("vavae",)) == ["semantic-encoder", "vavae"]
    assert artifact_order(("vavae",), {"vavae": {"use": "vavae-f16d32"}}) == ["vavae"]
    assert artifact_order(("vavae",), {"vavae": None}) == ["semantic-encoder", "vavae"]
    write_folder(tmp_path, per_class=1)                # the data key fingerprints a real folder
    cfg = {"method": {"latent": {"name": "vae", "tokenizer": "vavae"}},
           "prepare": {"vavae": {"use": "vavae-f16d32", "weights": "/w.pt"}},
           "data": {"name": "image-folder", "root": str(tmp_path), "image_size": 256, "limit_train": None,
                    "limit_test": None, "flips": True},
           "eval": {"metric": "fd-net"}}
    plan = artifact_plan(cfg)
    assert [n.kind for n in plan] == ["vavae", "fd-net"] and plan[0].key_obj["deps"] == {}
    assert plan[0].cls is ENCODERS.get("vavae-f16d32")
    cfg["eval"]["metric"] = "adm"                      # Inception scores it: no FD network to train
    assert [n.kind for n in artifact_plan(cfg)] == ["vavae"]
