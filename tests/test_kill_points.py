"""Kill the job at different moments, rerun, and get exactly the results of an uninterrupted run:
during prepare, mid-training, during evaluation, while writing a checkpoint, and during the report."""
import pytest
import torch

from benchmarks import run as cli
from benchmarks import train
from benchmarks.grid import expand
from core.rundir import RunDir

pytestmark = pytest.mark.slow


class Killed(BaseException):
    """Like SIGKILL for the test: not an Exception, so nothing inside the job catches it."""


def _once(monkeypatch, obj, name, when=lambda *a, **k: True):
    """Make obj.name raise Killed the first time `when(...)` holds, then behave normally."""
    real = getattr(obj, name)
    state = {"fired": False}

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
