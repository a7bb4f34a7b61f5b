"""Device and precision of a training job: which device `train.device` names, and the autocast / residual-stream
dtype that `train.precision` asks for (fp32 master weights always). Shared by the training job and the speed
benchmark, so both time the same step.
"""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_ctx(precision: str, device: torch.device, cache: bool = True):
    """bf16 autocast on GPU by default; fp32 on CPU unless asked (fp32 master weights always).
    bf16-residual is bf16 autocast with a bf16 residual stream (set_residual_dtype). `cache=False` turns
    off autocast's weight-cast cache (a CUDA graph capture needs that; core/graphs.py)."""
    use_bf16 = precision in ("bf16", "bf16-residual") or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def set_residual_dtype(model: torch.nn.Module, precision: str) -> None:
    """train.precision=bf16-residual keeps the backbone's residual stream in bf16 (the suite's DiT has a
    `residual_dtype` attribute; backbones/dit.py). Every other precision leaves type promotion alone."""
    if precision != "bf16-residual":
        return
    if not hasattr(model, "residual_dtype"):
        raise ValueError(f"train.precision=bf16-residual needs a backbone with a `residual_dtype` attribute "
                         f"(the suite's DiT/LightningDiT); {type(model).__name__} has none")
    model.residual_dtype = torch.bfloat16
