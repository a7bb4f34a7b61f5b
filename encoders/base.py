"""The artifact interface: anything `prepare` trains or loads once and caches (tokenizers, encoders, FD net).

An artifact class is registered in `core.registry.ENCODERS` under its kind and provides:
  requires: tuple[str, ...]                      other artifact kinds `fit` needs (e.g. semvae needs semantic-encoder)
  fit(data, deps, device, **cfg) -> artifact     classmethod; cfg keys are the class's own knobs (typos raise TypeError)
  save(dir) / load(dir, device)                  safetensors weights + a json of the constructor config; never pickle
  summary() -> dict                              numbers for the prepare report (accuracy, reconstruction error, ...)

Every class gets save / load from `Artifact`, which writes and reads one layout through `write_artifact` /
`read_artifact`: `weights.safetensors` (left out by artifacts that record where pretrained weights are instead
of copying them), `config.json` and `summary.json`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from core.cache import read_safetensors

WEIGHTS, CONFIG, SUMMARY = "weights.safetensors", "config.json", "summary.json"


def write_artifact(out_dir: Path, config: dict[str, Any], summary: dict[str, Any],
                   tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write `weights.safetensors` (unless tensors is None), `config.json` and `summary.json` into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tensors is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out_dir / WEIGHTS))
    write_json(out_dir / CONFIG, config)
    write_json(out_dir / SUMMARY, summary)


def read_artifact(out_dir: Path, device: torch.device | str = "cpu",
                  weights: bool = True) -> tuple[dict[str, torch.Tensor] | None, dict, dict]:
    """Read back what `write_artifact` wrote: (state_dict on `device`, or None when weights=False; config; summary)."""
    out_dir = Path(out_dir)
    state = _read_weights(out_dir / WEIGHTS, device) if weights else None
    return state, read_json(out_dir / CONFIG), read_json(out_dir / SUMMARY)


def _read_weights(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}; rerun `prepare` (python -m benchmarks.run ...) to rebuild it")
    return read_safetensors(path, device=str(device))      # damaged: CorruptFileError naming it


class Artifact:
    """save / load for every artifact class, through `write_artifact` / `read_artifact`.

    Hooks a class overrides for what differs:
      stores_weights       False: config.json says where pretrained weights are; no weights.safetensors
      artifact_config()    the dict written to config.json
      artifact_tensors()   what goes into weights.safetensors (default: the state_dict of self, an nn.Module)
      artifact_summary()   the dict written to summary.json (default: summary())
      from_saved(out_dir, state, config, summary, device)   classmethod: the artifact rebuilt from those
    """

    stores_weights = True

    def artifact_config(self) -> dict[str, Any]:
        raise NotImplementedError

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def artifact_summary(self) -> dict[str, Any]:
        return self.summary()

    @classmethod
    def from_saved(cls, out_dir: str | Path, state: dict[str, torch.Tensor] | None, config: dict, summary: dict,
                   device: torch.device | str) -> Any:
        raise NotImplementedError

    def save(self, out_dir: str | Path) -> None:
        tensors = self.artifact_tensors() if self.stores_weights else None
        write_artifact(Path(out_dir), self.artifact_config(), self.artifact_summary(), tensors)

    @classmethod
    def load(cls, out_dir: str | Path, device: torch.device | str = "cpu") -> Any:
        state, config, summary = read_artifact(Path(out_dir), device, weights=cls.stores_weights)
        return cls.from_saved(out_dir, state, config, summary, device)      # out_dir as given: error messages

    @classmethod
    def check_kind(cls, out_dir: str | Path, found: Any) -> None:
        """A folder of another kind is refused, never loaded into the wrong class."""
        if found != cls.kind:
            raise ValueError(f"{out_dir} holds a {found!r} artifact, not {cls.kind!r}")


class ModuleArtifact(Artifact):
    """An artifact that is one nn.Module built from a config dict.

    Subclasses set `net_cls` and keep `self.net`, `self.config`, `self._summary`; their constructor takes
    (net, config, summary).
    """

    net_cls: Any = None

    def artifact_config(self) -> dict[str, Any]:
        return self.config

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    @classmethod
    def net_config(cls, config: dict) -> dict:
        """The net_cls keywords in a saved config (a subclass drops its own output knobs)."""
        return config

    @classmethod
    def from_saved(cls, out_dir: str | Path, state: dict[str, torch.Tensor] | None, config: dict, summary: dict,
                   device: torch.device | str) -> Any:
        net = cls.net_cls(**cls.net_config(config)).to(device)
        net.load_state_dict(state)
        return cls(net, config, summary)

    def summary(self) -> dict:
        return dict(self._summary)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 512, device: torch.device | str = "cpu") -> torch.Tensor:
    """Apply fn to x in chunks on `device`, return the concatenation on the CPU."""
    outs = [fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs)
