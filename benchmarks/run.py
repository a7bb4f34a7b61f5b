"""`python -m benchmarks.run grid=NAME [profile=P] [launcher=inline|local|slurm] [slurm=PROFILE]
[parallel=N] [results=DIR] [stale=error|rerun|keep] [key=value ...] [--dry-run] [--no-wait] [--quiet]`
(`--help` lists every key, flag and accepted name: SPEC below)

Expands the grid, prepares the shared caches, trains every unfinished run (rerunning resumes and
never redoes), shows a live status table, and writes the report.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.config.cli import Flag, Key, Spec, command, config_names, parse as parse_args
from benchmarks.config.grid import Grid, check_grid_folder, expand, record_grid_file
from benchmarks.config.plugins import load_all
from benchmarks.config.presets import presets
from benchmarks.data.prepare import FD_NET, load_artifacts
from benchmarks.data.prepare_grid import prepare_grid
from benchmarks.evaluation.scoring import reference_dir
from benchmarks.execution.launch import (LAUNCHERS, SLURM_DIR, check_partition, get_launcher, load_slurm_profile,
                                         pending, run_dirs)
from benchmarks.execution.precision import resolve_device
from benchmarks.execution.stale import POLICIES as STALE_POLICIES, find_stale, handle_stale, stale_message
from benchmarks.execution.status import StatusBoard
from benchmarks.reporting.estimate import assumptions, estimate, load_speed_table
from benchmarks.reporting.report import refused_mix, unreadable_runs, write_report
from core import runlock
from core.config import ConfigError
from core.registry import BACKBONES
from core.rundir import RunDir, atomic_write_text

log = logging.getLogger("benchmarks.run")
DEFAULT_LAUNCHER = "local"     # submitit LocalExecutor: runs in parallel subprocesses, isolated from each other


def _methods() -> list[str]:
    load_all()
    return presets()


def _backbones() -> list[str]:
    load_all()
    return BACKBONES.names()


def _slurm_profiles() -> list[str]:
    return sorted(p.stem for p in SLURM_DIR.glob("*.yaml"))


SPEC = Spec(
    prog="python -m benchmarks.run",
    purpose="Expand a grid, prepare the shared caches, train every unfinished run (rerunning resumes and never "
            "redoes), show a live status table, and write the report (results/<grid>/report.md). Exit status 1 "
            "when a run did not finish.",
    keys=(
        Key("grid", "the grid to run: a name below (benchmarks/configs/grid/, or SEMPRIOR_CONFIG_PATH) or a "
            "path to a grid YAML file", required=True, metavar="NAME|FILE.yaml", complete=config_names("grid")),
        Key("profile", "the profile every run starts from (a name below)", default="the grid's own",
            metavar="NAME", complete=config_names("profile")),
        Key("launcher", "where the jobs run: local (parallel subprocesses on this machine), inline (in this "
            "process), slurm (submitit, one job per run)", type="choice", choices=LAUNCHERS,
            default=DEFAULT_LAUNCHER, noun="launcher"),
        Key("slurm", "the SLURM profile slurm/<name>.yaml (launcher=slurm)", default="local-ci", metavar="NAME",
            complete=_slurm_profiles),
        Key("parallel", "jobs at once (launcher=local)", type="int", low=1, default="one job per core on a CPU",
            check_value=False),
        Key("results", "the results folder; the grid's runs go to <results>/<grid>/", type="path",
            default="results"),
        Key("stale", "a finished or partial run whose code changed since it ran: error (stop and list them), "
            "rerun (move the old folder aside and train again) or keep (reuse it; the report marks it stale)",
            type="choice", choices=STALE_POLICIES, default="error"),
        Key("report.allow_mixed_eval", "put runs evaluated with different protocols (sampler settings, guidance, "
            "samples, scoring network) into one comparison table of the final report, each row marked with its protocol",
            type="choice", choices=("true", "false"), default="false"),
    ),
    flags=(
        Flag("--dry-run", "list the expanded runs, the GPUs each asks for and a GPU-hour estimate; write nothing"),
        Flag("--no-wait", "submit the jobs and return without waiting for them (launcher=slurm)"),
        Flag("--quiet", "log warnings and errors only (the live table and the final report line stay)"),
    ),
    overrides="any other key=value overrides that config key in every run of the grid (OmegaConf dotlist, "
              "e.g. train.steps=500 eval.num_samples=256 cache_dir=/scratch/cache); an unknown config key is "
              "an error naming the valid ones.",
    names=(("grids", config_names("grid")), ("profiles", config_names("profile")),
           ("methods", _methods), ("backbones", _backbones), ("launchers", LAUNCHERS),
           ("slurm profiles", _slurm_profiles)),
    examples=("python -m benchmarks.run grid=sfd_vs_redi --dry-run",
              "python -m benchmarks.run grid=smoke launcher=local parallel=2 train.steps=500"),
)
META_KEYS = tuple(SPEC.key_names)
FLAGS = tuple(f.name for f in SPEC.flags)


def parse(argv: list[str]) -> tuple[dict[str, str], list[str], set[str]]:
    """(the command's own keys, the config overrides in order, the flags): benchmarks.config.cli.parse with SPEC."""
    args = parse_args(SPEC, argv)
    return args.values, args.overrides, args.flags


def write_run_stubs(grid: Grid, results: Path) -> None:
    """config.yaml and label.json for every run before anything starts, so reports see pending runs."""
    (results / grid.name).mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / grid.name / "grid_runs.json", json.dumps([r.run_id for r in grid.runs]))
    for spec, d in run_dirs(grid, results):
        rd = RunDir(d)
        if not (d / "config.yaml").exists():
            rd.write_config(spec.cfg)
        atomic_write_text(d / "label.json", json.dumps(spec.label, sort_keys=False))


