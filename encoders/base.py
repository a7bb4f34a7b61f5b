"""The artifact interface: anything `prepare` trains or loads once and caches (tokenizers, encoders, FD net).

An artifact class is registered in `core.registry.ENCODERS` under its kind and provides:
  requires: tuple[str, ...]                      other artifact kinds `fit` needs (e.g. semvae needs semantic-encoder)
  fit(data, deps, device, **cfg) -> artifact     classmethod; cfg keys are the class's own knobs (typos raise TypeError)
  save(dir) / load(dir, device)                  safetensors weights + a json of the constructor config; never pickle
  summary() -> dict                              numbers for the prepare report (accuracy, reconstruction error, ...)
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from core.cache import read_safetensors


def save_module(module: nn.Module, config: dict[str, Any], summary: dict[str, Any], out_dir: Path) -> None:
    """Write `weights.safetensors`, `config.json` and `summary.json` into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(out_dir / "weights.safetensors"))
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "summary.json", summary)


def load_state(out_dir: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Read back what `save_module` wrote: (state_dict, config, summary)."""
    out_dir = Path(out_dir)
    weights = out_dir / "weights.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no weights at {weights}; rerun `prepare` (python -m benchmarks.run ...) to rebuild it")
    state = read_safetensors(weights, device=str(device))      # damaged: CorruptFileError naming it
    return state, read_json(out_dir / "config.json"), read_json(out_dir / "summary.json")


class ModuleArtifact:
    """save / load / summary for an artifact that is one nn.Module built from a config dict.

    Subclasses set `net_cls` and keep `self.net`, `self.config`, `self._summary`; their constructor takes
    (net, config, summary).
    """

    net_cls: Any = None

    def save(self, out_dir: Path) -> None:
        save_module(self.net, self.config, self._summary, out_dir)

    @classmethod
    def load(cls, out_dir: Path, device: torch.device | str = "cpu") -> Any:
        state, config, summary = load_state(out_dir, device)
        net = cls.net_cls(**config).to(device)
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
