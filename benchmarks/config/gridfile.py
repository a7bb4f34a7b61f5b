"""Grid and config files: where presets, profiles and grids are found (the package's configs and
SEMPRIOR_CONFIG_PATH), a grid given by name or by path, its schema checked with `<file>:<line>: <key>`
errors (docs/grids.md), and the copy of the grid file kept in its results folder. benchmarks/config/grid.py
expands what this module loads into run configs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from core.config import ConfigError, load_config_yaml
from core.rundir import atomic_write_text

if TYPE_CHECKING:
    from benchmarks.config.grid import Grid

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
GRID_KEYS = {"description", "profile", "axes", "overrides", "baseline", "sweep", "by_profile", "allow_mixed_eval"}


def config_roots() -> list[Path]:
    """The package's configs plus any folders in SEMPRIOR_CONFIG_PATH (plugins' presets and grids);
    a folder earlier in the path wins over later ones and over the package's own."""
    extra = [Path(p) for p in os.environ.get("SEMPRIOR_CONFIG_PATH", "").split(os.pathsep) if p]
    return [*extra, CONFIG_ROOT]


def available(kind: str) -> list[str]:
    return sorted({p.stem for root in config_roots() for p in (root / kind).glob("*.yaml")})


def find_yaml(kind: str, name: str) -> Path | None:
    for root in config_roots():
        if (root / kind / f"{name}.yaml").exists():
            return root / kind / f"{name}.yaml"
    return None


def load_yaml(kind: str, name: str) -> dict:
    """configs/<kind>/<name>.yaml with the safe loader; unknown names list the valid ones."""
    path = find_yaml(kind, name)
    if path is None:
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(available(kind))}")
    data = load_config_yaml(path, f"{kind} file")   # one line for syntax errors, duplicate keys, binary files
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping (key: value lines) at the top level, got a "
                          f"{type(data).__name__}")
    return data


def dotlist(where: str, items: Any) -> list[str]:
    """A list of "key=value" strings (grid overrides, a preset's per-profile values), checked so that a
    string or a mapping in its place fails here in one line rather than inside OmegaConf."""
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(x, str) and "=" in x and x.split("=", 1)[0].strip()
                                              for x in items):
        raise ConfigError(f"{where} must be a list of \"key=value\" strings (e.g. [\"train.steps=2000\"]), "
                          f"got {items!r}")
    return list(items)


# ---------------------------------------------------------------------------------------------------
# Grid files: a name or a path, the schema (docs/grids.md) checked with file:line
# ---------------------------------------------------------------------------------------------------

def is_grid_path(arg: str) -> bool:
    """grid=<arg> names a file (not a grid under the config folders): it ends in .yaml/.yml or has a '/'."""
    return arg.endswith((".yaml", ".yml")) or "/" in arg or os.sep in arg


def grid_source(arg: str) -> tuple[str, Path]:
    """(grid name, its YAML file) for grid=<arg>: a path (the name is the file's stem) or a name looked up
    under SEMPRIOR_CONFIG_PATH and benchmarks/configs/grid/."""
    if not str(arg).strip():
        raise ConfigError("grid= is empty; give a grid name (e.g. grid=smoke) or a grid file (grid=path/to/grid.yaml)")
    if is_grid_path(arg):
        path = Path(arg).expanduser()
        if path.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"grid={arg}: a grid file must end in .yaml or .yml (a name has no '/': "
                              f"valid names: {', '.join(available('grid'))})")
        if not path.is_file():
            raise ConfigError(f"grid file {arg} not found ({path.resolve()}); give an existing .yaml file or a grid "
                              f"name ({', '.join(available('grid'))})")
        return path.stem, path.resolve()
    path = find_yaml("grid", arg)
    if path is None:
        raise ConfigError(f"unknown grid {arg!r}; valid: {', '.join(available('grid'))} (or a path to a grid file, "
                          "e.g. grid=path/to/grid.yaml)")
    return arg, path


def grid_source_name(arg: str) -> str:
    """The grid's name (its results folder) for grid=<arg>: a file's stem, or the name itself."""
    return Path(arg).stem if is_grid_path(arg) else arg


GRID_COPY = "grid.yaml"                # results/<grid>/grid.yaml: the grid file the runs were made from
GRID_SOURCE = "grid_source.json"       # results/<grid>/grid_source.json: where it came from, and its sha1


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def check_grid_folder(grid: Grid, results: Path) -> None:
    """Two different grid files with the same stem would share results/<stem>/: refused, unless the file
    is the one the folder was made from (same path: an edited grid) or has the same content."""
    src = Path(results) / grid.name / GRID_SOURCE
    if grid.source is None or not src.exists():
        return
    try:
        old = json.loads(src.read_text())
    except (OSError, ValueError):
        return                                           # damaged: record_grid_file writes it again
    if not isinstance(old, dict) or old.get("path") == str(grid.source):
        return
    if old.get("sha1") == _sha1(grid.source.read_bytes()):
        return
    raise ConfigError(f"{src.parent} holds the runs of grid file {old.get('path')}, and {grid.source} is another file "
                      f"with the same name {grid.name!r} and other content: give this grid its own results folder "
                      f"(results=OTHER_DIR) or rename the file; to adopt it for this folder on purpose, delete {src}")


