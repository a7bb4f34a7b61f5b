"""Content-addressed cache folders shared by all runs of a grid, guarded by a file lock, verified by content.

`cached_dir(root, kind, key_obj, build)` returns <root>/<kind>-<hash>; the first caller builds into a
temporary folder and renames it into place (atomic), concurrent callers wait on the lock and reuse it.
A folder without its COMPLETE marker (a killed build) is rebuilt.

Verified by content. Before COMPLETE, a build writes MANIFEST.json: for every file of the folder its size,
its sha256 and a *quick digest* (sha256 over the size, the first 64 KiB, where a safetensors header lives,
and 32 evenly spaced 64 KiB blocks; a file under 2.1 MB is hashed whole). Every open of a finished folder
checks it (`check_folder`):
- quick (default): every listed file present with its size and quick digest, and no unlisted file. It reads
  ≈ 2 MiB per file whatever the file's size (docs/decisions.md has the measured cost).
- full: every byte against the sha256. Asked for with `SEMPRIOR_VERIFY_CACHE=full`, `verify="full"`, or
  inside `full_verification()`; chosen by itself after a crash: `benchmarks.execution.train.run_job` opens its
  caches inside `full_verification()` when the run resumes from a checkpoint (the one hook: the process
  that crashed may have been writing caches too), and a process that finds a stale `.<name>.building`
  folder (a killed build, its lock free) under a cache root verifies every folder of that root in full.
  A folder verified in full after a crash is not hashed again by the same process (remembered by its
  manifest's mtime); an explicit request (the argument or the environment) hashes every time.
A damaged folder is deleted and rebuilt under its lock by the caller that has its `build` (one warning
line naming the folder and what failed; a job that waited on the lock re-checks and reuses the rebuilt
folder); a read-only opener (`verify_dir`, e.g. a sharded cache written by benchmarks.extract) raises
core.errors.CorruptFileError naming the folder, what failed and the fix.

Folders built before manifests existed (COMPLETE, no MANIFEST.json) are *adopted*, not rebuilt: under the
lock every file is read in full, every safetensors file must parse with the length its header gives and
every JSON file must parse; then the manifest is written and the folder is used. Why: those folders
include GPU-hours of extracted latents and trained tokenizers, the older code trusted them without any
check, and a full read catches what breaks them in practice (truncation, a garbled header); a flipped
data byte before adoption cannot be told from the truth by any check without a record. A folder that
fails adoption is damaged (rebuilt or refused as above).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from core.config import ConfigError, stable_hash
from core.errors import CorruptFileError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
MANIFEST = "MANIFEST.json"
BLOCK = 64 * 1024          # bytes per sampled block (the head block holds any safetensors header we write)
SAMPLES = 32               # evenly spaced blocks after the head block
ENV = "SEMPRIOR_VERIFY_CACHE"
LEVELS = ("quick", "full")

_FULL = contextvars.ContextVar("semprior_full_verification", default=False)
_FULL_OK: set[tuple[str, int]] = set()       # (folder, manifest mtime_ns) verified in full by this process
_CRASHED_ROOTS: set[str] = set()             # roots where this process found a stale .building folder


def cache_key(kind: str, key_obj: Any) -> str:
    return f"{kind}-{stable_hash(key_obj)}"


# ----------------------------------------------------------------------------- digests
def sample_spans(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes the quick digest reads: the whole file when it is small, else the head
    block and SAMPLES blocks evenly spaced from right after it to the end (the last one ends at EOF)."""
    if size <= BLOCK * (SAMPLES + 1):
        return [(0, size)]
    last = size - BLOCK
    return [(0, BLOCK)] + [(BLOCK + (last - BLOCK) * i // (SAMPLES - 1), BLOCK) for i in range(SAMPLES)]


def quick_digest(path: Path, size: int) -> str:
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        for offset, length in sample_spans(size):
            f.seek(offset)
            h.update(f.read(length))
    return h.hexdigest()


def full_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def data_files(folder: Path) -> list[str]:
    """Every file of a cache folder (relative POSIX paths, sorted) except the marker and the manifest;
    `.nfs*` files (an NFS client's stand-ins for deleted open files) are not data."""
    folder = Path(folder)
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in (MARKER, MANIFEST) and not p.name.startswith(".nfs"):
            out.append(rel)
    return sorted(out)


def write_manifest(folder: Path) -> dict:
    """MANIFEST.json of a folder whose files are final: {file: {size, sha256, quick}} (atomic write)."""
    folder = Path(folder)
    files = {}
    for rel in data_files(folder):
        path = folder / rel
        size = path.stat().st_size
        files[rel] = {"size": size, "sha256": full_digest(path), "quick": quick_digest(path, size)}
    manifest = {"version": 1, "block": BLOCK, "samples": SAMPLES, "files": files}
    tmp = folder / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


class _Legacy(str):
    """check_folder's answer for a finished folder with no manifest (built by an older version)."""


LEGACY = _Legacy("no MANIFEST.json (built by an older version)")


def check_folder(folder: Path, level: str = "quick") -> str | None:
    """What is wrong with a finished cache folder (one phrase), None when it matches its manifest, or
    LEGACY when it has none. level: quick (sizes, quick digests, no unlisted file) or full (+ sha256)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return LEGACY
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if (manifest["block"], manifest["samples"]) != (BLOCK, SAMPLES):
            return f"{MANIFEST} was written with another sampling ({manifest['block']}, {manifest['samples']})"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    extra = sorted(set(data_files(folder)) - set(files))
    if extra:
        return f"unlisted file {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if not path.is_file():
            return f"missing file {rel}"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{rel} is {size} bytes, the manifest says {entry['size']} (size)"
        if quick_digest(path, size) != entry["quick"]:
            return f"{rel} fails its quick digest (content changed)"
        if level == "full" and full_digest(path) != entry["sha256"]:
            return f"{rel} fails its sha256 (content changed)"
    return None


def _legacy_problem(folder: Path) -> str | None:
    """Adoption of a manifest-less folder: every safetensors file parses with the length its header
    gives, every JSON file parses (the manifest written afterwards reads every byte)."""
    for rel in data_files(folder):
        path = folder / rel
        try:
            if rel.endswith(".safetensors"):
                size = path.stat().st_size
                with open(path, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
                if not isinstance(header, dict):
                    return f"{rel} has no readable safetensors header (truncated or garbled)"
                end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
                if size != 8 + n + end:
                    return f"{rel} is {size} bytes, its header says {8 + n + end} (size)"
            elif rel.endswith(".json"):
                json.loads(path.read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{rel} does not parse ({type(e).__name__})"
    return None


def _adopt(folder: Path) -> str | None:
    """Check a legacy folder in full and write its manifest (caller holds the lock); the problem, or None."""
    problem = _legacy_problem(folder)
    if problem is not None:
        return problem
    try:
        write_manifest(folder)
    except OSError as e:                      # a read-only copy: usable, but checked again next time
        log.warning("cache %s: parsed in full, but its manifest cannot be written (%s)", folder, e)
        return None
    log.info("cache %s: built by an older version; read in full and adopted (manifest written)", folder)
    _FULL_OK.add(_full_key(folder))
    return None


# ----------------------------------------------------------------------------- verification levels
@contextlib.contextmanager
def full_verification(on: bool = True) -> Iterator[None]:
    """Inside this block (when `on`), every cache folder opened in this thread is verified in full."""
    token = _FULL.set(_FULL.get() or on)
    try:
        yield
    finally:
        _FULL.reset(token)


def verify_level(requested: str | None = None, root: Path | None = None) -> str:
    """The level of a check: the argument, else full inside full_verification() or after a crash seen under
    `root`, else $SEMPRIOR_VERIFY_CACHE (quick | full, default quick)."""
    env = os.environ.get(ENV, "") or "quick"
    for value, where in ((requested, "verify"), (env, ENV)):
        if value is not None and value not in LEVELS:
            raise ConfigError(f"{where}={value!r}: choose one of {', '.join(LEVELS)}")
    if requested is not None:
        return requested
    if _FULL.get() or (root is not None and _crash_seen(Path(root))):
        return "full"
    return env


def _crash_seen(root: Path) -> bool:
    """Whether `root` holds (or held, earlier in this process) a stale `.<name>.building` folder: a build
    killed mid-way, its lock free. One directory listing per open; a live build's lock is busy."""
    key = str(root.resolve())
    if key not in _CRASHED_ROOTS:
        for tmp in root.glob(".*.building"):
            name = tmp.name[1:-len(".building")]
            try:
                with FileLock(str(root / f".{name}.lock"), timeout=0):
                    stale = tmp.exists()
            except Timeout:                   # a live build in another process
                continue
            if stale:
                log.warning("cache root %s: stale build folder %s (a killed build); verifying its caches in full",
                            root, tmp.name)
                _CRASHED_ROOTS.add(key)
                break
    return key in _CRASHED_ROOTS


def _full_key(folder: Path) -> tuple[str, int]:
    try:
        return str(Path(folder).resolve()), (Path(folder) / MANIFEST).stat().st_mtime_ns
    except OSError:
        return str(folder), -1


def _check(folder: Path, level: str, memo: bool = False) -> str | None:
    """check_folder; with `memo`, skipping the sha256 pass for a folder this process verified in full."""
    if memo and level == "full" and _full_key(folder) in _FULL_OK:
        level = "quick"
    problem = check_folder(folder, level)
    if problem is None and level == "full":
        _FULL_OK.add(_full_key(folder))
    return problem


def _implicit(verify: str | None) -> bool:
    """Whether a full level would come from full_verification() or a crash, not from the user's request."""
    return verify is None and os.environ.get(ENV, "") != "full"


def _fix(folder: Path) -> str:
    return f"delete {folder} and rerun to rebuild it"


def verify_dir(folder: str | Path, verify: str | None = None) -> Path:
    """A finished cache folder opened for reading only (nothing here can rebuild it): checked against its
    manifest (a legacy one adopted under its lock); CorruptFileError naming it, what failed and the fix."""
    folder = Path(folder)
    level, memo = verify_level(verify, folder.parent), _implicit(verify)
    problem = _check(folder, level, memo)
    if problem is LEGACY:
        with FileLock(str(folder.parent / f".{folder.name}.lock")):
            problem = _check(folder, level, memo)
            if problem is LEGACY:
                problem = _adopt(folder)
    if problem is not None:
        raise CorruptFileError(f"cache {folder} is damaged: {problem}; {_fix(folder)}")
    return folder


# ----------------------------------------------------------------------------- the cache folder
def cached_dir(root: str | Path, kind: str, key_obj: Any, build: Callable[[Path], None], *,
               verify: str | None = None) -> Path:
    """Return the finished, verified cache folder for (kind, key_obj), building it once under a lock.
    verify: quick | full | None (verify_level's choice)."""
    root = Path(root)
    level, memo = verify_level(verify, root), _implicit(verify)   # a bad setting is refused before anything is made
    root.mkdir(parents=True, exist_ok=True)
    name = cache_key(kind, key_obj)
    final = root / name
    if (final / MARKER).exists() and _check(final, level, memo) is None:
        return final
    with FileLock(str(root / f".{name}.lock")):
        if (final / MARKER).exists():          # another job finished (or rebuilt) it while we waited
            problem = _check(final, level, memo)
            if problem is LEGACY:
                problem = _adopt(final)
            if problem is None:
                return final
            log.warning("cache %s is damaged: %s; deleting it and rebuilding", final, problem)
            _discard(final)
        tmp = root / f".{name}.building"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.time()
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(key_obj, indent=2, sort_keys=True, default=str))
        write_manifest(tmp)
        (tmp / MARKER).write_text(f"{time.time() - t0:.1f}s\n")
        shutil.rmtree(final, ignore_errors=True)  # an incomplete earlier attempt
        tmp.rename(final)
        _FULL_OK.add(_full_key(final))          # hashed just now
    return final


def _discard(folder: Path) -> None:
    """Delete a damaged folder: renamed first, so no reader sees it half deleted (its name then has no
    COMPLETE, and readers wait on the lock we hold)."""
    trash = folder.with_name(f".{folder.name}.damaged{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- reading files of a cache
def read_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """safetensors.torch.load_file of a file in a cache folder; a truncated or garbled file raises
    CorruptFileError naming it and the fix (never a bare SafetensorError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorruptFileError(f"{path}: not a readable safetensors file ({what}); {_fix(path.parent)}") from None


# ----------------------------------------------------------------------------- command line
def cli_spec():
    """The command line of `python -m core.cache` (benchmarks.config.cli.Spec; imported here, not at the top: core
    does not depend on benchmarks)."""
    from benchmarks.config.cli import Spec

    return Spec(
        prog="python -m core.cache",
        purpose="Check finished cache folders against their manifests, with the time each took; nothing is rebuilt "
                "or written. quick (default): every file present with its size and quick digest; full: every byte "
                "against its sha256. Exit status 2 when a folder fails its check or has no COMPLETE marker.",
        positional="a check level (quick or full; default quick), then one or more cache folders",
        positional_metavar="[quick|full] FOLDER...",
        examples=("python -m core.cache cache/latents-*", "python -m core.cache full cache/*"),
    )


def _check_folders(argv: list[str]) -> int:
    from benchmarks.config.cli import parse
    from core.config import ConfigError

    args = parse(cli_spec(), argv).positional
    level = args.pop(0) if args and args[0] in LEVELS else "quick"
    if not args:
        raise ConfigError("give cache folders to check, e.g. python -m core.cache full cache/latents-*")
    bad = 0
    for folder in map(Path, args):
        t0 = time.perf_counter()
        problem = check_folder(folder, level) if (folder / MARKER).exists() else "no COMPLETE marker"
        sec = time.perf_counter() - t0
        size = sum((folder / f).stat().st_size for f in data_files(folder)) if folder.is_dir() else 0
        print(f"{folder}: {level} check {'ok' if problem is None else problem} ({size / 2**20:.1f} MiB, {sec:.3f} s)")
        bad += problem is not None
    return 2 if bad else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m core.cache [quick|full] FOLDER...` (`--help`): check finished cache folders against their
    manifests (nothing is rebuilt or written; a folder without a manifest is reported), with the time each took."""
    from benchmarks.config.cli import command

    return command(_check_folders, spec=cli_spec())(argv)


if __name__ == "__main__":
    raise SystemExit(main())
