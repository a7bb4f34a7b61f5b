"""What machine a run ran on: CPU model, cores, torch version, accelerator. Recorded in the run folder
(`machine.json`, one entry per machine the run trained on: a resume elsewhere appends one), because floats,
and so curves and FDs, are bit-identical only on the same machine type (docs/results.md, "Reproducibility")."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

MACHINE_FILE = "machine.json"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor(), else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "accelerator": torch.cuda.get_device_name(device) if device.type == "cuda" else "none"}


def record_machine(run_dir: Path, device: torch.device | str = "cpu") -> list[dict]:
    """Append this machine to `<run_dir>/machine.json` unless it is already the last entry; returns the list.
    A damaged file is replaced by this machine alone (it holds a description, never a result)."""
    path = Path(run_dir) / MACHINE_FILE
    try:
        seen = json.loads(path.read_text())
        seen = seen if isinstance(seen, list) and all(isinstance(m, dict) for m in seen) else []
    except (OSError, ValueError):
        seen = []
    me = describe(device)
    if not seen or seen[-1] != me:
        seen.append(me)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(seen, indent=2))
        os.replace(tmp, path)
    return seen


def machine_text(entries: list[dict] | None) -> str | None:
    """"<cpu> (<cores> cores[, <accelerator>])" per machine, joined by " then "; None when nothing is recorded."""
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise TypeError(f"machine.json holds a {type(entries).__name__}, not a list")

    def one(m: dict) -> str:
        acc = m.get("accelerator")
        return f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores" + (f", {acc})" if acc and acc != "none" else ")")
    return " then ".join(one(m) for m in entries if isinstance(m, dict)) or None
