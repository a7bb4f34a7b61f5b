"""The run folder: resolved config, metrics/eval JSONL, checkpoints, done marker (STYLE.md §6).

results/<grid>/<run_id>/
  config.yaml  metrics.jsonl  eval.jsonl  checkpoints/step_0000500.pt (+ .sha256)  samples/  done.json  failed.json
Checkpoints are written atomically (temp file + rename) with a sha256 beside them; a checkpoint whose
checksum does not match is skipped in favour of the previous one. They load with weights_only=True.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^step_(\d{7})\.pt$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file, ignoring a truncated last line (a job killed mid-write)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.samples_dir = self.path / "samples"

    # ---------------------------------------------------------------- markers
    @property
    def done_file(self) -> Path:
        return self.path / "done.json"

    @property
    def failed_file(self) -> Path:
        return self.path / "failed.json"

    def is_done(self) -> bool:
        return self.done_file.exists()

    def read_done(self) -> dict:
        return json.loads(self.done_file.read_text())

    def mark_done(self, payload: dict) -> None:
        atomic_write_text(self.done_file, json.dumps(payload, indent=2, sort_keys=True))

    def mark_failed(self, payload: dict) -> None:
        atomic_write_text(self.failed_file, json.dumps(payload, indent=2, sort_keys=True))

    def clear_failed(self) -> None:
        self.failed_file.unlink(missing_ok=True)

    # ---------------------------------------------------------------- config and logs
    def write_config(self, cfg: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))

    def read_config(self) -> dict:
        return OmegaConf.to_container(OmegaConf.load(self.path / "config.yaml"), resolve=True)  # type: ignore

    def append(self, name: str, row: dict) -> None:
        """Append one JSON line and flush it (metrics.jsonl, eval.jsonl)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / name, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()

    def rows(self, name: str) -> list[dict]:
        return read_jsonl(self.path / name)

    def truncate_after(self, name: str, step: int) -> None:
        """Drop rows logged after `step` (they are replayed identically after a resume)."""
        rows = [r for r in self.rows(name) if r.get("step", -1) <= step]
        atomic_write_text(self.path / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    # ---------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) sorted by the step in the file name (never by mtime)."""
        if not self.ckpt_dir.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int = 2) -> Path:
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        path = self.ckpt_dir / f"step_{step:07d}.pt"
        atomic_write_bytes(path, data)
        atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest())
        for _, old in self.checkpoints()[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".sha256").unlink(missing_ok=True)
        return path

    def valid_checkpoints(self) -> Iterator[tuple[int, Path]]:
        """Newest first, skipping files whose sha256 does not match (truncated or corrupted)."""
        for step, path in reversed(self.checkpoints()):
            digest = path.with_suffix(".sha256")
            if not digest.exists() or digest.read_text().strip() != sha256_file(path):
                log.warning("checkpoint %s fails its checksum; using an earlier one", path)
                continue
            yield step, path

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        for _, path in self.valid_checkpoints():
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - an unreadable file falls back to the previous one
                log.warning("checkpoint %s unreadable (%s); using an earlier one", path, e)
        return None
