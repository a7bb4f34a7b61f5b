"""A name -> constructor registry (the timm `register_model` pattern), one instance per component kind.

Plugins register at import time; `core.plugins.load_plugins()` also imports every module advertised
under the `semprior_bench.plugins` entry-point group so external packages can add components.

Dependencies (the channel groups, the backbone's width, its null label, ...) are wired one way for every
component: `Registry.wire` passes a constructor those it declares by name and nothing else.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, Mapping, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps explicit lowercase-hyphen names to classes or preset functions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator; a duplicate name raises ValueError."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._items[name]

    def build(self, cfg: Mapping[str, Any], **deps: Any) -> Any:
        """`get(cfg["name"])(**rest, **deps)`; a misspelled key raises TypeError naming it."""
        rest = {k: v for k, v in cfg.items() if k != "name"}
        ctor = self.get(cfg["name"])
        try:
            return ctor(**rest, **deps)
        except TypeError as e:  # re-raise with the component named, keeps the original message
            raise TypeError(f"{self.kind} {cfg['name']!r}: {e}") from e

    def wire(self, cfg: Mapping[str, Any], **available: Any) -> Any:
        """`build(cfg, **deps)` with deps the entries of `available` that the constructor of cfg["name"]
        names as parameters: callers offer every dependency they have, each component takes what it declares."""
        return self.build(cfg, **declared_deps(self.get(cfg["name"]), available))

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def declared_deps(ctor: Any, available: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `available` whose names are parameters of `ctor` (a `**kwargs` catches none of them:
    a dependency reaches a constructor only where it is declared by name)."""
    params = inspect.signature(ctor).parameters
    return {k: v for k, v in available.items() if k in params}


BACKBONES: Registry = Registry("backbone")
LATENTS: Registry = Registry("latent")
SCHEDULES: Registry = Registry("schedule")
LOSSES: Registry = Registry("loss")
SAMPLERS: Registry = Registry("sampler")
ENCODERS: Registry = Registry("encoder")
PREDICTIONS: Registry = Registry("prediction")   # flow prediction types (methods/prediction.py)
GUIDANCE: Registry = Registry("guidance")         # sampling-time guidance kinds (methods/guidance.py)
