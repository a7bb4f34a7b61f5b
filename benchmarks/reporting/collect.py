"""Stage 4a: one pandas DataFrame over all runs of a grid (any time, also while jobs run).

Reads only run folders (config.yaml, eval.jsonl, metrics.jsonl, done.json, failed.json, protocol.json,
stale.json); never checkpoints.
A run folder with a file that cannot be read (garbled YAML/JSON, a damaged JSONL row, a config without the
expected keys) becomes one row with status "unreadable" and the file and problem in `unreadable`; the
other runs are reported as usual.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from benchmarks.evaluation.protocol import protocol_id, protocol_tag

from core.errors import CorruptFileError
from core.machine import MACHINE_FILE, machine_text
from core.rundir import read_jsonl

# What a damaged file raises while read: OSError (unreadable), ValueError (bad JSON, bad UTF-8,
# CorruptFileError from read_jsonl), YAML and OmegaConf errors; KeyError/TypeError: a config or row that
# parsed but lacks the keys every run folder has.
READ_ERRORS = (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException, KeyError, TypeError, IndexError)


class UnreadableRun(Exception):
    """A run folder whose files cannot be read; the message names the file and the problem (one line)."""


def _problem(e: BaseException) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        return f"not valid YAML (line {e.problem_mark.line + 1}: {e.problem})"
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON ({e.msg} at line {e.lineno})"
    if isinstance(e, KeyError):
        return f"no key {e}"
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text}" if not isinstance(e, CorruptFileError) else text


def read_file(run: Path, name: str, reader):
    """reader(path) for one file of a run folder, any read failure as UnreadableRun naming the file."""
    try:
        return reader(Path(run) / name)
    except READ_ERRORS as e:
        raise UnreadableRun(f"{name}: {_problem(e)}") from None


def _config(path: Path) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(cfg, dict):
        raise TypeError(f"holds a {type(cfg).__name__}, not a run config")
    for key in ("method.name", "backbone.name", "seed", "train.steps"):   # what every row reads
        node = cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(key)
            node = node[part]
    return cfg


def _json(path: Path) -> dict | None:
    obj = json.loads(path.read_text()) if path.exists() else None
    if obj is not None and not isinstance(obj, dict):
        raise TypeError(f"holds a {type(obj).__name__}, not a JSON object")
    return obj


METRICS = ("fd", "kid", "precision", "recall", "class_acc", "fid", "sfid", "is", "nfe")   # fd-net rows | adm rows (fd = fid); nfe per sample


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
    return read_label_file(Path(run) / "label.json")


def read_label_file(path: Path) -> dict:
    label = json.loads(path.read_text()) if path.exists() else {}
    if not isinstance(label, dict):
        raise TypeError(f"holds a {type(label).__name__}, not the run's axis values")
    return label


# Replicate axes: draws of the same experiment, pooled within a group and never part of its name. `seed` is
# the training seed, `prepare.seed` the artifact-build index (tokenizers, encoder, FD network built again
# with another seed). Both move the final FD by chance, so the report's n, sd and CIs are over both
# (benchmarks/reporting/stats.py); a grid axis over either adds runs to a group, not groups.
REPLICATE_AXES = ("seed", "prepare.seed")


def group_name(label: dict, constant: tuple[str, ...] = ()) -> str:
    """Runs that differ only by a replicate axis (REPLICATE_AXES) form one group (one curve, one table row).
    Axes with one value in the whole grid (`constant`) are left out of the name."""
    return ",".join(f"{k}={v}" if k != "method" else str(v) for k, v in label.items()
                    if k not in REPLICATE_AXES and (k == "method" or k not in constant))


def constant_axes(grid_root: Path) -> tuple[str, ...]:
    labels = []
    for r in run_folders(grid_root):
        try:
            labels.append(read_label(r))
        except READ_ERRORS:
            continue                            # that run is listed as unreadable by load_runs
    keys = {k for lab in labels for k in lab}
    return tuple(k for k in keys if len({json.dumps(lab.get(k)) for lab in labels}) == 1)


def run_folders(grid_root: Path) -> list[Path]:
    grid_root = Path(grid_root)
    if not grid_root.exists():
        return []
    runs = sorted(p for p in grid_root.iterdir() if p.is_dir() and (p / "config.yaml").exists())
    current = grid_root / "grid_runs.json"      # written by benchmarks.run: the grid's runs as last expanded
    if current.exists():                        # folders of an older expansion (changed config) are left out
        try:
            keep = set(json.loads(current.read_text()))
        except (ValueError, TypeError) as e:
            raise CorruptFileError(f"{current}: {_problem(e)}; delete it (benchmarks.run writes it again, "
                                   "and without it every run folder is reported)") from None
        runs = [p for p in runs if p.name in keep]
    return runs


def load_runs(grid_root: Path) -> pd.DataFrame:
    """One row per run: run_id, status, label columns, flattened config, first/last eval, last train row."""
    rows, const = [], constant_axes(grid_root)
    for run in run_folders(grid_root):
        try:
            rows.append(_run_row(run, const))
        except UnreadableRun as e:
            rows.append({"run_id": run.name, "status": "unreadable", "path": str(run), "unreadable": str(e)})
    return pd.DataFrame(rows)


def read_run(run: Path) -> tuple[dict, list, list, dict, dict | None]:
    """(config, eval rows, train rows, label, failed.json or None) of a run folder, or UnreadableRun.
    done.json is read too: a garbled marker does not make a run done. load_runs and load_curves both read
    through here, so a run left out of one is left out of the other."""
    cfg = read_file(run, "config.yaml", _config)
    evals = read_file(run, "eval.jsonl", read_jsonl)
    train = read_file(run, "metrics.jsonl", read_jsonl)
    lab = read_file(run, "label.json", read_label_file)
    read_file(run, "done.json", _json)
    fail = read_file(run, "failed.json", _json)
    return cfg, evals, train, lab, fail


def _run_row(run: Path, const: tuple[str, ...]) -> dict:
    cfg, evals, train, lab, fail = read_run(run)
    try:
        row = _row(run, const, cfg, evals, train, lab, fail)
    except (*READ_ERRORS, AttributeError) as e:   # a row of eval.jsonl / metrics.jsonl without its step
        raise UnreadableRun(f"eval.jsonl or metrics.jsonl: {_problem(e)}") from None
    row.update(_protocol_columns(read_file(run, "protocol.json", _json), evals))
    row["machine"] = _machine(run)
    stale = read_file(run, "stale.json", _json)
    row["stale"] = stale is not None
    row["stale_modules"] = ", ".join(stale.get("changed", [])) if stale else None
    return row


def _machine(run: Path) -> str | None:
    """Where the run trained (core/machine.py); a damaged machine.json says so and never hides the run's
    results (it describes, it does not score)."""
    path = Path(run) / MACHINE_FILE
    try:
        return machine_text(json.loads(path.read_text())) if path.exists() else None
    except (OSError, ValueError, TypeError):                 # JSONDecodeError is a ValueError
        return "unknown (machine.json unreadable)"


def _protocol_columns(protocol: dict | None, evals: list) -> dict:
    """protocol_id / protocol_tag of a run (benchmarks/evaluation/protocol.py); a run evaluated before protocols were
    recorded gets an "unrecorded" protocol keyed by its NFE, a run never evaluated none (None)."""
    if protocol is not None:
        return {"protocol_id": protocol_id(protocol), "protocol_tag": protocol_tag(protocol)}
    if not evals:
        return {"protocol_id": None, "protocol_tag": None}
    nfe = evals[-1].get("nfe")
    return {"protocol_id": f"unrecorded-nfe{nfe}",
            "protocol_tag": f"unrecorded (run evaluated before protocols were recorded) · NFE {nfe}"}


def _row(run: Path, const: tuple[str, ...], cfg: dict, evals: list, train: list, lab: dict,
         fail: dict | None) -> dict:
    row = {"run_id": run.name, "status": _status(run), "path": str(run),
           "method": cfg["method"]["name"], "backbone": cfg["backbone"]["name"], "seed": cfg["seed"],
           "steps": cfg["train"]["steps"], "step": train[-1]["step"] if train else 0}
    row.update({f"label.{k}": v for k, v in lab.items()})
    row["group"] = group_name(lab, const)
    if evals:
        row.update({f"first.{k}": evals[0].get(k) for k in METRICS})
        row.update({f"final.{k}": evals[-1].get(k) for k in METRICS})
        row["final.step"] = evals[-1]["step"]
    if train:
        row["loss"] = train[-1].get("loss")
        row["sec_per_step"] = train[-1].get("sec_per_step")
    if fail is not None:
        row["failure"] = fail.get("reason")
        row["failed_step"] = fail.get("step")
    row.update({f"cfg.{k}": v for k, v in pd.json_normalize(cfg).iloc[0].to_dict().items()})
    return row


def load_curves(grid_root: Path) -> pd.DataFrame:
    """Long table: one row per (run, eval step) with every eval metric and the run's labels."""
    rows, const = [], constant_axes(grid_root)
    for run in run_folders(grid_root):
        try:
            cfg, evals, _, lab, _ = read_run(run)
        except UnreadableRun:
            continue                            # listed by load_runs with its reason
        for ev in evals:
            rows.append({"run_id": run.name, "method": cfg["method"]["name"], "backbone": cfg["backbone"]["name"],
                         "seed": cfg["seed"], "group": group_name(lab, const),
                         **{f"label.{k}": v for k, v in lab.items()}, **ev})
    return pd.DataFrame(rows)
