"""The local launcher's processes: submitit's LocalExecutor with a controller that records how each job
process ended and that ends with the launcher.

Process tree of launcher=local: launcher -> controller (`python -m benchmarks.execution.localjob FOLDER`, one per
job) -> job process (submitit's `_submit`, runs `run_job`). submitit's own controller forgets its task's
exit status, and nothing in it notices a launcher that died, so:
- the controller writes `<job folder>/<job id>_exit.json` (the exit codes of its tasks) when they end;
  the launcher turns a negative code into a signal name for failed.json;
- the controller asks the kernel for SIGINT when the launcher dies (prctl PR_SET_PDEATHSIG; SIGINT
  runs submitit's clean-up, which stops the job: SIGINT, then SIGKILL a second later), and each job
  process asks for SIGKILL when its controller dies. SIGKILL of the launcher cannot be caught, so this is
  the only way its jobs end with it. SLURM jobs never use this module: they must outlive the login node.
Kept free of torch imports: one controller starts per job.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import typing as tp
from pathlib import Path

from submitit.core import utils
from submitit.local import local

log = logging.getLogger(__name__)
LAUNCHER_ENV = "SEMPRIOR_LAUNCHER_PID"     # set only in the controller's (and so its job's) environment
PR_SET_PDEATHSIG = 1


def die_with_parent(expected_ppid: int, sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent exits; if the parent already died
    before the request (the window between fork and here), send it now. Off Linux a thread polls."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the parent instead", ctypes.get_errno())
            _poll_parent(expected_ppid, sig)
    else:
        _poll_parent(expected_ppid, sig)
    if os.getppid() != expected_ppid:
        os.kill(os.getpid(), sig)


def _poll_parent(expected_ppid: int, sig: int) -> None:
    def watch() -> None:
        while os.getppid() == expected_ppid:
            time.sleep(0.5)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def exit_file(folder: Path, job_id: str) -> Path:
    return utils.JobPaths(folder, job_id).folder / f"{job_id}_exit.json"


class Controller(local.Controller):
    """submitit's controller, plus a record of its tasks' exit codes (None: still running at the timeout)."""

    def wait(self, freq: int = 24) -> tp.Sequence[int | None]:
        codes = super().wait(freq)
        path = exit_file(self.folder, self.pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(list(codes)))
        return codes


def read_exit(folder: Path, job_id: str) -> list[int | None] | None:
    try:
        return json.loads(exit_file(folder, job_id).read_text())
    except (OSError, ValueError):
        return None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running at the job's time limit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class LocalExecutor(local.LocalExecutor):
    """LocalExecutor whose jobs run under this module's Controller."""

    def _submit_command(self, command: str) -> local.LocalJob:
        ntasks = self.parameters.get("tasks_per_node", 1)
        n_gpus, visible = self.parameters.get("gpus_per_node", 0), self.parameters.get("visible_gpus", ())
        gpus = range(n_gpus) if visible == () else visible[:n_gpus]
        env = dict(os.environ)                    # what submitit.local.local.start_controller sets, unchanged
        env.update(
            SUBMITIT_LOCAL_NTASKS=str(ntasks), SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_STDERR_TO_STDOUT="",
            SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_WITH_SHELL="",
            CUDA_VISIBLE_DEVICES=",".join(str(k) for k in gpus), **{LAUNCHER_ENV: str(os.getpid())})
        # The controller is started from this (the main) thread: PDEATHSIG follows the thread that forked.
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.execution.localjob", str(self.folder)], env=env)
        return local.LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


def in_local_job() -> bool:
    return LAUNCHER_ENV in os.environ and "SUBMITIT_LOCAL_JOB_ID" in os.environ


def end_with_controller() -> None:
    """In a job process of launcher=local: SIGKILL when the controller dies (its pid is the job id)."""
    if in_local_job():
        catch_sigint()                               # the controller's clean-up stops the job with SIGINT
        die_with_parent(int(os.environ["SUBMITIT_LOCAL_JOB_ID"]), signal.SIGKILL)


def catch_sigint() -> None:
    """SIGINT raises KeyboardInterrupt again here, even when this process inherited it ignored: a launcher
    started in the background of a script (`python -m benchmarks.run ... &`) has SIGINT ignored, its children
    inherit that, and then the launcher's death (PDEATHSIG = SIGINT) or a cancel would not stop its jobs."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(folder: str) -> None:
    catch_sigint()
    die_with_parent(int(os.environ[LAUNCHER_ENV]), signal.SIGINT)
    Controller(Path(folder)).run()


if __name__ == "__main__":
    assert len(sys.argv) == 2, "usage: python -m benchmarks.execution.localjob <submitit folder>"
    main(sys.argv[1])
