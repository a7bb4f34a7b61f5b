"""Code in a run's identity: a fingerprint of the source of every component a run uses.

A run's id hashes its config only (core/config.py run_hash); the code that turns the config into numbers
is fingerprinted here and recorded in the run folder (`fingerprint.json`) when the run starts. On a rerun,
benchmarks.run compares the recorded fingerprint with the code now on disk: a run whose components'
source changed is *stale* (docs/decisions.md, "Code in the run's identity").

What is fingerprinted: the module that defines each registered component the run names (schedule, loss,
sampler, eval sampler, guidance, latent builder, backbone, every artifact class: tokenizers, encoders, the
FD network), the modules of their base classes, and, for a component registered as a function (a preset
such as a backbone size), the modules of the classes and functions its code names. torch and the Python
standard library are left out: they are the environment, not the suite's or a plugin's code. A module is
fingerprinted by the sha1 of its source file's bytes, read from disk (so a file edited after it was
imported counts as changed).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Any, Iterable

from benchmarks.data.prepare import artifact_order, eval_kinds, latent_requires
from core.registry import BACKBONES, ENCODERS, GUIDANCE, LATENTS, LOSSES, SAMPLERS, SCHEDULES
from core.rundir import atomic_write_text

FINGERPRINT_FILE = "fingerprint.json"
EXTERNAL_ROOTS = frozenset({"torch", "builtins", "typing_extensions", *sys.stdlib_module_names})


def _external(module: str) -> bool:
    """True for modules that are the environment (torch, the standard library), not component code."""
    return module.split(".", 1)[0] in EXTERNAL_ROOTS


def modules_of(obj: Any) -> set[str]:
    """Names of the modules whose source defines `obj`: a class's own module and its base classes'
    (the MRO), a function's module plus the modules of the classes / functions its code refers to by a
    global name (one level: a preset function `return DiT(...)` brings in DiT's module and its bases)."""
    out: set[str] = set()
    if isinstance(obj, type):
        for klass in obj.__mro__:
            mod = getattr(klass, "__module__", None)
            if mod and not _external(mod):
                out.add(mod)
        return out
    mod = getattr(obj, "__module__", None)
    if mod and not _external(mod):
        out.add(mod)
    code, glob = getattr(obj, "__code__", None), getattr(obj, "__globals__", {})
    for name in (code.co_names if isinstance(code, types.CodeType) else ()):
        ref = glob.get(name)
        if isinstance(ref, type):
            out |= modules_of(ref)
        elif inspect.isfunction(ref) and ref.__module__ and not _external(ref.__module__):
            out.add(ref.__module__)
    return out


@functools.lru_cache(maxsize=None)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:16]


def module_hash(name: str) -> str:
    """sha1 (16 hex) of the module's source file as it is on disk now; "no-source" for a module without
    a file (built into the interpreter), "missing" when its file is gone."""
    mod = sys.modules.get(name)
    path = getattr(mod, "__file__", None) if mod is not None else None
    if path is None:
        return "no-source"
    try:
        st = Path(path).stat()
        return _file_hash(str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return "missing"


def _entry(registry: Any, name: Any) -> Any | None:
    """The registered class or function, or None for a name that is not registered (validated elsewhere)."""
    try:
        return registry.get(str(name)) if name is not None else None
    except KeyError:
        return None


def run_components(cfg: dict) -> dict[str, Any]:
    """role -> registered class or function, for every component a resolved run config uses
    (registries from core.registry; plugins must be loaded first)."""
    m, e = cfg["method"], cfg["eval"]
    found: dict[str, Any] = {
        "schedule": _entry(SCHEDULES, (m.get("schedule") or {}).get("name")),
        "loss": _entry(LOSSES, (m.get("loss") or {}).get("name")),
        "sampler": _entry(SAMPLERS, (m.get("sampler") or {}).get("name")),
        "eval.sampler": _entry(SAMPLERS, (e.get("sampler") or {}).get("name")),
        "guidance": _entry(GUIDANCE, (m.get("guidance") or {}).get("name")),
        "eval.guidance": _entry(GUIDANCE, (e.get("guidance") or {}).get("name")),
        "latent": _entry(LATENTS, (m.get("latent") or {}).get("name")),
        "backbone": _entry(BACKBONES, cfg["backbone"].get("name")),
    }
    for kind in _artifact_kinds(cfg):
        use = (cfg.get("prepare", {}).get(kind) or {}).get("use", kind)
        found[f"artifact {kind}"] = _entry(ENCODERS, use)
    return {k: v for k, v in found.items() if v is not None}


def _artifact_kinds(cfg: dict) -> list[str]:
    """Every artifact slot the run builds (latent tokenizers and encoders, the FD network) in dependency order."""
    try:
        return artifact_order(latent_requires(cfg["method"]["latent"]) + eval_kinds(cfg), cfg.get("prepare"))
    except (KeyError, ValueError):
        return sorted(cfg.get("prepare") or {})


def fingerprint(cfg: dict) -> dict:
    """{"modules": {module name: source sha1}, "roles": {role: [modules]}, "hash": sha1 of the modules}
    for the components of a resolved run config (benchmarks.config.plugins.load_all() must have run)."""
    roles = {role: sorted(modules_of(obj)) for role, obj in run_components(cfg).items()}
    modules = {name: module_hash(name) for name in sorted({m for ms in roles.values() for m in ms})}
    digest = hashlib.sha1(json.dumps(modules, sort_keys=True).encode()).hexdigest()[:16]
    return {"hash": digest, "modules": modules, "roles": roles}


def changed_modules(recorded: dict, current: dict) -> list[str]:
    """Modules whose source differs between two fingerprints, or that only one of them uses (sorted)."""
    a, b = recorded.get("modules", {}), current.get("modules", {})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def read_fingerprint(run_dir: Path) -> dict | None:
    """The fingerprint recorded in a run folder, or None (a run that never started, or one made before
    fingerprints were recorded). A damaged file reads as an empty fingerprint (every module changed)."""
    path = Path(run_dir) / FINGERPRINT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"hash": "unreadable", "modules": {}}
    return data if isinstance(data, dict) else {"hash": "unreadable", "modules": {}}


def record_fingerprint(run_dir: Path, cfg: dict) -> dict:
    """Write fingerprint.json when the run starts (kept as it is when the run resumes: a run reused after
    a code change keeps the fingerprint of the code it started with). Returns the recorded fingerprint."""
    old = read_fingerprint(run_dir)
    if old is not None:
        return old
    fp = fingerprint(cfg)
    atomic_write_text(Path(run_dir) / FINGERPRINT_FILE, json.dumps(fp, indent=2, sort_keys=True))
    return fp


def stale_modules(run_dir: Path, cfg: dict) -> list[str] | None:
    """None when the run's recorded fingerprint matches the code now (or none is recorded), else the
    changed module names."""
    old = read_fingerprint(run_dir)
    if old is None:
        return None
    now = fingerprint(cfg)
    if old.get("hash") == now["hash"]:
        return None
    return changed_modules(old, now) or ["(fingerprint file)"]


def describe(modules: Iterable[str], limit: int = 6) -> str:
    mods = list(modules)
    return ", ".join(mods[:limit]) + (f" and {len(mods) - limit} more" if len(mods) > limit else "")
