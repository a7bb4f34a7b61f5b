"""torch.compile for the training and sampling paths, with the compile cost paid once per block type.

Modes (train.compile):
    auto    "regions" on CUDA, "off" on the CPU (inductor's CPU code is no faster than eager at the tiny
            profile, and compiling costs tens of seconds per run).
    regions "blocks", plus the other token-sized work of a step compiled as separate small graphs: the
            backbone's final layer (norm, modulation, linear) and the method's loss module (prediction
            error, cosine term, REPA projector and alignment). Each is one more graph of a few seconds.
    blocks  regional compilation: each transformer block is compiled in place (`nn.Module.compile`).
            The blocks share one code object, and dynamo treats their parameters as graph inputs, so one
            compilation serves all of them: an XL model compiles in the time of one block instead of 28
            unrolled ones (a whole-model compile of an XL took over 4 minutes on a fresh H100 machine).
            Everything between two block boundaries (adaLN modulation, norms, RoPE, gates, residuals,
            SwiGLU) is fused; the embedders, the final layer and the loss run eagerly.
    full    torch.compile of the whole model (one graph; longest compile).
    off     eager.

In-place block compilation keeps module names, so state dicts and checkpoints are unchanged by the mode.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

MODES = ("auto", "regions", "blocks", "full", "off")
PRECISIONS = ("auto", "fp32", "bf16", "bf16-residual")    # train.precision (benchmarks/execution/train.py autocast_ctx)
SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def resolve_mode(mode: str | bool, device: torch.device) -> str:
    """Normalise a config value (YAML booleans included) to regions | blocks | full | off for `device`."""
    m = str(mode).lower()
    m = {"true": "auto", "false": "off", "1": "auto", "0": "off", "none": "off"}.get(m, m)
    if m not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; valid: {', '.join(MODES)} (or true/false)")
    if m == "auto":
        return "regions" if device.type == "cuda" else "off"
    return m


def compile_model(model: nn.Module, mode: str) -> Callable:
    """Return the callable to run `model` with (the model itself for off/blocks, a wrapper for full).

    `blocks` / `regions` need a `blocks` ModuleList (every backbone of the suite has one); a plugin
    backbone without it gets `full`, said in the returned object's type.
    """
    if mode == "off":
        return model
    if mode in ("blocks", "regions") and isinstance(getattr(model, "blocks", None), nn.ModuleList):
        for block in model.blocks:
            block.compile()
        final = getattr(model, "final_layer", None)
        if mode == "regions" and isinstance(final, nn.Module):
            final.compile()
        return model
    if mode in ("blocks", "regions", "full"):
        return torch.compile(model)
    raise ValueError(f"compile mode {mode!r} must be resolved first (resolve_mode)")


def compile_loss(loss: nn.Module, mode: str) -> None:
    """Compile a method's loss module in place in `regions` and `full` modes (state dict keys unchanged)."""
    if mode in ("regions", "full"):
        loss.compile()


def attention_context(name: str) -> Callable[[], contextlib.AbstractContextManager]:
    """train.sdpa: the SDPA kernel the training step prefers. auto = torch's own choice (cuDNN flash on an
    H100 for bf16); flash = FlashAttention-2, cudnn, efficient (memory-efficient), math (unfused). A named
    kernel comes first, with the memory-efficient and math kernels behind it for inputs it cannot take
    (fp32). Compiled blocks fix the kernel when they are traced, i.e. at the first training step; the
    sampling path keeps torch's choice. Returns a factory of context managers (one per step).

    The kernel is chosen while AOTAutograd traces the graph, after the compile caches were looked up by
    the graph before that choice: a graph compiled once with torch's choice would be served from the cache
    for any other kernel (measured: an H200 run asked for flash and ran cuDNN). The name therefore goes
    into the cache key (torch.compiler.config.cache_key_tag)."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown train.sdpa {name!r}; valid: {', '.join(SDPA_BACKENDS)}")
    if name == "auto":
        return contextlib.nullcontext
    import torch.compiler.config as compiler_config
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    order = list(dict.fromkeys([kinds[name], SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]))

    @contextlib.contextmanager
    def ctx():
        with sdpa_kernel(order, set_priority=True), compiler_config.patch(cache_key_tag=f"sdpa={name}"):
            yield
    return ctx
