"""Launchers: in-process, submitit LocalExecutor, submitit SLURM. All call the same `run_job`.

Failure isolation: a run that raises or turns non-finite is marked failed in its folder and the rest
of the grid goes on. Rerunning a grid resumes every unfinished run and skips finished ones.
One writer per run folder: run_job holds the folder's lock (core/runlock.py); a run held by another live
process is skipped with a one-line message. A job process that ends without done.json or failed.json
(a signal, the OOM killer, a crash outside Python) is marked failed here, with its exit status and the
tail of its log. launcher=local: SIGINT/SIGTERM to the launcher cancel its jobs, and its jobs end when
it dies (benchmarks/execution/localjob.py).
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit
import torch

from benchmarks.config.grid import Grid, RunSpec
from benchmarks.execution import localjob
from benchmarks.execution.train import checkpoint_active, run_job
from core.config import ConfigError, load_config_yaml
from core.rundir import RunDir
from core.runlock import RunHeld, RunLock, describe

log = logging.getLogger(__name__)
LAUNCHERS = ("inline", "local", "slurm")
SLURM_KEYS = {"partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "account", "constraint",
              "nodes", "tasks_per_node", "array_parallelism", "signal_delay_s", "max_num_timeout", "extra"}


@dataclass
class Resumable:
    """submitit job: on preemption/timeout submitit calls checkpoint(), which resubmits the same call;
    run_job then resumes from the newest checkpoint in the run folder."""

    cfg: dict
    run_dir: str

    def __call__(self) -> dict:
        localjob.end_with_controller()      # launcher=local only: this process ends with its controller
        return guarded_run(self.cfg, self.run_dir)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        path = checkpoint_active()           # the state at the signal, not just the last periodic save
        log.info("preempted: %s; requeueing %s", f"checkpoint {path.name}" if path else "no new checkpoint",
                 Path(self.run_dir).name)
        return submitit.helpers.DelayedSubmission(Resumable(self.cfg, self.run_dir))


def guarded_run(cfg: dict, run_dir: str) -> dict:
    """run_job, but an exception marks the run failed (with the traceback) instead of killing the grid."""
    try:
        return run_job(cfg, run_dir)
    except (KeyboardInterrupt, SystemExit):
        raise
    except RunHeld as e:                    # not a failure of this run: another process is training it
        log.warning("run %s skipped: held by another process (%s)", Path(run_dir).name, describe(e.holder))
        return {"status": "held", "holder": describe(e.holder)}
    except Exception as e:  # noqa: BLE001 - isolate one run's failure from the grid
        payload = {"status": "failed", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        RunDir(run_dir).mark_failed(payload)
        log.error("run %s failed: %s", Path(run_dir).name, payload["reason"])
        return payload


def run_dirs(grid: Grid, results_root: Path) -> list[tuple[RunSpec, Path]]:
    return [(r, results_root / grid.name / r.run_id) for r in grid.runs]


def pending(grid: Grid, results_root: Path) -> list[tuple[RunSpec, Path]]:
    return [(r, d) for r, d in run_dirs(grid, results_root) if not RunDir(d).is_done()]


def launch_inline(todo: list[tuple[RunSpec, Path]], **_: Any) -> list[dict]:
    return [guarded_run(r.cfg, str(d)) for r, d in todo]


def _threads_per_job(parallel: int) -> int:
    return max(1, (os.cpu_count() or 1) // parallel)


LOG_TAIL_LINES = 20


def log_tail(paths: list[Path], n: int = LOG_TAIL_LINES) -> list[str]:
    """The last n lines of each existing log file (a job's submitit stderr holds logging and tracebacks)."""
    out = []
    for p in paths:
        if p.exists():
            out += [f"[{p.name}] {line}" for line in p.read_text(errors="replace").splitlines()[-n:]]
    return out


def mark_ended(run_dir: Path, reason: str, logs: list[Path], **extra: Any) -> dict | None:
    """A job ended: if its run has neither done.json nor failed.json, write failed.json with the reason and
    the tail of the job's log. Under the run lock, so a process that took the run over meanwhile is left
    alone (its run_job clears failed.json anyway). Returns the payload written, or None."""
    rd = RunDir(run_dir)
    if rd.is_done() or rd.failed_file.exists():
        return None
    try:
        with RunLock(run_dir):
            if rd.is_done() or rd.failed_file.exists():
                return None
            payload = {"status": "failed", "reason": reason, "log": [str(p) for p in logs],
                       "log_tail": log_tail(logs), **extra}
            rd.mark_failed(payload)
    except RunHeld as e:
        log.warning("run %s: its job ended (%s) but %s holds the run now; not marked", run_dir.name, reason,
                    describe(e.holder))
        return None
    tail = "\n".join(f"    {line}" for line in payload["log_tail"][-LOG_TAIL_LINES:])
    log.error("run %s failed: %s; last lines of its log:\n%s", run_dir.name, reason, tail)
    return payload


def _settle_local(job: Any, run_dir: Path, folder: Path) -> dict:
    """The result of a finished local job; a job process that died without a word is marked failed."""
    err = None
    try:
        result = job.result()
    except Exception as e:  # noqa: BLE001 - a crashed worker process; the grid goes on
        err = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        result = {"status": "failed", "reason": err}
    if isinstance(result, dict) and result.get("status") == "held":
        log.warning("run %s skipped: held by another process (%s)", run_dir.name, result["holder"])
        return result
    codes = localjob.read_exit(folder, job.job_id)
    code = codes[0] if codes else None
    if codes is None:
        reason = f"job controller {job.job_id} ended without recording an exit status"
    else:
        reason = f"job process {localjob.describe_exit(code)}"
    if err and not (code is not None and code < 0):      # a signal says it all; an exception adds its words
        reason = f"{reason}: {err}"
    payload = mark_ended(run_dir, reason, [job.paths.stderr, job.paths.stdout], exit_code=code)
    return payload or result


def local_parallel(parallel: int | None) -> int:
    """Jobs at once: `parallel` when given (run.py checks it is a positive integer); by default one
    single-threaded job per core on a CPU machine and one job at a time on a GPU machine."""
    if parallel is not None:
        return parallel
    return 1 if torch.cuda.is_available() else max(1, os.cpu_count() or 1)


def launch_local(todo: list[tuple[RunSpec, Path]], *, folder: Path, parallel: int | None = None,
                 timeout_min: int = 7 * 24 * 60, poll: Callable[[], None] | None = None, **_: Any) -> list[dict]:
    """submitit LocalExecutor; at most `parallel` jobs at once, each with torch threads = cores / parallel,
    because LocalExecutor ignores cpus_per_task (submitit 1.5: N torch jobs would oversubscribe the cores). Default: one single-threaded job per
    core on a CPU machine (tiny models: 2 jobs × 1 thread trained 1.4× faster than 1 job × 2 threads on
    2 cores, docs/results.md), one job at a time on a GPU machine, which sees all of the machine's GPUs.
    The time limit is a week: a local job has no queue to return to, and a rerun resumes it anyway. An
    exception here (KeyboardInterrupt, run.py's SIGTERM) cancels the running jobs before it propagates."""
    parallel = local_parallel(parallel)
    ex = localjob.LocalExecutor(folder=str(folder / "%j"))
    # submitit's local jobs see only `gpus_per_node` GPUs (CUDA_VISIBLE_DEVICES), 0 by default: without this a
    # GPU machine's jobs would train on the CPU under train.device=auto, without a word.
    ex.update_parameters(timeout_min=timeout_min, gpus_per_node=torch.cuda.device_count())
    queue, running, results = list(todo), [], []
    threads = _threads_per_job(parallel)
    try:
        while queue or running:
            while queue and len(running) < parallel:
                r, d = queue.pop(0)
                cfg = {**r.cfg, "train": {**r.cfg["train"], "threads": r.cfg["train"]["threads"] or threads}}
                running.append((ex.submit(Resumable(cfg, str(d))), d))
            for job, d in [(j, d) for j, d in running if j.done()]:
                running.remove((job, d))
                results.append(_settle_local(job, d, folder / "%j"))
            if poll:
                poll()
            time.sleep(1.0)
    finally:
        _cancel(running)
    return results


def _cancel(running: list[tuple[Any, Path]], wait_s: float = 10.0) -> None:
    """SIGINT to each controller (submitit's clean-up then stops its job: SIGINT, SIGKILL a second later);
    wait for them, so the launcher returns only when no job process of it is left."""
    for job, _ in running:
        job.cancel()
    deadline = time.time() + wait_s
    while any(not j.done() for j, _ in running) and time.time() < deadline:
        time.sleep(0.2)
    if running:
        log.warning("cancelled %d running job(s): %s; rerun the grid to resume them", len(running),
                    ", ".join(d.name for _, d in running))


SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
GENERIC_KEYS = {"timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node"}


def load_slurm_profile(profile: str) -> dict:
    """slurm/<profile>.yaml (safe loader refusing duplicate keys), with unknown names, keys, syntax errors
    and a top level that is not a mapping rejected in one line."""
    path = SLURM_DIR / f"{profile}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in SLURM_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown slurm profile {profile!r}; valid: {', '.join(valid)} (see slurm/README.md)")
    prof = load_config_yaml(path, "slurm profile") or {}
    if not isinstance(prof, dict):
        raise ConfigError(f"{path}: expected a mapping (key: value lines) at the top level of a slurm profile")
    unknown = set(prof) - SLURM_KEYS
    if unknown:
        raise ConfigError(f"slurm profile {profile!r}: unknown keys {sorted(unknown)}; valid: {', '.join(sorted(SLURM_KEYS))}")
    return prof


