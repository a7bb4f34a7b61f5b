"""Kill the job at different moments, rerun, and get exactly the results of an uninterrupted run:
during prepare, mid-training, during evaluation, while writing a checkpoint, and during the report."""
import functools

import pytest
import torch

from benchmarks import run as cli
from benchmarks.execution import train
from benchmarks.config.grid import expand
from core.rundir import RunDir

pytestmark = pytest.mark.slow


class Killed(BaseException):
    """Like SIGKILL for the test: not an Exception, so nothing inside the job catches it."""


def _once(monkeypatch, obj, name, when=lambda *a, **k: True):
    """Make obj.name raise Killed the first time `when(...)` holds, then behave normally."""
    real = getattr(obj, name)
    state = {"fired": False}

    # wraps: the wrapper keeps the real signature (the build refuses a **kwargs constructor)
    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        if not state["fired"] and when(*args, **kwargs):
            state["fired"] = True
            raise Killed(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return state


def _final(results, cache):
    (spec,) = expand("smoke", [f"cache_dir={cache}"]).runs
    rd = RunDir(results / "smoke" / spec.run_id)
    ck = rd.load_latest()
    return ck, [r["fd"] for r in rd.rows("eval.jsonl")], [r["loss"] for r in rd.rows("metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smoke_cache):
    out = tmp_path_factory.mktemp("ref")
    assert cli.main(["grid=smoke", f"results={out}", f"cache_dir={smoke_cache}", "launcher=inline"]) == 0
    return _final(out, smoke_cache)


def _kill_prepare(monkeypatch):
    from encoders.fdnet import FDNet
    return _once(monkeypatch, FDNet, "fit")


def _kill_training(monkeypatch):
    return _once(monkeypatch, train.Trainer, "train_step", lambda self: self.step == 3)


def _kill_eval(monkeypatch):
    return _once(monkeypatch, train.Trainer, "evaluate", lambda self: self.step == 6)


def _kill_checkpoint(monkeypatch):
    real = RunDir.save_checkpoint
    state = {"fired": False}

    def torn_write(self, step, st, keep=2):
        path = real(self, step, st, keep)
        if not state["fired"] and step == 6:
            state["fired"] = True
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])   # killed mid-write
            raise Killed("checkpoint")
        return path

    monkeypatch.setattr(RunDir, "save_checkpoint", torn_write)
    return state


def _kill_report(monkeypatch):
    return _once(monkeypatch, cli, "write_report")


@pytest.mark.parametrize("kill", [_kill_prepare, _kill_training, _kill_eval, _kill_checkpoint, _kill_report],
                         ids=["prepare", "training", "evaluation", "checkpoint-write", "report"])
def test_kill_and_rerun_equals_uninterrupted(kill, reference, tmp_path, monkeypatch, smoke_cache):
    # a kill during prepare needs an empty cache; the artifacts are seeded, so they come out the same
    cache = tmp_path / "cache" if kill is _kill_prepare else smoke_cache
    args = ["grid=smoke", f"results={tmp_path}", f"cache_dir={cache}", "launcher=inline"]
    state = kill(monkeypatch)
    with pytest.raises(Killed):
        cli.main(args)
    assert state["fired"]
    monkeypatch.undo()
    assert cli.main(args) == 0
    assert (tmp_path / "smoke" / "report.md").exists()
    ck, fds, losses = _final(tmp_path, cache)
    ref_ck, ref_fds, ref_losses = reference
    assert ck["step"] == ref_ck["step"]
    if kill is _kill_prepare:
        return      # a fresh cache retrains the artifacts: same code path, compared only for completion
    for key in ("model", "ema"):
        for k, v in ref_ck[key].items():
            assert torch.equal(ck[key][k], v), (key, k)
    assert fds == ref_fds and losses == ref_losses


def test_preemption_signal_writes_a_checkpoint_and_resume_is_exact(tmp_path, reference, smoke_cache, monkeypatch):
    """submitit calls Resumable.checkpoint() on SLURM's USR2; it must save the state of that moment."""
    (spec,) = expand("smoke", [f"cache_dir={smoke_cache}"]).runs
    run_dir = tmp_path / "smoke" / spec.run_id
    real_step = train.Trainer.train_step
    monkeypatch.setattr(train.Trainer, "train_step", lambda self: _signal_at(self, 2, real_step))
    with pytest.raises(Killed):
        train.run_job(spec.cfg, str(run_dir))
    assert 2 in [s for s, _ in RunDir(run_dir).checkpoints()]      # written by the handler, not periodic (4)
    monkeypatch.undo()
    train.run_job(spec.cfg, str(run_dir))
    ck = RunDir(run_dir).load_latest()
    ref_ck = reference[0]
    for key in ("model", "ema"):
        for k, v in ref_ck[key].items():
            assert torch.equal(ck[key][k], v), (key, k)


def _signal_at(trainer, step, real_step):
    """Run the real step; when it has finished step `step`, deliver the preemption like submitit does."""
    from benchmarks.execution.launch import Resumable

    out = real_step(trainer)
    if trainer.step == step:
        Resumable(trainer.cfg, str(trainer.rd.path)).checkpoint()
        raise Killed("USR2")
    return out


def test_preemption_between_optimizer_and_ema_completes_the_step(tmp_path, reference, smoke_cache, monkeypatch):
    """The signal lands after optimizer.step() but before the EMA update: the handler finishes the step."""
    from benchmarks.execution.launch import Resumable

    (spec,) = expand("smoke", [f"cache_dir={smoke_cache}"]).runs
    run_dir = tmp_path / "smoke" / spec.run_id
    real_finish = train.Trainer.finish_step
    fired = []

    def signal_before_ema(self):
        if self.step == 2 and self.phase == "stepped" and not fired:
            fired.append(True)
            Resumable(self.cfg, str(self.rd.path)).checkpoint()      # finishes step 3 and saves it
            raise Killed("USR2")
        return real_finish(self)

    monkeypatch.setattr(train.Trainer, "finish_step", signal_before_ema)
    with pytest.raises(Killed):
        train.run_job(spec.cfg, str(run_dir))
    assert 3 in [s for s, _ in RunDir(run_dir).checkpoints()]
    monkeypatch.undo()
    train.run_job(spec.cfg, str(run_dir))
    ck, ref_ck = RunDir(run_dir).load_latest(), reference[0]
    for key in ("model", "ema"):
        for k, v in ref_ck[key].items():
            assert torch.equal(ck[key][k], v), (key, k)
