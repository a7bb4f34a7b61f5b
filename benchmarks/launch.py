"""Launchers: in-process, submitit LocalExecutor, submitit SLURM. All call the same `run_job`.

Failure isolation: a run that raises or turns non-finite is marked failed in its folder and the rest
of the grid goes on. Rerunning a grid resumes every unfinished run and skips finished ones.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit

from benchmarks.grid import Grid, RunSpec
from benchmarks.train import run_job
from core.config import ConfigError
from core.rundir import RunDir

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
        return guarded_run(self.cfg, self.run_dir)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        from benchmarks.train import checkpoint_active

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


def launch_local(todo: list[tuple[RunSpec, Path]], *, folder: Path, parallel: int = 0,
                 timeout_min: int = 120, poll: Callable[[], None] | None = None, **_: Any) -> list[dict]:
    """submitit LocalExecutor; at most `parallel` jobs at once, each with torch threads = cores / parallel,
    because LocalExecutor ignores cpus_per_task (notes/stack.md). Default: one single-threaded job per
    core on a CPU machine (tiny models: 2 jobs × 1 thread trained 1.4× faster than 1 job × 2 threads on
    2 cores, docs/results.md), one job at a time on a GPU machine."""
    import torch

    parallel = parallel or (1 if torch.cuda.is_available() else max(1, os.cpu_count() or 1))
    ex = submitit.LocalExecutor(folder=str(folder / "%j"))
    ex.update_parameters(timeout_min=timeout_min)
    queue, running, results = list(todo), [], []
    threads = _threads_per_job(parallel)
    while queue or running:
        while queue and len(running) < parallel:
            r, d = queue.pop(0)
            cfg = {**r.cfg, "train": {**r.cfg["train"], "threads": r.cfg["train"]["threads"] or threads}}
            running.append(ex.submit(Resumable(cfg, str(d))))
        for job in [j for j in running if j.done()]:
            running.remove(job)
            try:
                results.append(job.result())
            except Exception as e:  # noqa: BLE001 - a crashed worker process; the grid goes on
                results.append({"status": "failed", "reason": str(e).splitlines()[0]})
        if poll:
            poll()
        time.sleep(1.0)
    return results


SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"
GENERIC_KEYS = {"timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node"}


def load_slurm_profile(profile: str) -> dict:
    """slurm/<profile>.yaml (safe loader), with unknown names and keys rejected in one line."""
    import yaml

    path = SLURM_DIR / f"{profile}.yaml"
    if not path.exists():
        valid = sorted(p.stem for p in SLURM_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown slurm profile {profile!r}; valid: {', '.join(valid)} (see slurm/README.md)")
    prof = yaml.safe_load(path.read_text()) or {}
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
    import subprocess

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
    for j in jobs:
        try:
            out.append(j.result())
        except Exception as e:  # noqa: BLE001 - cancelled / failed job: the grid goes on
            out.append({"status": "failed", "reason": str(e).splitlines()[0], "job_id": j.job_id})
    return out


LAUNCH: dict[str, Callable[..., list[dict]]] = {"inline": launch_inline, "local": launch_local, "slurm": launch_slurm}


def get_launcher(name: str) -> Callable[..., list[dict]]:
    if name not in LAUNCH:
        raise ConfigError(f"unknown launcher {name!r}; valid: {', '.join(LAUNCHERS)}")
    return LAUNCH[name]
