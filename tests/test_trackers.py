"""Experiment trackers (benchmarks/execution/trackers.py): the TensorBoard event files of a tiny run, read back with
TensorBoard's own reader, hold the same scalars as metrics.jsonl / eval.jsonl, the sample grids and the
HParams; a resumed run leaves exactly one value per tag and step; W&B in offline mode; config checks."""
import time

import numpy as np
import pytest

from benchmarks.config import validate
from benchmarks.config.grid import expand
from benchmarks.execution import trackers
from core.config import ConfigError
from core.rundir import RunDir

pytestmark = pytest.mark.slow

EVAL_AT = "eval.at=[0,5]"     # an eval between the checkpoint (4) and the crash (6): the resume redoes it


def _cfg(cache, *extra):
    (spec,) = expand("smoke", [f"cache_dir={cache}", "train.steps=8", "train.log_every=1", EVAL_AT, *extra]).runs
    return spec


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / trackers.TB_DIR), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalar_rows(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, smoke_cache):
    from benchmarks.execution import train

    run = tmp_path_factory.mktemp("tb") / "run"
    train.run_job(_cfg(smoke_cache).cfg, str(run))
    return run


def _check_scalars_equal_logs(acc, run):
    rd = RunDir(run)
    metrics, evals = rd.rows("metrics.jsonl"), rd.rows("eval.jsonl")
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/sec_per_step"):
        key = tag[len("train/"):]
        assert _scalar_rows(acc, tag) == [(r["step"], np.float32(r[key])) for r in metrics], tag
    for key in ("fd", "kid", "precision", "recall", "class_acc"):
        assert _scalar_rows(acc, f"eval/{key}") == [(r["step"], np.float32(r[key])) for r in evals], key
    terms = {k for r in metrics for k in r if k.startswith("loss/")}
    assert {f"train/{k}" for k in terms} <= tags
    return metrics, evals


def test_event_files_hold_the_logs_images_and_hparams(finished_run):
    acc = _events(finished_run)
    metrics, evals = _check_scalars_equal_logs(acc, finished_run)
    assert [r["step"] for r in metrics] == list(range(1, 9)) and [r["step"] for r in evals] == [0, 5, 8]
    images = acc.Images("samples")
    assert [i.step for i in images] == [0, 5, 8]
    png = (finished_run / "samples" / "step_0000008.png").read_bytes()
    assert images[-1].encoded_image_string[:8] == png[:8] == b"\x89PNG\r\n\x1a\n"
    # HParams plugin: the experiment names the metrics; the session holds the flattened config
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(content)
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in exp.metric_infos} == {f"eval/{m}" for m in ("fd", "kid", "precision", "recall",
                                                                           "class_acc")}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["method.name"].string_value == "sit"
    assert start.hparams["seed"].number_value == 0
    assert start.hparams["train.steps"].number_value == 8
    assert "prepare.fd-net.steps" not in start.hparams and "cache_dir" not in start.hparams


def test_a_resumed_run_has_one_value_per_step(tmp_path, smoke_cache, monkeypatch, finished_run):
    """Killed at step 6 after a checkpoint at 4 (rows 5, 6 and the eval at 5 were written, then cut by
    restore()); the resumed attempt writes them again: the reader shows each step once, equal to the logs
    and to the uninterrupted run."""
    from benchmarks.execution import train

    spec = _cfg(smoke_cache)
    run = tmp_path / "crashed"
    real_step = train.Trainer.train_step

    def crash_at_6(self):
        if self.step == 6:
            raise RuntimeError("killed")
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "train_step", crash_at_6)
    with pytest.raises(RuntimeError, match="killed"):
        train.run_job(spec.cfg, str(run))
    first = _events(run)
    assert [s for s, _ in _scalar_rows(first, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in _scalar_rows(first, "eval/fd")] == [0, 5]
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    train.run_job(spec.cfg, str(run))
    acc = _events(run)
    assert len(list((run / trackers.TB_DIR).glob("events.out.tfevents.*"))) == 2
    metrics, evals = _check_scalars_equal_logs(acc, run)
    assert [s for s, _ in _scalar_rows(acc, "train/loss")] == list(range(1, 9))
    assert [s for s, _ in _scalar_rows(acc, "eval/fd")] == [0, 5, 8]
    assert [i.step for i in acc.Images("samples")] == [0, 5, 8]
    ref = _events(finished_run)
    for tag in ("train/loss", "eval/fd", "eval/class_acc"):
        assert _scalar_rows(acc, tag) == _scalar_rows(ref, tag), tag


def test_tensorboard_off_writes_no_event_files(tmp_path, smoke_cache):
    from benchmarks.execution import train

    spec = _cfg(smoke_cache, "log.tensorboard=false", "train.steps=2", "eval.at=[0]")
    train.run_job(spec.cfg, str(tmp_path / "run"))
    assert RunDir(tmp_path / "run").is_done() and not (tmp_path / "run" / trackers.TB_DIR).exists()


def test_wandb_offline_logs_the_run(tmp_path, smoke_cache, monkeypatch):
    pytest.importorskip("wandb")
    from benchmarks.execution import train

    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = _cfg(smoke_cache, "log.wandb=true", "log.wandb_mode=offline", "train.steps=2", "eval.at=[0]")
    t0 = time.time()
    train.run_job(spec.cfg, str(tmp_path / "run"))
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log,) = folder.glob("*.wandb")
    assert log.stat().st_size > 0 and log.stat().st_mtime >= t0 - 1


def test_the_log_section_is_not_in_the_run_id(smoke_cache):
    assert _cfg(smoke_cache).run_id == _cfg(smoke_cache, "log.tensorboard=false", "log.wandb_mode=offline").run_id


def test_wandb_asked_for_but_not_installed_is_refused_at_load(smoke_cache, monkeypatch):
    monkeypatch.setattr(validate, "_wandb_installed", lambda: False)   # the log rules are checked at load
    with pytest.raises(ConfigError) as e:
        _cfg(smoke_cache, "log.wandb=true")
    assert str(e.value) == ("log.wandb=true needs the wandb package, which is not installed: `pip install wandb` "
                            "(or `pip install -e .[wandb]`), or set log.wandb=false")
    with pytest.raises(ConfigError, match=r"log.wandb_mode must be one of online, offline, disabled or null, got 'x'"):
        _cfg(smoke_cache, "log.wandb_mode=x")
