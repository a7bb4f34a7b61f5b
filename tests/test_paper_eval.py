"""`python -m benchmarks.evaluate checkpoint=...` end to end on small files the tests write in the official
formats: a reduced SFD checkpoint, an LDM-layout f16d32 tokenizer, latent statistics, a random-weight
Inception and an ADM reference batch made from a tiny ImageFolder read with the ADM crop."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.evaluation import scoring as evaluate
from benchmarks import evaluate as evaluate_cmd
from benchmarks.evaluation import importers
from benchmarks.evaluation.adm_npz import pack_npz
from benchmarks.data.datasets import load_image_folder
from test_adm_eval import weights, tree  # noqa: F401  (fixtures: random Inception, tiny ImageFolder)
from official_ref import random_official, small, suite_backbone, suite_projector, write_official
from ldm_ref import ref_model, write_ldm_ckpt

KIND = "sfd-xl-1"


@pytest.fixture
def files(tmp_path, tree, weights, monkeypatch):  # noqa: F811
    a = small(KIND)                                  # 4×4 latent tokens: 64×64 images through the f16 decoder
    monkeypatch.setattr(importers, "suite_backbone", lambda kind, device="cpu": suite_backbone(a).to(device))
    monkeypatch.setattr(importers, "suite_projector", lambda kind, hidden, device="cpu": suite_projector(a))
    ckpt = write_official(tmp_path / "sfd.pt", random_official(a, seed=0), "ema")
    write_ldm_ckpt(tmp_path / "ldm.ckpt", ref_model())
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, tmp_path / "latents_stats.pt")
    ref = load_image_folder(tree, 64).test_x.permute(0, 2, 3, 1).numpy()
    pack_npz(ref, None, tmp_path / "VIRTUAL_ref.npz", shuffle_seed=None)
    return dict(checkpoint=ckpt, tokenizer=tmp_path / "ldm.ckpt", stats=tmp_path / "latents_stats.pt",
                ref=tmp_path / "VIRTUAL_ref.npz", inception=weights, out=tmp_path / "fid")


def _args(files, **extra):
    kv = {"kind": KIND, "num_samples": 8, "num_classes": 4, "batch_size": 3, "fd": "eigh", "device": "cpu",
          "sampler.solver": "euler", "sampler.steps": 3,
          "method.loss.repa.projector_dim": 128, **{k: str(v) for k, v in files.items()}, **extra}
    return [f"{k}={v}" for k, v in kv.items()]


def test_checkpoint_to_fid_end_to_end(files, capsys):
    assert evaluate_cmd.main(_args(files)) == 0
    out = capsys.readouterr().out
    assert "fid=" in out and "sfid=" in out and "precision=" in out
    npz = np.load(files["out"] / "samples.npz")
    images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (8, 64, 64, 3)          # ADM layout, NHWC
    assert np.bincount(labels, minlength=4).tolist() == [2, 2, 2, 2]            # balanced
    assert labels.tolist() != sorted(labels.tolist())                           # shuffled, not class-ordered
    assert len(list((files["out"] / "chunks").glob("samples_rank*.npz"))) == 3  # one file per chunk
    metrics = __import__("json").loads((files["out"] / "metrics.json").read_text())
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and metrics["is"] >= 1 and metrics["kind"] == KIND


def test_rerun_reuses_chunks_and_gives_the_same_npz(files):
    assert evaluate_cmd.main(_args(files)) == 0
    first = np.load(files["out"] / "samples.npz")["arr_0"].copy()
    (files["out"] / "chunks" / "samples_rank1.npz").unlink()                    # a killed job lost one chunk
    stamp = (files["out"] / "chunks" / "samples_rank0.npz").stat().st_mtime_ns
    assert evaluate_cmd.main(_args(files)) == 0
    assert (files["out"] / "chunks" / "samples_rank0.npz").stat().st_mtime_ns == stamp   # not redone
    assert np.array_equal(np.load(files["out"] / "samples.npz")["arr_0"], first)       # same seeds, same images


@pytest.mark.parametrize("change, message", [
    ({"ref": "/nonexistent/VIRTUAL_imagenet256_labeled.npz"}, "ADM reference batch"),
    ({"stats": "/nonexistent/latents_stats.pt"}, "latent stats file"),
    ({"kind": "sfd-xxxl"}, "valid: dit-xl-2"),
    ({"guidance": "loud:2"}, "valid: method, none"),
])
def test_bad_inputs_are_one_line_errors(files, capsys, change, message):
    assert evaluate_cmd.main(_args(files, **change)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


@pytest.fixture
def eigh_fd(monkeypatch):
    """The training job scores with ADM's sqrtm Fréchet distance; on a 2048-dim covariance that takes ~20 s
    on some CPUs of this kind, four times per run. These tests are about the job's wiring, not the FD
    method: score with the eigh form of the same trace (tests/test_adm_eval.py checks the two agree)."""
    from benchmarks.evaluation import adm as adm_eval

    real = adm_eval.score
    monkeypatch.setattr(adm_eval, "score", lambda acts, ref, fd="scipy", device="cpu", **kw:
                        real(acts, ref, "eigh", device, **kw))


def test_training_job_scores_with_the_adm_protocol(tmp_path, smoke_cache, weights, eigh_fd):  # noqa: F811
    """eval.metric=adm: the training job's periodic evaluation reports Inception FID/sFID/IS/PR (here on
    the smoke profile with a random-weight Inception and a reference batch made from the test split)."""
    from benchmarks.execution import train
    from benchmarks.data.fashion_mnist import load_fashion_mnist
    from benchmarks.config.grid import expand
    from core.rundir import RunDir

    test_x = load_fashion_mnist(pad_to=32).test_x[:48]
    pack_npz(test_x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy(), None, tmp_path / "ref.npz", shuffle_seed=None)
    (spec,) = expand("smoke", [f"cache_dir={smoke_cache}", "eval.metric=adm", f"eval.adm_ref={tmp_path / 'ref.npz'}",
                               f"eval.inception={weights}", "eval.num_samples=20"]).runs
    train.run_job(spec.cfg, str(tmp_path / "run"))
    evals = RunDir(tmp_path / "run").rows("eval.jsonl")
    assert evals and all({"fid", "sfid", "is", "precision", "recall"} <= set(e) for e in evals)
    assert all(e["fd"] == e["fid"] > 0 and 0 <= e["precision"] <= 1 for e in evals)


def test_imagenet256_profile_in_miniature(tmp_path, tree, weights, eigh_fd):  # noqa: F811
    """The paper-scale path end to end on a tiny ImageFolder: the imagenet256 profile with its data streamed
    (sharded extraction), the LDM f16d32 tokenizer from a random-weight file in the official layout, the
    memory-mapped feed, training, and the ADM-protocol evaluation with a random-weight Inception. Only the
    sizes are shrunk (64 px, a tiny backbone, 2 steps, 12 samples)."""
    from benchmarks import run as cli
    from core.rundir import RunDir

    write_ldm_ckpt(tmp_path / "ldm.ckpt", ref_model())
    ref = load_image_folder(tree, 64).test_x.permute(0, 2, 3, 1).numpy()
    pack_npz(ref, None, tmp_path / "ref.npz", shuffle_seed=None)
    args = ["grid=smoke", "profile=imagenet256", "launcher=inline", f"results={tmp_path / 'results'}",
            f"cache_dir={tmp_path / 'cache'}", f"data.root={tree}", "data.image_size=64",
            f"prepare.texture-vae.weights={tmp_path / 'ldm.ckpt'}", "prepare.texture-vae.eval_images=0",
            "train.device=cpu", "train.steps=2", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=2",
            "eval.every=0", "eval.num_samples=12", "eval.batch_size=12", f"eval.adm_ref={tmp_path / 'ref.npz'}",
            f"eval.inception={weights}", "eval.sampler={name: ode, solver: euler, steps: 2}"]
    assert cli.main(args) == 0
    (run,) = [p for p in (tmp_path / "results" / "smoke").iterdir() if (p / "config.yaml").exists()]
    cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
    assert cfg["data"]["stream"] and cfg["eval"]["metric"] == "adm" and cfg["train"]["precision"] == "fp32"
    (row,) = RunDir(run).rows("eval.jsonl")
    assert row["step"] == 2 and row["fid"] > 0 and {"sfid", "is", "precision", "recall"} <= set(row)
    assert not list((tmp_path / "cache").glob("fd-net-*"))          # no FD network at this profile
    assert list((tmp_path / "cache").glob("enc-texture-vae-*"))      # the sharded texture encodings
