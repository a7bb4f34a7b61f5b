"""Content-addressed cache folders shared by all runs of a grid, guarded by a file lock.

`cached_dir(root, kind, key_obj, build)` returns <root>/<kind>-<hash>; the first caller builds into a
temporary folder and renames it into place (atomic), concurrent callers wait on the lock and reuse it.
A folder without its COMPLETE marker (a killed build) is rebuilt.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from core.config import stable_hash

MARKER = "COMPLETE"


def cache_key(kind: str, key_obj: Any) -> str:
    return f"{kind}-{stable_hash(key_obj)}"


def cached_dir(root: str | Path, kind: str, key_obj: Any, build: Callable[[Path], None]) -> Path:
    """Return the finished cache folder for (kind, key_obj), building it once under a lock."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = cache_key(kind, key_obj)
    final = root / name
    if (final / MARKER).exists():
        return final
    with FileLock(str(root / f".{name}.lock")):
        if (final / MARKER).exists():          # another job finished it while we waited
            return final
        tmp = root / f".{name}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.time()
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(key_obj, indent=2, sort_keys=True, default=str))
        (tmp / MARKER).write_text(f"{time.time() - t0:.1f}s\n")
        shutil.rmtree(final, ignore_errors=True)  # an incomplete earlier attempt
        tmp.rename(final)
    return final
