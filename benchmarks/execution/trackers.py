"""Experiment trackers: what a run logs to TensorBoard (always, unless log.tensorboard=false) and to Weights &
Biases (log.wandb=true), next to its own metrics.jsonl / eval.jsonl, which stay the source of truth.

Every run writes TensorBoard event files under `<run>/tb/`, so `tensorboard --logdir results/<grid>` shows
the whole grid, one run per run id:

    train/loss, train/loss/<term>, train/lr, train/sec_per_step   every metrics.jsonl row (train.log_every)
    eval/fd, eval/kid, eval/precision, eval/recall, eval/class_acc, eval/...   at every evaluation
    samples (image)                                                 the sample grid of every evaluation
    HParams plugin: the run's flattened config (method, backbone, train, eval, seed, ...) as
                    hyper-parameters, the eval/* scalars as its metrics (their last value = the final one)

Only rank 0 writes. A resumed run (benchmarks/execution/train.py Trainer.restore) opens the writer with
`purge_step = the checkpoint's step`: TensorBoard then hides every event the killed attempt wrote at or
after that step, exactly the rows restore() cut from the logs, and the rows the logs keep at that step are
written again, so the event files never hold two values for one step.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from benchmarks.config.validate import check_log_cfg
from core.config import ConfigError
from core.rundir import read_jsonl

TB_DIR = "tb"
NOT_HPARAMS = ("prepare", "cache_dir", "log")      # long or result-neutral config sections
EVAL_METRICS = ("fd", "kid", "sfid", "is", "precision", "recall", "class_acc")   # the HParams metrics, when logged
def flat_hparams(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """The run config as {dotted key: bool | int | float | str} (lists and null as text), for HParams."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if not prefix and k in NOT_HPARAMS:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, f"{key}."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


def train_scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl row as {tag: value}: loss -> train/loss, loss/<term> -> train/loss/<term>, ..."""
    return {f"train/{k}": float(v) for k, v in row.items() if k != "step" and _number(v)}


def eval_scalars(row: dict) -> dict[str, float]:
    """An eval.jsonl row as {tag: value}: fd -> eval/fd, class_acc -> eval/class_acc, ..."""
    return {f"eval/{k}": float(v) for k, v in row.items() if k != "step" and _number(v)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Trackers:
    """The trackers of one run on rank 0 (a no-op object elsewhere, and with every tracker off)."""

    def __init__(self, cfg: dict, run_dir: Path, start_step: int, active: bool = True) -> None:
        self.cfg, self.run_dir, self.start_step = cfg, Path(run_dir), int(start_step)
        log_cfg = cfg.get("log", {}) if active else {}
        self.tb = self._open_tensorboard() if log_cfg.get("tensorboard", False) else None
        self.wandb = self._open_wandb(log_cfg) if log_cfg.get("wandb", False) else None

    # ------------------------------------------------------------------ opening
    def _open_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter   # heavy (TensorBoard's protobufs): only when a run logs

        folder = self.run_dir / TB_DIR
        earlier = sorted(folder.glob("events.out.tfevents.*")) if folder.exists() else []
        if earlier:
            # The reader orders event files by name, which starts with the creation second: a new file must
            # not share the second of the last one (a crash and a restart within one second).
            newest = max(int(p.name.split(".")[3]) for p in earlier)
            while int(time.time()) <= newest:
                time.sleep(0.05)
        # purge_step: hide what a killed attempt wrote at or after the step this attempt resumes from
        writer = SummaryWriter(str(folder), purge_step=self.start_step if earlier else None)
        if self.start_step == 0 or not earlier:
            self._write_hparams(writer)
        self._replay(writer)
        return writer

    def _write_hparams(self, writer) -> None:
        from torch.utils.tensorboard.summary import hparams   # heavy, as above

        metrics = {f"eval/{m}": float("nan") for m in self._metric_names()}
        exp, ssi, sei = hparams(flat_hparams(self.cfg), metrics)
        fw = writer._get_file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary)

    def _metric_names(self) -> list[str]:
        if self.cfg.get("eval", {}).get("metric") == "adm":
            return ["fd", "sfid", "is", "precision", "recall"]
        return ["fd", "kid", "precision", "recall", "class_acc"]

    def _replay(self, writer) -> None:
        """Rewrite the rows the logs keep at or after the purge step (the train row at the resume step)."""
        if self.start_step == 0:         # a fresh start: restore() has emptied both logs
            return
        for name, scalars in (("metrics.jsonl", train_scalars), ("eval.jsonl", eval_scalars)):
            for row in read_jsonl(self.run_dir / name):
                if row["step"] >= self.start_step:
                    for tag, v in scalars(row).items():
                        writer.add_scalar(tag, v, row["step"])

    def _open_wandb(self, log_cfg: dict):
        try:
            import wandb   # optional dependency (log.wandb=true)
        except ImportError:
            raise ConfigError(check_log_cfg({"wandb": True})[1][1]) from None
        return wandb.init(project=log_cfg.get("wandb_project", "semprior-bench"), name=self.run_dir.name,
                          id=self.run_dir.name, resume="allow", dir=str(self.run_dir), mode=log_cfg.get("wandb_mode"),
                          group=self.run_dir.parent.name, config=flat_hparams(self.cfg), reinit=True)

    # ------------------------------------------------------------------ logging
    def train(self, row: dict) -> None:
        """One metrics.jsonl row (loss terms, lr, sec_per_step)."""
        self._scalars(train_scalars(row), int(row["step"]))

    def eval(self, row: dict, grid_png: Path | None = None) -> None:
        """One eval.jsonl row and the sample grid PNG written with it."""
        step = int(row["step"])
        self._scalars(eval_scalars(row), step)
        if grid_png is None or not Path(grid_png).exists():
            return
        if self.tb is not None:
            with Image.open(grid_png) as im:
                self.tb.add_image("samples", np.asarray(im.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb   # optional dependency, imported by _open_wandb already

            self.wandb.log({"samples": wandb.Image(str(grid_png))}, step=step)

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def finish(self, done: dict) -> None:
        """The run finished: its final metrics go to W&B's summary (TensorBoard's are the last eval/*)."""
        final = done.get("final") or {}
        if self.wandb is not None:
            self.wandb.summary.update({f"final/{k}": v for k, v in final.items() if _number(v)})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


@contextlib.contextmanager
def open_trackers(cfg: dict, run_dir: Path, start_step: int, main: bool) -> Iterator[Trackers]:
    """The run's trackers for the length of the training loop; closed (files flushed) on every exit."""
    trackers = Trackers(cfg, run_dir, start_step, active=main)
    try:
        yield trackers
    finally:
        trackers.close()


def current_lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])
