"""Live status while a grid runs: a rich table on a terminal, one compact line per change otherwise.

It reads only the run folders, so it works the same for in-process, local and SLURM launchers.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from core import progress, runlock
from core.errors import CorruptFileError
from core.rundir import read_jsonl

PROGRESS_FILE = "progress.json"          # a job's prepare stages, published while it runs (benchmarks/execution/train.py)


def _row(run: Path, steps: int) -> dict:
    try:
        train, evals = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "eval.jsonl")
    except CorruptFileError:             # a damaged log row: that run stops with the error; the board goes on
        return {"run": run.name, "status": "unreadable", "step": 0, "steps": steps, "loss": None, "fd": None,
                "acc": None, "eta": None}
    status = "done" if (run / "done.json").exists() else "failed" if (run / "failed.json").exists() \
        else "running" if (train or evals) else "pending"
    step = train[-1]["step"] if train else 0
    sps = train[-1].get("sec_per_step") if train else None
    eta = (steps - step) * sps if (sps and status == "running") else None
    stages = progress.read_published(run / PROGRESS_FILE) if status in ("pending", "running") else {}
    if stages and runlock.holder(run) is None:
        stages = {}                      # left behind by a killed job: nobody is preparing any more
    if stages:                           # still building its caches: what, how far, and how long to go
        status = "preparing " + "; ".join(f"{k}: {progress.describe(v)}" for k, v in stages.items())
    return {"run": run.name, "status": status, "step": step, "steps": steps,
            "loss": train[-1].get("loss") if train else None, "fd": evals[-1].get("fd") if evals else None,
            "acc": evals[-1].get("class_acc") if evals else None, "eta": eta}


def snapshot(runs: list[tuple[Path, int]]) -> list[dict]:
    return [_row(d, steps) for d, steps in runs]


def table(rows: list[dict], title: str, stages: dict[str, dict] | None = None) -> Table:
    """The live table: one row per run, its full run id never cut (two seeds of a method differ only in
    the `-s<seed>-<hash>` tail), then one row per stage of this process that is still preparing."""
    t = Table(title=title)
    width = max([len(r["run"]) for r in rows] + [3])
    t.add_column("run", min_width=width, overflow="fold")
    for c in ("status", "step", "loss", "last FD", "class acc", "ETA"):
        t.add_column(c, overflow="fold")
    for stage, state in (stages or {}).items():
        t.add_row(f"(prepare) {stage}", progress.describe(state), "", "", "", "",
                  "" if state.get("eta_s") is None else f"{state['eta_s']:.0f}s")
    for r in rows:
        t.add_row(r["run"], r["status"], f"{r['step']}/{r['steps']}",
                  "" if r["loss"] is None else f"{r['loss']:.4f}", "" if r["fd"] is None else f"{r['fd']:.2f}",
                  "" if r["acc"] is None else f"{r['acc']:.2f}", "" if r["eta"] is None else f"{r['eta']:.0f}s")
    return t


class StatusBoard:
    """Background thread refreshing the status every `every` seconds until stop()."""

    def __init__(self, runs: list[tuple[Path, int]], title: str, every: float = 2.0) -> None:
        self.runs, self.title, self.every = runs, title, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.tty = sys.stdout.isatty()

    def __enter__(self) -> "StatusBoard":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.runs:                    # without a terminal rich assumes 80 columns and cuts the right ones
            Console(width=None if self.tty else 200).print(table(snapshot(self.runs), self.title))

    def _loop(self) -> None:
        if self.tty:
            with Live(self.render(), refresh_per_second=1, transient=True) as live:
                while not self._stop.wait(self.every):
                    live.update(self.render())
            return
        last = None
        while not self._stop.wait(max(self.every, 15.0)):
            line = compact_line(snapshot(self.runs))   # stages of this process: their own log lines say it
            if line and line != last:
                print(time.strftime("%H:%M:%S"), line, flush=True)
                last = line

    def render(self) -> Table:
        """The table now: the runs, and the stages this process is preparing (core/progress.py)."""
        return table(snapshot(self.runs), self.title, progress.active())


def compact_line(rows: list[dict]) -> str:
    """The status without a terminal: one line, every run by its full id."""
    return " | ".join(f"{r['run']} {r['status']} {r['step']}/{r['steps']}"
                      + (f" FD {r['fd']:.1f}" if r["fd"] is not None else "") for r in rows)
