"""submitit against the real single-node SLURM of scripts/slurm/start.sh, with the slurm/local-ci.yaml profile.

Skipped unless that cluster is up. Job functions live in this module and are pickled by value, so the job
(run by the venv's python, which submitit takes from sys.executable) needs neither `tests` on its path nor
this file. Each test uses its own submitit folder: job ids restart at 1 when the cluster's state is purged,
and an old `1_0_result.pkl` in a shared folder would be read back as the new job's result.
"""
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError, UncompletedJobError

from benchmarks.execution.launch import profile_parameters
from slurm_util import cluster_down_reason as _cluster_down_reason

PROFILE = Path(__file__).resolve().parents[1] / "slurm" / "local-ci.yaml"

cloudpickle.register_pickle_by_value(sys.modules[__name__])


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(bool(_cluster_down_reason()), reason=_cluster_down_reason() or "cluster up"),
]


# ---------------------------------------------------------------- jobs (run on the cluster)
def square(x: int) -> int:
    return x * x


def fail(message: str) -> None:
    raise ValueError(message)


def sleep_after_marker(marker: str, seconds: float) -> None:
    Path(marker).touch()
    time.sleep(seconds)


class CountSteps:
    """Counts `steps` steps of `step_s` seconds; on USR2 submitit requeues it with its progress."""

    def __init__(self, steps: int, step_s: float, marker: str) -> None:
        self.steps, self.step_s, self.marker = steps, step_s, marker
        self.done = 0
        self.started_at: list[int] = []  # self.done at the start of each run

    def __call__(self) -> dict:
        self.started_at.append(self.done)
        Path(self.marker).touch()
        while self.done < self.steps:
            time.sleep(self.step_s)
            self.done += 1
        return {"done_steps": self.done, "started_at": self.started_at}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)


# ---------------------------------------------------------------- helpers
@pytest.fixture
def submitted():
    """Jobs a test submitted; any still running at teardown are cancelled so they do not block the node."""
    jobs: list = []
    yield jobs
    for job in jobs:
        if not job.done():
            job.cancel(check=False)


@pytest.fixture
def executor(tmp_path):
    profile = OmegaConf.to_container(OmegaConf.load(PROFILE))
    ctor, update = profile_parameters(profile)
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", **ctor)
    assert ex.cluster == "slurm"
    ex.update_parameters(name="semprior-slurm-test", **update)
    return ex


def wait_for_file(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"job did not start within {timeout_s} s ({path} missing)"
        time.sleep(0.2)


# ---------------------------------------------------------------- tests
def test_map_array_is_one_array_job(executor, submitted):
    jobs = executor.map_array(square, [1, 2, 3])
    submitted.extend(jobs)
    assert [job.result() for job in jobs] == [1, 4, 9]
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1 and [job.job_id.split("_")[1] for job in jobs] == ["0", "1", "2"]


def test_failing_job_raises_with_remote_message(executor, submitted):
    job = executor.submit(fail, "intentional failure 1234")
    submitted.append(job)
    with pytest.raises(FailedJobError, match="intentional failure 1234"):
        job.result()


def test_cancel_is_detected(executor, submitted, tmp_path):
    marker = tmp_path / "started"
    job = executor.submit(sleep_after_marker, str(marker), 300)
    submitted.append(job)
    wait_for_file(marker, 30)
    job.cancel()
    deadline = time.monotonic() + 60  # needs sacct: ~15 s with accounting, forever without
    while not job.done():
        assert time.monotonic() < deadline, f"cancel not seen after 60 s (state {job.state})"
        time.sleep(1)
    with pytest.raises(UncompletedJobError, match="CANCELLED"):
        job.result()


def test_usr2_checkpoints_requeues_and_resumes(executor, submitted, tmp_path):
    # _interrupt(timeout=True) sends USR2 alone, as Slurm does before the time limit (submitit's own test hook).
    # submitit calls it a timeout only after min(0.8 T, T - 10 min) of run time, so here, 1.5 s into a
    # 30-minute job, it logs "preempted": same checkpoint() and requeue, but max_num_timeout is not used up.
    marker = tmp_path / "started"
    job = executor.submit(CountSteps(steps=8, step_s=0.5, marker=str(marker)))
    submitted.append(job)
    wait_for_file(marker, 30)
    time.sleep(1.5)  # a few steps of progress to carry over
    marker.unlink()
    job._interrupt(timeout=True)
    wait_for_file(marker, 60)  # the requeued run (~12 s: cred_expire=10 + sched_interval=2)
    out = job.result()
    assert out["done_steps"] == 8
    assert len(out["started_at"]) == 2 and 0 < out["started_at"][1] < 8