def record_grid_file(grid: Grid, results: Path) -> None:
    """Copy the grid file used into results/<grid>/grid.yaml (benchmarks.report reads the description,
    baseline and sweep from it, with or without SEMPRIOR_CONFIG_PATH) and note where it came from."""
    if grid.source is None:
        return
    folder = Path(results) / grid.name
    folder.mkdir(parents=True, exist_ok=True)
    data = grid.source.read_bytes()
    atomic_write_text(folder / GRID_COPY, data.decode("utf-8"))
    atomic_write_text(folder / GRID_SOURCE, json.dumps({"path": str(grid.source), "sha1": _sha1(data)}, indent=2))


def key_lines(path: Path) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in a YAML file (mappings only; {} when it cannot be parsed)."""
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out.setdefault(key, k.start_mark.line + 1)
                walk(v, key + ".")

    try:
        walk(yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader), "")
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return out


class _Where:
    """Names a key of a grid file as `<file>:<line>: <key>` for error messages."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, key_lines(path)

    def __call__(self, key: str) -> str:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):                 # the key, else its nearest parent that has a line
            line = self.lines.get(".".join(parts[:n]))
            if line is not None:
                return f"{self.path}:{line}: {key}"
        return f"{self.path}: {key}"


GRID_TYPES = {"description": "a string", "profile": "a profile name", "axes": "a mapping of key: [values]",
              "overrides": 'a list of "key=value" strings', "baseline": "a method name of the method axis",
              "sweep": "an axis key", "by_profile": "a mapping of profile name: {axes: ..., overrides: [...]}",
              "allow_mixed_eval": "true or false"}


def load_grid(arg: str) -> tuple[str, Path, dict]:
    """(name, file, contents) of grid=<arg>, the contents checked against the grid schema (validate_grid)."""
    name, path = grid_source(arg)
    data = load_config_yaml(path, "grid file")
    if data is None:
        raise ConfigError(f"{path}: the grid file is empty; it needs at least axes: (docs/grids.md)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping (key: value lines) at the top level, got a "
                          f"{type(data).__name__} (docs/grids.md)")
    validate_grid(data, path)
    return name, path, data


def _axes_ok(where: str, axes: Any) -> None:
    if axes is None:
        return
    if not isinstance(axes, dict):
        raise ConfigError(f"{where} must be a mapping of key: [values], got {axes!r} (docs/grids.md)")


def validate_grid(g: dict, path: Path) -> None:
    """The grid schema (docs/grids.md): known keys, each of its type, baseline among the method axis
    values, sweep an axis key. Errors name the file, the line and the key."""
    at = _Where(path)
    unknown = sorted(set(g) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"{at(str(unknown[0]))}: unknown grid key; valid: {', '.join(sorted(GRID_KEYS))} "
                          "(docs/grids.md)")
    for key in ("description", "profile", "baseline", "sweep"):
        if g.get(key) is not None and not isinstance(g[key], str):
            raise ConfigError(f"{at(key)}: must be {GRID_TYPES[key]}, got {g[key]!r}")
    if g.get("allow_mixed_eval") is not None and not isinstance(g["allow_mixed_eval"], bool):
        raise ConfigError(f"{at('allow_mixed_eval')}: must be {GRID_TYPES['allow_mixed_eval']}, got {g['allow_mixed_eval']!r}")
    if g.get("profile") is not None and find_yaml("profile", g["profile"]) is None:
        raise ConfigError(f"{at('profile')}: unknown profile {g['profile']!r}; valid: {', '.join(available('profile'))}")
    _axes_ok(at("axes"), g.get("axes"))
    dotlist(at("overrides"), g.get("overrides"))
    by = g.get("by_profile")
    if by is not None and not isinstance(by, dict):
        raise ConfigError(f"{at('by_profile')}: must be {GRID_TYPES['by_profile']}, got {by!r}")
    all_axes = [dict(g.get("axes") or {})]
    for prof, part in (by or {}).items():
        if not isinstance(part, dict):
            raise ConfigError(f"{at(f'by_profile.{prof}')}: must be a mapping with axes and/or overrides, got {part!r}")
        extra = sorted(set(part) - {"axes", "overrides"})
        if extra:
            raise ConfigError(f"{at(f'by_profile.{prof}.{extra[0]}')}: unknown key; valid: axes, overrides")
        _axes_ok(at(f"by_profile.{prof}.axes"), part.get("axes"))
        dotlist(at(f"by_profile.{prof}.overrides"), part.get("overrides"))
        all_axes.append(dict(part.get("axes") or {}))
    for axes, prefix in zip(all_axes, ["axes", *[f"by_profile.{p}.axes" for p in (by or {})]]):
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{at(f'{prefix}.{key}')}: every axis needs a non-empty list of values (an empty one gives the grid no runs), got {values!r}")
    methods = {str(v) for axes in all_axes for v in axes.get("method", [])}
    if g.get("baseline") is not None and methods and g["baseline"] not in methods:
        raise ConfigError(f"{at('baseline')}: {g['baseline']!r} is not a value of the method axis "
                          f"({', '.join(sorted(methods))}); the × faster table compares every group with it")
    keys = {k for axes in all_axes for k in axes}
    if g.get("sweep") is not None and g["sweep"] not in keys:
        raise ConfigError(f"{at('sweep')}: {g['sweep']!r} is not an axis key (axes: {', '.join(sorted(keys))})")
