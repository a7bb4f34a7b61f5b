"""Stale runs: a finished or partial run whose components' source changed since it started.

benchmarks.run calls `handle_stale` before anything is written: each run folder's recorded fingerprint
(benchmarks/execution/fingerprint.py, written when the run starts) is compared with the code now on disk. Policy `stale=`:
  error (default) - stop with a message listing the stale runs, the changed modules and the two choices;
  rerun           - move each stale folder aside to `<run>.stale-<UTC time>` and train it again;
  keep            - reuse them; `stale.json` in the folder makes the report mark them (†).
A run that is no longer stale (the code was changed back) loses its stale.json.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from benchmarks.config.grid import Grid
from benchmarks.execution.launch import run_dirs
from core import runlock
from core.config import ConfigError
from benchmarks.execution.fingerprint import describe, read_fingerprint, stale_modules
from core.rundir import atomic_write_text

log = logging.getLogger("benchmarks.run")
POLICIES = ("error", "rerun", "keep")
STALE_FILE = "stale.json"


def find_stale(grid: Grid, results: Path) -> dict[str, tuple[Path, list[str]]]:
    """run_id -> (run folder, changed modules) for every run of the grid whose recorded fingerprint differs
    from the code now (runs never started, or made before fingerprints were recorded, are not stale)."""
    out = {}
    for spec, d in run_dirs(grid, results):
        changed = stale_modules(d, spec.cfg) if d.exists() else None
        if changed is not None:
            out[spec.run_id] = (d, changed)
    return out


def stale_message(grid: Grid, stale: dict[str, tuple[Path, list[str]]]) -> str:
    runs = "; ".join(f"{rid} (changed: {describe(mods)})" for rid, (_, mods) in stale.items())
    return (f"grid {grid.name!r}: {len(stale)} run(s) were made with other code than the source now on disk "
            f"(stale): {runs}. Choose stale=rerun (move each aside to <run>.stale-<UTC time> and train it again) "
            f"or stale=keep (reuse them as they are; the report marks them stale)")


def handle_stale(grid: Grid, results: Path, policy: str | None) -> dict[str, tuple[Path, list[str]]]:
    """Apply the stale= policy (see the module docstring); returns the stale runs found."""
    policy = policy or "error"
    if policy not in POLICIES:
        raise ConfigError(f"stale={policy!r}: unknown; valid: {', '.join(POLICIES)}")
    stale = find_stale(grid, results)
    for _, d in run_dirs(grid, results):
        if d.name not in stale and (d / STALE_FILE).exists():
            (d / STALE_FILE).unlink()                  # the code matches again
    if not stale:
        return stale
    if policy == "error":
        raise ConfigError(stale_message(grid, stale))
    held = [rid for rid, (d, _) in stale.items() if runlock.holder(d) is not None]
    if held and policy == "rerun":
        raise ConfigError(f"stale run(s) {', '.join(held)} are held by a running process; stop it first, then "
                          "rerun with stale=rerun")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for rid, (d, mods) in stale.items():
        if policy == "rerun":
            target = d.with_name(f"{d.name}.stale-{stamp}")
            d.rename(target)
            log.warning("stale run %s (changed: %s) moved to %s; it trains again", rid, describe(mods), target.name)
        else:
            old = read_fingerprint(d) or {}
            atomic_write_text(d / STALE_FILE, json.dumps({"changed": mods, "recorded": old.get("hash"),
                                                          "kept_at": stamp}, indent=2))
            log.warning("stale run %s (changed: %s) kept (stale=keep); the report marks it", rid, describe(mods))
    return stale
