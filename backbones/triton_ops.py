"""What the suite's Triton kernels share (fused_qk.py, fused_swiglu.py, fused_adaln.py; backbone
kernels="triton"): the optional import, where the kernels can run, and their autotuning.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, read
when the kernels are decorated: how CI checks them without a GPU, tests/triton_util.py). Elsewhere each
op falls back to the module math under ordinary autograd.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from torch import Tensor

try:  # triton ships with CUDA builds of torch; CPU-only installs fall back to the reference math
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = tl = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: Tensor) -> bool:
    return triton is not None and (x.is_cuda or interpreting())


def configs(candidates: Sequence[tuple[dict, int]]) -> list[Any]:
    """triton.Config objects from (meta-parameters, num_warps) pairs."""
    return [triton.Config(dict(meta), num_warps=warps) for meta, warps in candidates]


def autotuned(kernel, candidates: list[Any], interpreted: tuple[dict, int], key: list[str]):
    """`kernel` tuned once per `key` among `candidates` on a GPU (a few seconds at its first call); under
    the interpreter with the one configuration `interpreted` (autotuning times kernels on a GPU). With
    SEMPRIOR_TRITON_TUNE=0 only the first candidate (the GPU tests: one compile per specialisation
    instead of one per candidate; every candidate is compiled and checked for spills offline)."""
    if interpreting():
        candidates = configs([interpreted])
    elif os.environ.get("SEMPRIOR_TRITON_TUNE") == "0":
        candidates = candidates[:1]
    return triton.autotune(candidates, key=key)(kernel)
