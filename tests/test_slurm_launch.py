"""The grid launcher on the real single-node SLURM (scripts/slurm/start.sh): the smoke grid as a job
array, results read back; a cancelled run is finished by re-launching the grid; a profile naming an
absent partition fails before anything is submitted."""
import subprocess
import time

import pytest

from benchmarks import run as cli
from benchmarks.config.grid import expand
from benchmarks.execution.launch import launch_slurm, run_dirs
from core.rundir import RunDir
from slurm_util import cluster_down_reason as _cluster_down_reason

pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(bool(_cluster_down_reason()), reason=_cluster_down_reason() or "cluster up")]


def test_smoke_grid_on_slurm(tmp_path, smoke_cache):
    args = ["grid=smoke", f"results={tmp_path}", f"cache_dir={smoke_cache}", "launcher=slurm", "slurm=local-ci"]
    # the job prepares under the same cache lock; prepare once here so the job only trains
    assert cli.main(args[:3] + ["launcher=inline"]) == 0
    for d in (tmp_path / "smoke").iterdir():
        if d.is_dir() and (d / "done.json").exists():
            (d / "done.json").unlink()                               # make the run unfinished again
            for ck in (d / "checkpoints").glob("*"):
                ck.unlink()
    assert cli.main(args) == 0
    (spec,) = expand("smoke", [f"cache_dir={smoke_cache}"]).runs
    assert RunDir(tmp_path / "smoke" / spec.run_id).is_done()
    assert list((tmp_path / "smoke" / ".submitit").glob("*/*_0_log.out"))


def test_cancelled_run_finishes_on_relaunch(tmp_path, smoke_cache):
    grid = expand("smoke", [f"cache_dir={smoke_cache}", "train.steps=400", "train.ckpt_every=20"])
    todo = run_dirs(grid, tmp_path)
    (job,) = [j["job_id"] for j in launch_slurm(todo, folder=tmp_path / ".submitit", wait=False)]
    run = todo[0][1]
    deadline = time.time() + 120
    while not RunDir(run).checkpoints() and time.time() < deadline:
        time.sleep(1)
    subprocess.run(["scancel", job], check=True)
    time.sleep(3)
    assert not RunDir(run).is_done() and RunDir(run).checkpoints()
    small = expand("smoke", [f"cache_dir={smoke_cache}", "train.steps=400", "train.ckpt_every=20"])
    out = launch_slurm(run_dirs(small, tmp_path), folder=tmp_path / ".submitit2")
    assert out[0]["step"] == 400 and RunDir(run).is_done()


def test_absent_partition_fails_before_submitting(tmp_path, monkeypatch):
    from benchmarks.execution import launch

    (tmp_path / "nope.yaml").write_text("partition: gpu-a100\ntimeout_min: 5\n")
    monkeypatch.setattr(launch, "SLURM_DIR", tmp_path)
    with pytest.raises(Exception, match="partition 'gpu-a100' does not exist.*debug"):
        launch.slurm_executor("nope", tmp_path / "sub")


def test_two_task_job_trains_data_parallel(tmp_path, smoke_cache, monkeypatch):
    """tasks_per_node: 2 makes one run a 2-rank gloo group inside one SLURM job (core/dist.py)."""
    from benchmarks.execution import launch

    (tmp_path / "ddp.yaml").write_text(
        "partition: debug\ngpus_per_node: 0\ncpus_per_task: 1\nmem_gb: 2\ntimeout_min: 10\nnodes: 1\n"
        "tasks_per_node: 2\nsignal_delay_s: 30\nmax_num_timeout: 1\n")
    monkeypatch.setattr(launch, "SLURM_DIR", tmp_path)
    grid = expand("smoke", [f"cache_dir={smoke_cache}", "train.steps=4", "eval.batch_size=50"])
    out = launch_slurm(run_dirs(grid, tmp_path / "results"), folder=tmp_path / ".submitit", slurm="ddp")
    run = run_dirs(grid, tmp_path / "results")[0][1]
    assert RunDir(run).is_done(), out
    assert [r["step"] for r in RunDir(run).rows("eval.jsonl")] == [0, 4]
    import pickle

    (task1,) = (tmp_path / ".submitit").glob("*/*_1_result.pkl")       # our own job's result file
    status, result = pickle.loads(task1.read_bytes())
    assert status == "success" and result == {"rank": 1, "step": 4}   # rank 1 of a 2-rank group
