"""Stage 4a: one pandas DataFrame over all runs of a grid (any time, also while jobs run).

Reads only run folders (config.yaml, eval.jsonl, metrics.jsonl, done.json, failed.json); never checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from core.rundir import read_jsonl

METRICS = ("fd", "kid", "precision", "recall", "class_acc", "fid", "sfid", "is")   # fd-net rows | adm rows (fd = fid)


def _status(run: Path) -> str:
    if (run / "done.json").exists():
        return "done"
    if (run / "failed.json").exists():
        return "failed"
    if (run / "metrics.jsonl").exists() or (run / "eval.jsonl").exists():
        return "running"
    return "pending"


def read_label(run: Path) -> dict:
    """The axis values the grid gave this run (label.json, written at launch)."""
    path = Path(run) / "label.json"
    return json.loads(path.read_text()) if path.exists() else {}


def group_name(label: dict, constant: tuple[str, ...] = ()) -> str:
    """Runs that differ only by seed form one group (one curve, one table row). Axes with one value in
    the whole grid (`constant`) are left out of the name."""
    return ",".join(f"{k}={v}" if k != "method" else str(v) for k, v in label.items()
                    if k != "seed" and (k == "method" or k not in constant))


def constant_axes(grid_root: Path) -> tuple[str, ...]:
    labels = [read_label(r) for r in run_folders(grid_root)]
    keys = {k for lab in labels for k in lab}
    return tuple(k for k in keys if len({json.dumps(lab.get(k)) for lab in labels}) == 1)


def run_folders(grid_root: Path) -> list[Path]:
    grid_root = Path(grid_root)
    if not grid_root.exists():
        return []
    runs = sorted(p for p in grid_root.iterdir() if p.is_dir() and (p / "config.yaml").exists())
    current = grid_root / "grid_runs.json"      # written by benchmarks.run: the grid's runs as last expanded
    if current.exists():                        # folders of an older expansion (changed config) are left out
        keep = set(json.loads(current.read_text()))
        runs = [p for p in runs if p.name in keep]
    return runs


def load_runs(grid_root: Path) -> pd.DataFrame:
    """One row per run: run_id, status, label columns, flattened config, first/last eval, last train row."""
    rows, const = [], constant_axes(grid_root)
    for run in run_folders(grid_root):
        cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
        evals = read_jsonl(run / "eval.jsonl")
        train = read_jsonl(run / "metrics.jsonl")
        row = {"run_id": run.name, "status": _status(run), "path": str(run),
               "method": cfg["method"]["name"], "backbone": cfg["backbone"]["name"], "seed": cfg["seed"],
               "steps": cfg["train"]["steps"], "step": train[-1]["step"] if train else 0}
        lab = read_label(run)
        row.update({f"label.{k}": v for k, v in lab.items()})
        row["group"] = group_name(lab, const)
        if evals:
            row.update({f"first.{k}": evals[0].get(k) for k in METRICS})
            row.update({f"final.{k}": evals[-1].get(k) for k in METRICS})
            row["final.step"] = evals[-1]["step"]
        if train:
            row["loss"] = train[-1].get("loss")
            row["sec_per_step"] = train[-1].get("sec_per_step")
        if (run / "failed.json").exists():
            fail = json.loads((run / "failed.json").read_text())
            row["failure"] = fail.get("reason")
            row["failed_step"] = fail.get("step")
        row.update({f"cfg.{k}": v for k, v in pd.json_normalize(cfg).iloc[0].to_dict().items()})
        rows.append(row)
    return pd.DataFrame(rows)


def load_curves(grid_root: Path) -> pd.DataFrame:
    """Long table: one row per (run, eval step) with every eval metric and the run's labels."""
    rows, const = [], constant_axes(grid_root)
    for run in run_folders(grid_root):
        cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"), resolve=True)
        lab = read_label(run)
        for ev in read_jsonl(run / "eval.jsonl"):
            rows.append({"run_id": run.name, "method": cfg["method"]["name"], "backbone": cfg["backbone"]["name"],
                         "seed": cfg["seed"], "group": group_name(lab, const),
                         **{f"label.{k}": v for k, v in lab.items()}, **ev})
    return pd.DataFrame(rows)