def profile_parameters(profile: dict) -> tuple[dict, dict]:
    """Map a slurm profile to (AutoExecutor constructor kwargs, update_parameters kwargs).

    submitit takes max_num_timeout in the constructor; the generic keys keep their names; everything
    else gets the slurm_ prefix; `extra` becomes slurm_additional_parameters.
    """
    params = dict(profile)
    ctor = {"slurm_max_num_timeout": params.pop("max_num_timeout", 3)}
    extra = params.pop("extra", None)
    update = {k if k in GENERIC_KEYS else f"slurm_{k}": v for k, v in params.items() if v is not None}
    if extra:
        update["slurm_additional_parameters"] = dict(extra)
    return ctor, update


def check_partition(partition: str | None) -> None:
    """Fail before submitting when the profile names a partition this cluster does not have."""
    if not partition:
        return
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"cannot query SLURM partitions ({e}); is this a SLURM login node? "
                          "(the CI cluster: bash scripts/slurm/start.sh)") from None
    names = sorted({p.strip().rstrip("*") for p in out.split() if p.strip()})
    if partition not in names:
        raise ConfigError(f"slurm partition {partition!r} does not exist on this cluster; available: "
                          f"{', '.join(names) or '(none)'}; fix `partition` in your slurm/<profile>.yaml")