def prepare_stage(grid: Grid, results: Path) -> None:
    """Build every distinct cache the grid needs, once, in this process (with the same locks the jobs use)."""
    summary: dict = {"artifacts": {}, "latents": {}}
    seen: set[str] = set()
    builds: dict[str, dict[str, dict]] = {}     # kind -> artifact folder -> summary
    t0 = time.time()
    device = resolve_device(grid.runs[0].cfg["train"]["device"])
    preps = prepare_grid([spec.cfg for spec in grid.runs], device)
    log.info("prepare: all caches ready in %.0fs", time.time() - t0)
    for spec, prep in zip(grid.runs, preps):
        cfg = spec.cfg
        if prep.latent_dir.name in seen:
            continue
        seen.add(prep.latent_dir.name)
        for kind, summ in prep.summaries().items():
            builds.setdefault(kind, {})[prep.artifact_dirs[kind].name] = summ
        summary["latents"].setdefault(spec.label["method"], []).append(prep.latent_dir.name)
        if cfg["eval"]["metric"] != "fd-net":     # the ADM reference batch has its own precomputed statistics
            continue
        fd = load_artifacts({FD_NET: prep.artifact_dirs[FD_NET]}, device)[FD_NET]
        ref = reference_dir(cfg["cache_dir"], prep.artifact_dirs[FD_NET], prep.data, cfg["eval"]["num_samples"],
                            device, fd)
        summary["real_data_floor"] = json.loads((ref / "floor.json").read_text())
        summary["num_samples"] = cfg["eval"]["num_samples"]
    # A kind built more than once (a grid axis over prepare.seed or the slot's class) lists every build by folder.
    summary["artifacts"] = {(kind if len(dirs) == 1 else f"{kind} {name}"): summ
                            for kind, dirs in builds.items() for name, summ in dirs.items()}
    summary["latents"] = {m: d[0] if len(d) == 1 else d for m, d in summary["latents"].items()}
    atomic_write_text(results / grid.name / "prepare.json", json.dumps(summary, indent=2, sort_keys=True))


