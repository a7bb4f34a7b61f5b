"""The imagenet256 profile: paper hyperparameters per method (docs/methods.md §8), grids runnable at it, and the
dry run's GPU-hour estimate from the measured speed table (no data or weights needed to plan)."""
import pytest

from benchmarks import run
from benchmarks.reporting.estimate import estimate, load_speed_table, sampler_nfe
from benchmarks.config.grid import expand
from core.config import ConfigError


@pytest.fixture(scope="module")
def grid():
    return expand("all_methods", profile="imagenet256", check_files=False)


def _cfg(grid, method):
    return next(r.cfg for r in grid.runs if r.cfg["method"]["name"] == method)


def test_paper_hyperparameters(grid):
    assert {r.cfg["backbone"]["name"] for r in grid.runs} == {"lightningdit-xl-1"}   # by_profile axes
    sfd, vavae, repa, sit = (_cfg(grid, m) for m in ("sfd", "vavae", "repa", "sit"))
    assert (sfd["train"]["lr"], sfd["train"]["betas"], sfd["train"]["batch_size"]) == (1e-4, [0.9, 0.999], 256)
    assert sfd["train"]["precision"] == "bf16" and sfd["train"]["ema_decay"] == 0.9999
    assert not sfd["train"]["ema_warmup"] and sfd["train"]["grad_clip"] is None
    assert (vavae["train"]["lr"], vavae["train"]["betas"], vavae["train"]["batch_size"]) == (2e-4, [0.9, 0.95], 1024)
    assert repa["train"]["grad_clip"] == 1.0
    assert sit["train"]["precision"] == "fp32"
    assert sfd["method"]["sampler"]["solver"] == "dopri5" and sfd["method"]["schedule"]["time_dist"] == "logit-normal"
    assert sfd["prepare"]["texture-vae"]["use"] == "ldm-f16d32"
    assert sfd["prepare"]["semantic-encoder"]["use"] == "dinov2-b14-reg"
    assert sfd["prepare"]["semvae"]["channels"] == 16


def test_tiny_profile_unchanged_by_by_profile():
    g = expand("sfd_vs_redi", check_files=False)
    assert {r.cfg["backbone"]["name"] for r in g.runs} == {"lightningdit-tiny"}


def test_running_needs_the_data(tmp_path):
    with pytest.raises(ConfigError, match="data.root"):
        expand("sfd_vs_redi", profile="imagenet256")


def test_estimate_from_speed_table(grid):
    table = load_speed_table()
    sfd = estimate(_cfg(grid, "sfd"), 8, table)
    row = table[(table.backbone == "lightningdit-xl-1") & (table.method == "sfd")].iloc[-1]
    assert sfd.img_per_s_per_gpu == pytest.approx(row.img_per_s)
    assert sfd.train_gpu_h == pytest.approx(400_000 * 256 / row.img_per_s / 3600)
    sit = estimate(_cfg(grid, "sit"), 8, table)            # fp32 paper precision: half the bf16 row
    assert "fp32" in sit.source and sit.train_gpu_h > sfd.train_gpu_h
    assert "no redi row" in estimate(_cfg(grid, "redi"), 8, table).source
    assert sampler_nfe({"name": "ode", "solver": "euler", "steps": 250}) == 250


def test_dry_run_prints_jobs_gpus_and_hours(capsys):
    assert run.main(["grid=sfd_vs_redi", "profile=imagenet256", "launcher=slurm", "slurm=example", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("gpus=8") == 6 and "GPU-hours in all" in out and "assumptions:" in out
    assert "results/reference/speed-h100" in out
