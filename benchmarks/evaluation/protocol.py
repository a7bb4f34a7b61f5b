"""The evaluation protocol of a run: what its FD numbers were measured with (docs/grids.md, "What every run records").

Recorded in the run folder as `protocol.json` at the first evaluation, from the objects actually built
(the sampler's and the guidance's constructor arguments read back from the built objects, not from the
YAML), plus the measured NFE per sample. Every later evaluation (also after a resume) checks that the
protocol has not changed. The report (benchmarks/report.py) puts runs in one comparison table only
when their protocols agree, unless `allow_mixed_eval=true`.

    {"sampler": {"name": "ode", "solver": "euler", "steps": 4, "shift": 0.0, ...},
     "nfe": 3, "guidance": null | {"name": "cfg", "scale": 1.5, "interval": [0.0, 1.0], "channels": "all"},
     "num_samples": 100, "fd_network": {"metric": "fd-net", "artifact": "fd-net-<id>", "reference": "fdref-<id>"},
     "image_size": 32}
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from core.config import ConfigError, stable_hash
from core.rundir import atomic_write_text
from core.registry import GUIDANCE, SAMPLERS

PROTOCOL_FILE = "protocol.json"
ADAPTIVE_SOLVERS = ("dopri5",)         # their tolerances are settings worth showing; fixed-step solvers ignore them
DEP_ARGS = ("groups", "null_label", "hidden_size", "encoder_dim", "schedule")   # wiring, not settings


class ProtocolChanged(ConfigError):
    """A resumed run would evaluate with another protocol than its first evaluation used."""


def registered_name(registry: Any, obj: Any) -> str:
    """The registry name whose entry built `obj` (its class), else the class name."""
    for name in registry.names():
        if registry.get(name) is type(obj):
            return name
    return type(obj).__name__


def _plain(value: Any) -> Any:
    """A JSON value for a constructor argument (tuples as lists, other objects as their str)."""
    return json.loads(json.dumps(value, default=str))


def component_args(obj: Any) -> tuple[dict[str, Any], list[str]]:
    """(the constructor arguments of a built component read back from its attributes of the same name,
    the names of the arguments it keeps under no such attribute); dependency arguments are left out."""
    params = inspect.signature(type(obj).__init__).parameters
    out, unread = {}, []
    for name, p in params.items():
        if name == "self" or name in DEP_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if hasattr(obj, name):
            out[name] = _plain(getattr(obj, name))
        else:
            unread.append(name)
    return out, unread


def fd_network(cfg: dict, scorer: Any) -> dict[str, Any]:
    """What scores the samples: the FD network artifact (its cache id, e.g. fd-net-73f936b8dc7d) and its
    reference statistics (a cache id over that network, the test split and N), or the ADM reference batch
    and the Inception weights."""
    e = cfg["eval"]
    if e["metric"] == "adm":
        return {"metric": "adm", "reference": Path(str(e["adm_ref"])).name,
                "inception": Path(str(e["inception"])).name if e["inception"] else "torch-hub"}
    ref = getattr(scorer, "ref_dir", None)
    out = {"metric": e["metric"], "reference": Path(ref).name if ref is not None else None}
    key = Path(ref) / "key.json" if ref is not None else None
    if key is not None and key.exists():            # the FD network artifact the reference was computed with
        out["artifact"] = json.loads(key.read_text()).get("fdnet")
    return out


def eval_protocol(cfg: dict, method: Any, scorer: Any, nfe: int) -> dict[str, Any]:
    """The protocol of one evaluation: the built sampler and guidance, the measured NFE per sample, the
    number of samples, the scoring network and the image size."""
    g = method.guidance
    s_args, s_unread = component_args(method.sampler)
    g_args, g_unread = component_args(g) if g is not None else ({}, [])
    out = {"sampler": {"name": registered_name(SAMPLERS, method.sampler), **s_args},
           "nfe": int(nfe),
           "guidance": None if g is None else {"name": registered_name(GUIDANCE, g), **g_args},
           "num_samples": int(cfg["eval"]["num_samples"]), "fd_network": fd_network(cfg, scorer),
           "image_size": int(cfg["data"]["image_size"])}
    if s_unread or g_unread:            # settings the objects do not show: the measured NFE stands in for them
        out["unread"] = [f"sampler.{n}" for n in s_unread] + [f"guidance.{n}" for n in g_unread]
    return out


def identity(p: dict) -> dict:
    """The fields two runs must share to be compared: everything but the measured NFE, which the same
    settings legitimately change (SFD's phase cuts add grid points; an adaptive solver's NFE depends on
    the weights). Where a component did not show all its settings (`unread`), the NFE is kept in."""
    return dict(p) if p.get("unread") else {k: v for k, v in p.items() if k != "nfe"}


def protocol_id(p: dict) -> str:
    return stable_hash(identity(p), 10)


def protocol_tag(p: dict) -> str:
    """A one-line description, e.g. "ode(solver=euler, steps=4, shift=0.0) · unguided · N=100 ·
    fd-net fd-net-73f936b8dc7d · 32 px" (the NFE too where it is part of the identity)."""
    s = dict(p.get("sampler") or {})
    name = s.pop("name", "?")
    shown = {k: v for k, v in s.items() if k not in ("atol", "rtol") or s.get("solver") in ADAPTIVE_SOLVERS}
    nfe = f" · NFE {p.get('nfe')}" if p.get("unread") else ""      # else measured per run (the report's NFE column)
    g = p.get("guidance")
    guid = "unguided" if not g else f"{g.get('name')}(" + ", ".join(f"{k}={v}" for k, v in g.items()
                                                                    if k != "name") + ")"
    fd = p.get("fd_network") or {}
    return (f"{name}(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + f"){nfe} · {guid} · "
            f"N={p.get('num_samples')} · {fd.get('metric')} {fd.get('artifact') or fd.get('reference')} · "
            f"{p.get('image_size')} px")


def _flat(d: dict, prefix: str = "") -> dict:
    """{"sampler": {"steps": 4}} -> {"sampler.steps": 4} (lists and None kept as values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_protocol(run_dir: Path) -> dict | None:
    path = Path(run_dir) / PROTOCOL_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise TypeError(f"holds a {type(data).__name__}, not an evaluation protocol")
    return data


def record_protocol(run_dir: Path, p: dict) -> None:
    """Write protocol.json at the run's first evaluation; at every later one (a resumed run too) check
    that the protocol is the same, else raise ProtocolChanged naming the fields that differ."""
    old = read_protocol(run_dir)
    if old is None:
        atomic_write_text(Path(run_dir) / PROTOCOL_FILE, json.dumps(p, indent=2, sort_keys=True))
        return
    a, b = _flat(identity(old)), _flat(identity(p))
    diff = [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    if diff:
        raise ProtocolChanged(f"the evaluation protocol changed since this run's first evaluation "
                              f"({'; '.join(diff)}): its curve would mix protocols. Rerun the grid with "
                              f"stale=rerun (or move {Path(run_dir).name} aside) to evaluate it afresh")
