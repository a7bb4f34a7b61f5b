"""The catalogue of bad inputs (docs/bad_inputs.md): each gives a one-line error that names the problem
and the fix, exits with status 2, and leaves everything already on disk untouched."""
import hashlib
from pathlib import Path

import pytest

from benchmarks import run as cli


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def results(tmp_path):
    """A results folder holding an earlier run's files, which no bad command may touch."""
    run = tmp_path / "results" / "smoke" / "sit-old-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "eval.jsonl").write_text('{"step": 0, "fd": 1.0}\n')
    (run / "checkpoints" / "step_0000010.pt").write_bytes(b"weights")
    return tmp_path / "results"


CASES = [
    ("unknown grid", ["grid=sfd_vs_rdi"], "unknown grid 'sfd_vs_rdi'; valid: .*sfd_vs_redi"),
    ("unknown backbone", ["grid=smoke", "backbone.name=dit-huge"], "unknown backbone 'dit-huge'; valid: .*dit-tiny"),
    ("unknown top-level key", ["grid=smoke", "trian.steps=5"], "'trian'.*valid keys: .*train"),
    ("unknown nested key", ["grid=smoke", "train.stepz=5"], "stepz.*steps"),
    ("wrong type", ["grid=smoke", "train.steps=many"], "train.steps"),
    ("zero steps", ["grid=smoke", "train.steps=0"], "train.steps must be ≥ 1"),
    ("negative steps", ["grid=smoke", "train.steps=-5"], "train.steps must be ≥ 1"),
    ("zero batch", ["grid=smoke", "train.batch_size=0"], "train.batch_size must be ≥ 1"),
    ("negative lr", ["grid=smoke", "train.lr=-0.1"], "train.lr must be > 0"),
    ("EMA decay 1", ["grid=smoke", "train.ema_decay=1.0"], r"ema_decay must be in \[0, 1\)"),
    ("bad precision", ["grid=smoke", "train.precision=fp8"], "precision must be one of auto, fp32, bf16, bf16-residual"),
    ("bad sdpa kernel", ["grid=smoke", "train.sdpa=flash3"], "train.sdpa must be one of auto, flash, cudnn"),
    ("bad compile mode", ["grid=smoke", "train.compile=fast"], "train.compile must be one of auto, regions, blocks, full, off"),
    ("CUDA graph on the CPU", ["grid=smoke", "train.cuda_graph=true", "train.device=cpu"],
     "train.cuda_graph=true needs a CUDA device"),
    ("CUDA needed, none here", ["grid=smoke", "train.cuda_graph=true"], "needs CUDA.*this machine has none"),
    ("Δt ≥ 1", ["grid=sfd_delta_t", "profile=smoke", "method.schedule.delta_t.texture=1.0"],
     r"delta_t\['texture'\] must be in \[0, 1\)"),
    ("negative Δt", ["grid=sfd_delta_t", "profile=smoke", "method.schedule.delta_t.texture=-0.1"],
     r"must be in \[0, 1\)"),
    ("Δt on a missing group", ["grid=sfd_delta_t", "profile=smoke", "method.schedule.delta_t.colour=0.1"],
     "colour.*texture"),
    ("unknown solver", ["grid=smoke", "eval.sampler.solver=rk45"], "unknown ode solver 'rk45'; valid: euler, heun, dopri5"),
    ("unknown guidance", ["grid=smoke", "eval.guidance.name=cgf", "eval.guidance.scale=2"], "unknown guidance 'cgf'"),
    ("REPA past the last block", ["grid=sfd_vs_redi", "profile=smoke", "method.loss.repa.depth=9"],
     "block.*9.*has 4 blocks"),
    ("unknown time distribution", ["grid=smoke", "method.schedule.time_dist=gaussian"], "time_dist.*uniform"),
    ("misspelled component key", ["grid=smoke", "method.loss.cosine=1.0"], "unknown key 'cosine'; valid keys: .*cosine_weight"),
    ("unknown dataset", ["grid=smoke", "data.name=cifar100"], "unknown dataset 'cifar100'; valid: "),
    ("missing dataset", ["grid=smoke", "data.root=/nonexistent/fmnist"], "not found in .*nonexistent.*data.root="),
    ("unknown launcher", ["grid=smoke", "launcher=k8s"], "unknown launcher 'k8s'; valid: inline, local, slurm"),
    ("unknown slurm profile", ["grid=smoke", "launcher=slurm", "slurm=mycluster"],
     "unknown slurm profile 'mycluster'; valid: .*local-ci"),
    ("unknown artifact kind", ["grid=smoke", "prepare.dino.steps=3"], "prepare.dino: unknown artifact kind; valid: "),
    ("misspelled fit() key", ["grid=smoke", "prepare.texture-vae.stepz=3"], "prepare.texture-vae: unknown key 'stepz'"),
    ("missing weights file", ["grid=smoke", "method.latent.aux_tokens=true", "prepare.semantic-encoder.use=dinov2",
                              "prepare.semantic-encoder.weights=/nope/dinov2_vitb14_reg.pth"],
     "weights file /nope/dinov2_vitb14_reg.pth does not exist.*docs/paper_scale.md"),
    ("unreadable slot class", ["grid=smoke", "prepare.texture-vae.use=sd-vae-xl"], "prepare.texture-vae.use: unknown"),
    ("not key=value", ["grid=smoke", "train.steps"], "not key=value"),
    ("unknown flag", ["grid=smoke", "--dryrun"], "unknown flag '--dryrun'"),
    ("too few eval samples", ["grid=smoke", "eval.num_samples=3"], "num_samples must be ≥ 10"),
    ("limit 0", ["grid=smoke", "data.limit_train=0"], "limit_train must be ≥ 1"),
]


@pytest.mark.parametrize("name,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, argv, pattern, results, capsys, monkeypatch):
    import re

    monkeypatch.delenv("SEMPRIOR_CONFIG_PATH", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)    # the catalogue is about a CPU machine
    before = _snapshot(results)
    code = cli.main(argv + [f"results={results}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, (name, err)
    assert err.startswith("error: ") and "\n" not in err, err
    assert re.search(pattern, err), (pattern, err)
    assert _snapshot(results) == before


def test_catalogue_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md").read_text()
    missing = [name for name, _, _ in CASES if f"| {name} |" not in doc]
    assert not missing and len(CASES) >= 20
