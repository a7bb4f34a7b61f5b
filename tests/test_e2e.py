"""End to end on real Fashion-MNIST with the seconds-long `smoke` profile: the CLI, the report,
rerun-is-a-no-op, exact resume after a crash, NaN isolation, the submitit LocalExecutor launcher."""
import json

import pytest
import torch

from benchmarks import run as cli
from benchmarks.config.grid import expand
from benchmarks.execution.launch import guarded_run
from core.rundir import RunDir

pytestmark = pytest.mark.slow


def _args(tmp_path, cache, *extra):
    return ["grid=smoke", f"results={tmp_path / 'results'}", f"cache_dir={cache}", *extra]


def _run_dirs(tmp_path):
    return sorted(p for p in (tmp_path / "results" / "smoke").iterdir() if (p / "config.yaml").exists())


def test_smoke_grid_inline_report_and_rerun(tmp_path, smoke_cache):
    assert cli.main(_args(tmp_path, smoke_cache)) == 0
    root = tmp_path / "results" / "smoke"
    for name in ("report.md", "curves.csv", "convergence.png", "runs.csv", "prepare.json"):
        assert (root / name).exists(), name
    (run,) = _run_dirs(tmp_path)
    rd = RunDir(run)
    assert rd.is_done() and (run / "samples").exists()
    evals = rd.rows("eval.jsonl")
    assert [e["step"] for e in evals] == [0, 6]
    assert all(e["fd"] > 0 and 0 <= e["class_acc"] <= 1 for e in evals)
    report = (root / "report.md").read_text()
    assert "FD-fdnet" in report and "not* Inception FID" in report
    before = (run / "metrics.jsonl").read_text()
    assert cli.main(_args(tmp_path, smoke_cache)) == 0          # rerun: nothing is redone
    assert (run / "metrics.jsonl").read_text() == before


def test_resume_after_crash_is_bit_identical(tmp_path, smoke_cache, monkeypatch):
    from benchmarks.execution import train

    (spec,) = expand("smoke", [f"cache_dir={smoke_cache}"]).runs
    ref = tmp_path / "uninterrupted"
    train.run_job(spec.cfg, str(ref))
    crashed = tmp_path / "crashed"
    real_step = train.Trainer.train_step

    def crash_after_4(self):
        if self.step == 5:
            raise RuntimeError("killed")
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "train_step", crash_after_4)
    with pytest.raises(RuntimeError, match="killed"):
        train.run_job(spec.cfg, str(crashed))
    assert [s for s, _ in RunDir(crashed).checkpoints()] == [4]
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    train.run_job(spec.cfg, str(crashed))
    a, b = RunDir(ref).load_latest(), RunDir(crashed).load_latest()
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    la = [r["loss"] for r in RunDir(ref).rows("metrics.jsonl")]
    lb = [r["loss"] for r in RunDir(crashed).rows("metrics.jsonl")]
    assert la == lb
    fa = [r["fd"] for r in RunDir(ref).rows("eval.jsonl")]
    fb = [r["fd"] for r in RunDir(crashed).rows("eval.jsonl")]
    assert fa == fb


def test_nan_run_is_isolated_and_reported(tmp_path, smoke_cache):
    # A NaN setting is refused up front now (tests/test_bad_inputs.py); a finite but absurd learning rate makes
    # Adam move every weight by ~1e30 in the first step, so the loss overflows within the first steps.
    code = cli.main(_args(tmp_path, smoke_cache, "train.lr=1e30"))
    assert code == 1
    (run,) = _run_dirs(tmp_path)
    fail = json.loads((run / "failed.json").read_text())
    assert fail["reason"] == "non-finite loss" and fail["step"] >= 1
    assert "failed" in (tmp_path / "results" / "smoke" / "report.md").read_text()


def test_exception_marks_failed_and_grid_goes_on(tmp_path, smoke_cache):
    (spec,) = expand("smoke", [f"cache_dir={smoke_cache}"]).runs
    # A REPA head at block 99 of a 4-block backbone raises inside the first training step.
    loss = {"name": "flow", "repa": {"depth": 99, "weight": 1.0}}
    bad = {**spec.cfg, "method": {**spec.cfg["method"], "loss": loss}}
    out = guarded_run(bad, str(tmp_path / "bad"))
    assert out["status"] == "failed" and (tmp_path / "bad" / "failed.json").exists()


def test_smoke_grid_through_submitit_local_executor(tmp_path, smoke_cache):
    assert cli.main(_args(tmp_path, smoke_cache, "launcher=local", "parallel=1")) == 0
    (run,) = _run_dirs(tmp_path)
    assert RunDir(run).is_done()
    assert any((tmp_path / "results" / "smoke" / ".submitit").iterdir())


@pytest.mark.parametrize("argv,needle", [
    (["grid=nope"], "valid: "),
    (["grid=smoke", "train.stepz=3"], "steps"),
    (["grid=smoke", "backbone.name=transformer-xxl"], "lightningdit-tiny"),
    (["grid=smoke", "launcher=k8s"], "inline, local, slurm"),
    (["grid=smoke", "train.steps=0"], "train.steps must be"),
])
def test_cli_errors_are_one_line(argv, needle, capsys):
    assert cli.main(argv + ["--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
