"""The run folder: resolved config, metrics/eval JSONL, checkpoints, done marker (docs/architecture.md, "Code style").

results/<grid>/<run_id>/
  config.yaml  metrics.jsonl  eval.jsonl  checkpoints/step_0000500.pt (+ .sha256)  samples/  done.json  failed.json
Checkpoints are written atomically (temp file `.<name>.tmp<pid>` + fsync + rename) with a sha256 beside them;
torch.save streams into the temp file and the sha256 is computed on the way, so a checkpoint (Adam state
included) is never held in host memory a second time. A checkpoint whose checksum does not match is skipped
in favour of the previous one. They load with weights_only=True. A temp file left by a killed write is
removed when the run resumes (remove_stale_tmp).

metrics.jsonl and eval.jsonl are append-only, one JSON object per line. A job killed mid-append leaves at
most a torn LAST line (no trailing newline, or not parseable): readers drop it and a resume rewrites the
file without it. Any other bad line is damage, not a killed write: read_jsonl raises CorruptFileError with
the file and line, and nothing rewrites the file (so no row is ever lost silently).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch
from omegaconf import OmegaConf

from core.errors import CorruptFileError

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^step_(\d{7})\.pt$")
_TMP = re.compile(r"^\..+\.tmp(\d+)$")       # what _tmp_path names: the atomic writes' file before its rename


def _tmp_path(path: Path) -> Path:
    """Where an atomic write of `path` goes before its rename (`.<name>.tmp<pid>`, matched by _TMP)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _HashingWriter:
    """A write-only binary file that feeds every chunk to a sha256 on its way to the real file. torch.save
    writes a buffer through write() and flush() only, in order and never seeking back, so the digest is
    that of the file's bytes. A tensor's data arrives as a view of its (CPU) storage: hashed and written
    without a copy."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.error: BaseException | None = None

    def write(self, chunk: bytes | memoryview) -> int:
        self.sha256.update(chunk)
        try:
            return self._f.write(chunk)     # a buffered file writes it all or raises (never a short write)
        except BaseException as e:
            self.error = e                  # torch.save's exit replaces it with "unexpected pos": kept to re-raise
            raise

    def flush(self) -> None:
        self._f.flush()


def atomic_write_stream(path: Path, write: Callable[[BinaryIO], None]) -> str:
    """Write `path` by calling `write(file)` on a temp file beside it, fsync, then rename; returns the sha256
    (hex) of the bytes written. Memory use does not grow with the file's size. If `write` raises, the temp
    file is removed and `path` is untouched; a killed process leaves the temp file to remove_stale_tmp."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    out = None
    try:
        with open(tmp, "wb") as f:
            out = _HashingWriter(f)
            write(out)                  # type: ignore[arg-type]  (write/flush is all torch.save needs)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if out is not None and out.error is not None and e is not out.error:
            raise out.error from None   # the file's own error (a full disk), as the in-memory write raised it
        raise
    os.replace(tmp, path)
    return out.sha256.hexdigest()


def _pid_alive(pid: int) -> bool:
    """This process, or another one running on this machine with that pid (it may still be writing)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:              # exists, owned by another user
        return True
    return True


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    """The rows of an append-only JSONL file, without a torn last line (a job killed mid-append).

    The last line is torn when it has no trailing newline or does not parse as a JSON object; it is
    dropped. Any other line that does not parse is damage: CorruptFileError names the file and line."""
    return _parse_jsonl(Path(path))[0]


def _parse_jsonl(path: Path) -> tuple[list[dict], bool]:
    """(rows, whether a torn last line was dropped)."""
    if not path.exists():
        return [], False
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop() != b""            # the bytes after the last newline: a write that did not finish
    rows = []
    for i, line in enumerate(lines, start=1):
        row = _row(line)
        if row is None and i == len(lines) and not torn:
            return rows, True            # a complete-looking but unparseable last line: torn as well
        if row is None:
            raise CorruptFileError(
                f"{path}:{i}: line {i} of {len(lines)} is not a JSON object ({line[:40]!r}), and rows follow "
                f"it, so this is damage, not a killed write; delete the run folder to retrain it, or repair "
                f"line {i}")
        rows.append(row)
    return rows, torn


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return row if isinstance(row, dict) else None


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

    def append(self, name: str, row: dict) -> None:
        """Append one JSON line and flush it (metrics.jsonl, eval.jsonl)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / name, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()

    def rows(self, name: str) -> list[dict]:
        return read_jsonl(self.path / name)

    def truncate_after(self, name: str, step: int) -> None:
        """Drop rows logged after `step` (they are replayed identically after a resume) and a torn last
        line. A damaged row elsewhere raises CorruptFileError before anything is written; a file with
        nothing to drop is left as it is."""
        rows, torn = _parse_jsonl(self.path / name)
        keep = [r for r in rows if r.get("step", -1) <= step]
        if torn or len(keep) < len(rows):
            atomic_write_text(self.path / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))

    def remove_stale_tmp(self) -> list[Path]:
        """Delete temp files of writes that never reached their rename (`.<name>.tmp<pid>`, in the run
        folder and checkpoints/): only while this process is the folder's one writer (a resume), and never
        one of this process or of another process alive on this machine. Returns what was removed."""
        removed = []
        for folder in (self.path, self.ckpt_dir):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                m = _TMP.match(p.name)
                if m and p.is_file() and not _pid_alive(int(m.group(1))):
                    p.unlink(missing_ok=True)
                    removed.append(p)
        if removed:
            log.info("removed %d temp file(s) of killed writes: %s", len(removed), ", ".join(p.name for p in removed))
        return removed

    # ---------------------------------------------------------------- checkpoints
    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) sorted by the step in the file name (never by mtime)."""
        if not self.ckpt_dir.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_dir.iterdir() if (m := _CKPT.match(p.name))]
        return sorted(found)

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int = 2) -> Path:
        """checkpoints/step_<step>.pt and its .sha256 (hex digest, no newline), then prune to the newest
        `keep`. The .pt is renamed into place before its .sha256 is written: a kill between the two leaves a
        checkpoint without a digest, which valid_checkpoints skips."""
        path = self.ckpt_dir / f"step_{step:07d}.pt"
        # torch.save to a file object (not a path) writes the same bytes it wrote into the BytesIO before
        digest = atomic_write_stream(path, lambda f: torch.save(state, f))
        atomic_write_text(path.with_suffix(".sha256"), digest)
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