def slurm_executor(profile: str, folder: Path) -> submitit.AutoExecutor:
    """AutoExecutor with parameters from slurm/<profile>.yaml (see slurm/README.md)."""
    prof = load_slurm_profile(profile)
    check_partition(prof.get("partition"))
    ctor, update = profile_parameters(prof)
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm", **ctor)
    ex.update_parameters(name="semprior", **update)
    return ex


def launch_slurm(todo: list[tuple[RunSpec, Path]], *, folder: Path, slurm: str = "local-ci",
                 wait: bool = True, poll: Callable[[], None] | None = None, **_: Any) -> list[dict]:
    """One job per run, submitted as one job array; waits (polling) unless wait=False."""
    ex = slurm_executor(slurm, folder)
    with ex.batch():
        jobs = [ex.submit(Resumable(r.cfg, str(d))) for r, d in todo]
    log.info("submitted %d jobs: %s", len(jobs), ", ".join(j.job_id for j in jobs))
    if not wait:
        return [{"job_id": j.job_id} for j in jobs]
    while not all(j.done() for j in jobs):
        if poll:
            poll()
        time.sleep(2.0)
    out = []
    for j, (_, d) in zip(jobs, todo):
        try:
            out.append(j.result())
        except Exception as e:  # noqa: BLE001 - cancelled / failed job: the grid goes on
            failed = {"status": "failed", "reason": str(e).splitlines()[0], "job_id": j.job_id}
            marked = mark_ended(d, f"SLURM job {j.job_id} ended {j.state}", [j.paths.stderr, j.paths.stdout],
                                job_id=j.job_id)
            out.append(marked or failed)
    return out


LAUNCH: dict[str, Callable[..., list[dict]]] = {"inline": launch_inline, "local": launch_local, "slurm": launch_slurm}


def get_launcher(name: str) -> Callable[..., list[dict]]:
    if name not in LAUNCH:
        raise ConfigError(f"unknown launcher {name!r}; valid: {', '.join(LAUNCHERS)}")
    return LAUNCH[name]