def dry_run(grid: Grid, meta: dict[str, str], results: Path) -> None:
    """The jobs, the GPUs each asks for and an estimate of GPU-hours from the measured speed table.
    Data and weight files are not checked (plan before downloading); everything else is validated."""
    if meta.get("launcher") == "slurm":
        prof = load_slurm_profile(meta.get("slurm", "local-ci"))
        gpus = int(prof.get("nodes") or 1) * int(prof.get("gpus_per_node") or 0)
    else:
        gpus = 1 if grid.runs and grid.runs[0].cfg["train"]["device"] != "cpu" and torch.cuda.is_available() else 0
    table = load_speed_table()
    total, unknown = 0.0, 0
    for r in grid.runs:
        t = r.cfg["train"]
        est = estimate(r.cfg, max(gpus, 1), table)
        cost = "no speed row" if est is None else (
            f"{est.img_per_s_per_gpu:.0f} img/s/GPU -> train {est.train_gpu_h:,.0f} + eval {est.eval_gpu_h:,.0f} "
            f"GPU-h = {est.total_gpu_h / max(gpus, 1):,.0f} h on {max(gpus, 1)} GPU(s)  [{est.source}]")
        total += est.total_gpu_h if est else 0.0
        unknown += est is None
        print(f"{r.run_id}  {json.dumps(r.label)}  steps={t['steps']} batch={t['batch_size']} "
              f"precision={t['precision']} gpus={gpus}  {cost}")
    print(f"{len(grid.runs)} runs; {len(pending(grid, results))} not finished; "
          f"≈ {total:,.0f} GPU-hours in all{f' ({unknown} runs without a speed row)' if unknown else ''}")
    print(assumptions())


def check_local_cuda(grid, launcher: str) -> None:
    """Jobs of the inline and local launchers run on this machine: a run that needs CUDA
    (train.device=cuda, train.cuda_graph=true) must find it here, or fail before anything is written."""
    if torch.cuda.is_available():
        return
    for r in grid.runs:
        t = r.cfg["train"]
        if t["cuda_graph"] or str(t["device"]).startswith("cuda"):
            raise ConfigError(f"run {r.run_id} needs CUDA (train.device={t['device']}, train.cuda_graph="
                              f"{str(t['cuda_graph']).lower()}) but this machine has none, and launcher={launcher} "
                              "runs jobs here (use launcher=slurm for a GPU cluster)")


def results_folder(meta: dict[str, str]) -> Path:
    """results=DIR; an empty value would put the grid's folder into the current directory."""
    value = meta.get("results", "results")
    if not value.strip():
        raise ConfigError("results= is empty; give the results folder, e.g. results=results")
    return Path(value)


def check_writable(folder: Path, key: str, fix: str) -> None:
    """Fail before anything is written when `folder` cannot be created or written: a probe file is created
    and removed in it, or in its nearest existing parent when it does not exist yet (which is left as it was)."""
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"{key} folder {folder} cannot be created: {probe_dir} is a file; set {fix}")
    probe = probe_dir / f".write-probe-{os.getpid()}"
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else type(e).__name__
        raise ConfigError(f"{key} folder {folder} is not writable ({probe_dir}: {why}); set {fix} "
                          "to a writable folder") from None


