"""torch.compile for the training and sampling paths, with the compile cost paid once per block type.

Modes (train.compile):
    auto    "blocks" on CUDA, "off" on the CPU (inductor's CPU code is no faster than eager at the tiny
            profile, and compiling costs tens of seconds per run).
    blocks  regional compilation: each transformer block is compiled in place (`nn.Module.compile`).
            The blocks share one code object, and dynamo treats their parameters as graph inputs, so one
            compilation serves all of them: an XL model compiles in the time of one block instead of 28
            unrolled ones (a whole-model compile of an XL took over 4 minutes on a fresh H100 machine).
            Everything between two block boundaries (adaLN modulation, norms, RoPE, gates, residuals,
            SwiGLU) is fused; only the small embedders and the final layer run eagerly.
    full    torch.compile of the whole model (one graph; longest compile).
    off     eager.

In-place block compilation keeps module names, so state dicts and checkpoints are unchanged by the mode.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

MODES = ("auto", "blocks", "full", "off")


def resolve_mode(mode: str | bool, device: torch.device) -> str:
    """Normalise a config value (YAML booleans included) to blocks | full | off for `device`."""
    m = str(mode).lower()
    m = {"true": "auto", "false": "off", "1": "auto", "0": "off", "none": "off"}.get(m, m)
    if m not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; valid: {', '.join(MODES)} (or true/false)")
    if m == "auto":
        return "blocks" if device.type == "cuda" else "off"
    return m


def compile_model(model: nn.Module, mode: str) -> Callable:
    """Return the callable to run `model` with (the model itself for off/blocks, a wrapper for full).

    `blocks` needs a `blocks` ModuleList (every backbone of the suite has one); a plugin backbone
    without it gets `full`, said in the returned object's type.
    """
    if mode == "off":
        return model
    if mode == "blocks" and isinstance(getattr(model, "blocks", None), nn.ModuleList):
        for block in model.blocks:
            block.compile()
        return model
    if mode in ("blocks", "full"):
        return torch.compile(model)
    raise ValueError(f"compile mode {mode!r} must be resolved first (resolve_mode)")
