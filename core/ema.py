"""Exponential moving average of weights (every paper: decay 0.9999, exact copy at init, docs/methods.md §0.2/§11.17)."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    """An exact, frozen copy of `model` (update with decay 0 is the same thing)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    ema.eval()
    return ema


def ema_decay(decay: float, step: int, warmup: bool) -> float:
    """With warm-up the effective decay is min(decay, (1 + k)/(10 + k)) so early EMA weights are not stale."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, one foreach kernel over all parameters; buffers copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)