@command(spec=SPEC)
def main(argv: list[str]) -> int:
    meta, dotlist, flags = parse(argv)
    logging.basicConfig(level=logging.WARNING if "--quiet" in flags else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    grid = expand(meta["grid"], dotlist, profile=meta.get("profile"), check_files="--dry-run" not in flags)
    launcher_name = meta.get("launcher", DEFAULT_LAUNCHER)
    launcher = get_launcher(launcher_name)
    if launcher_name != "slurm" and "--dry-run" not in flags:
        check_local_cuda(grid, launcher_name)
    if launcher_name == "slurm":                     # a bad cluster profile fails before anything is written
        prof = load_slurm_profile(meta.get("slurm", "local-ci"))
        if "--dry-run" not in flags:                 # a dry run may plan from a machine outside the cluster
            check_partition(prof.get("partition"))
    results = results_folder(meta)
    parallel = parse_parallel(meta)
    if "--dry-run" not in flags:                     # a dry run writes nothing
        check_writable(results, "results", "results=DIR")
        for cache in sorted({str(r.cfg["cache_dir"]) for r in grid.runs}):
            check_writable(Path(cache), "cache_dir", "cache_dir=DIR")
    if "--dry-run" in flags:
        dry_run(grid, meta, results)
        stale = find_stale(grid, results)            # said, not acted on: a dry run writes nothing
        if stale:
            print(f"note: {stale_message(grid, stale)}")
        return 0
    check_grid_folder(grid, results)                 # two grid files with one stem: refused before any write
    handle_stale(grid, results, meta.get("stale"))   # runs made with other code: error / rerun / keep (benchmarks/execution/stale.py)
    write_run_stubs(grid, results)
    record_grid_file(grid, results)                  # results/<grid>/grid.yaml: what benchmarks.report reads
    t0 = time.time()
    if meta.get("launcher", DEFAULT_LAUNCHER) != "slurm":
        with StatusBoard([], f"grid {grid.name}: preparing caches"):   # each stage's progress (core/progress.py)
            prepare_stage(grid, results)
    todo = pending(grid, results)
    log.info("grid %s: %d runs, %d to do (prepare took %.0fs)", grid.name, len(grid.runs), len(todo), time.time() - t0)
    board_runs = [(d, r.cfg["train"]["steps"]) for r, d in run_dirs(grid, results)]
    try:
        with StatusBoard(board_runs, f"grid {grid.name}"), sigterm_as_interrupt():
            launcher(todo, folder=results / grid.name / ".submitit", parallel=parallel,
                     slurm=meta.get("slurm", "local-ci"), wait="--no-wait" not in flags)
    except KeyboardInterrupt:                        # the launcher has cancelled its jobs (benchmarks/execution/launch.py)
        print(f"interrupted: the grid's running jobs were stopped; rerun to resume ({time.time() - t0:.0f}s)",
              file=sys.stderr)
        return 130
    out = write_report(grid.name, results, allow_mixed_eval=meta.get("report.allow_mixed_eval") == "true")
    if "--no-wait" in flags:                         # submitted, not finished: nothing to judge yet
        print(f"report: {out}  ({time.time() - t0:.0f}s)")
        return 0
    unfinished = unfinished_runs(grid, results)
    unfinished.update({k: f"unreadable: {v}" for k, v in unreadable_runs(out.parent).items()})  # listed in report.md
    print(f"report: {out}  ({time.time() - t0:.0f}s)"
          + (f"  NOT DONE: {'; '.join(f'{k} ({v})' for k, v in unfinished.items())}" if unfinished else ""))
    mix = refused_mix(out.parent)                    # runs of different evaluation protocols: no comparison
    if mix:
        print(f"error: {mix}", file=sys.stderr)
    return 1 if unfinished or mix else 0


def parse_parallel(meta: dict[str, str]) -> int | None:
    """parallel=N: a positive integer, or absent (the launcher's automatic default: one job per core on a CPU)."""
    if "parallel" not in meta:
        return None
    value = meta["parallel"].strip()
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"parallel must be a positive integer (jobs at once), got {meta['parallel']!r}; "
                          "leave it out for one job per core")
    return int(value)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (kill, a scheduler) stops the launcher like Ctrl-C: KeyboardInterrupt, so the launcher cancels
    its local jobs and the inline job's finally blocks release its run lock. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def unfinished_runs(grid: Grid, results: Path) -> dict[str, str]:
    """Every run without done.json, and why: failed (its reason), held by another process, or not finished."""
    out = {}
    for _, d in run_dirs(grid, results):
        rd = RunDir(d)
        if rd.is_done():
            continue
        if rd.failed_file.exists():
            try:
                out[d.name] = f"failed: {json.loads(rd.failed_file.read_text()).get('reason', '?')}"
            except ValueError:
                out[d.name] = "failed"
        elif (who := runlock.holder(d)) is not None:
            out[d.name] = f"held by another process ({runlock.describe(who)})"
        else:
            out[d.name] = "not finished"
    return out


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    sys.exit(main())
