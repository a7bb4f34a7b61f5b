"""Progress of the long stages (encoder training, latent encoding, FD reference statistics, extraction):
one helper for all of them, so every stage reports the same way.

A `Progress` writes a log line at most every `every_s` seconds (and always at the start and the end), and
keeps its current state in `active()`, which the live table (benchmarks/execution/status.py) shows. Inside
`publish(path)` (a training job's run folder: benchmarks/execution/train.py run_job) the state of the stage
running in this thread's process is also written to `path` as JSON, so a live table in another process
(local or SLURM launcher) sees a job that is still preparing.

Values that need a host sync (a loss on the GPU) are passed as a callable: it runs only when a line is due.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("progress")

EVERY_S = float(os.environ.get("SEMPRIOR_PROGRESS_EVERY_S", "5"))   # at most one line per stage this often

_lock = threading.Lock()
_active: dict[str, dict] = {}            # stage -> its state (done, total, unit, rate, eta_s, values)
_publish: list[Path] = []                # the innermost publish() target of this process


def active() -> dict[str, dict]:
    """A copy of the state of every stage running in this process, by stage name."""
    with _lock:
        return {k: dict(v) for k, v in _active.items()}


def read_published(path: Path) -> dict[str, dict]:
    """The stages another process published to `path` ({} when none, or while the file is being replaced)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def publish(path: Path | None) -> Iterator[None]:
    """While inside, every stage's state is also written to `path` (JSON, atomically); removed at the end.
    `path=None` does nothing (a rank other than 0)."""
    if path is None:
        yield
        return
    _publish.append(Path(path))
    try:
        yield
    finally:
        _publish.remove(Path(path))
        Path(path).unlink(missing_ok=True)


def _write_published() -> None:
    if not _publish:
        return
    path = _publish[-1]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(active(), sort_keys=True))
        os.replace(tmp, path)
    except OSError:                      # the table is a view: a full disk must not stop the stage
        tmp.unlink(missing_ok=True)


def describe(state: dict) -> str:
    """'120/400 steps (30%), 3.1 steps/s, ETA 90s' for one stage's state."""
    done, total, unit = state["done"], state["total"], state["unit"]
    text = f"{done}/{total} {unit}" + (f" ({100 * done / total:.0f}%)" if total else "")
    if state.get("rate"):
        text += f", {state['rate']:.3g} {unit}/s"
    if state.get("eta_s") is not None and done < total:
        text += f", ETA {state['eta_s']:.0f}s"
    values = state.get("values") or {}
    return text + "".join(f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in values.items())


class Progress:
    """One stage's progress: `update(done)` after each unit of work; a line when due, and at the end.

    Use as a context manager: the stage leaves `active()` on exit (also on an error), with a last line
    'done in Ns' when it finished.
    """

    def __init__(self, stage: str, total: int, unit: str = "steps", every_s: float | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.stage, self.total, self.unit = stage, int(total), unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.log = logger or log
        self.t0 = self.last = time.monotonic()
        self.done = 0
        self.lines = 0                    # log lines written (tests check the rate)
        self.key = stage                  # its name in active() (unique while it runs)
        self._state = {"done": 0, "total": self.total, "unit": unit, "rate": None, "eta_s": None, "values": {}}

    def __enter__(self) -> "Progress":
        with _lock:                       # two threads running a stage of the same name get two rows
            self.key = self.stage if self.stage not in _active else \
                next(f"{self.stage} [{i}]" for i in range(2, 10**6) if f"{self.stage} [{i}]" not in _active)
            _active[self.key] = dict(self._state)
        self._emit(f"{self.stage}: started, {self.total} {self.unit}")
        _write_published()
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        with _lock:
            _active.pop(self.key, None)
        if exc_type is None:
            self._emit(f"{self.stage}: done, {self.done}/{self.total} {self.unit} in {time.monotonic() - self.t0:.1f}s")
        _write_published()

    def due(self) -> bool:
        """Whether the next update() writes a line (every_s since the last one)."""
        return time.monotonic() - self.last >= self.every_s

    def update(self, done: int, values: dict[str, Any] | Callable[[], dict[str, Any]] | None = None) -> None:
        """Record that `done` of `total` units are finished; `values` (or the callable giving them, called
        only when a line is due) are shown after the count, e.g. the current loss."""
        self.done = int(done)
        if not self.due() and self.done < self.total:
            return
        now = time.monotonic()
        self.last = now
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 and self.done else None
        vals = values() if callable(values) else (values or {})
        self._state.update(done=self.done, rate=rate, values=vals,
                           eta_s=(self.total - self.done) / rate if rate else None)
        with _lock:
            _active[self.key] = dict(self._state)
        if self.done < self.total:        # the last line is written by __exit__
            self._emit(f"{self.stage}: {describe(self._state)}")
        _write_published()

    def _emit(self, msg: str) -> None:
        self.lines += 1
        self.log.info("%s", msg)


def track(stage: str, items: Any, values: Callable[[], dict[str, Any]] | None = None, *, total: int | None = None,
          unit: str = "steps", every_s: float | None = None) -> Iterator[Any]:
    """Iterate over `items`, reporting after each one (a one-line change to a training loop:
    `for step in track("x training", range(steps), values=lambda: {"loss": float(loss)})`).
    `values` is called only when a line is due, after the loop body of that item has run."""
    n = len(items) if total is None else total
    with Progress(stage, n, unit, every_s) as progress:
        for i, item in enumerate(items):
            yield item
            progress.update(i + 1, values)
