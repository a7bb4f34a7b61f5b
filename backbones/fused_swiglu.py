"""SwiGLU's SiLU(gate)·value as a Triton kernel pair (backbone kernels="triton"; layers.SwiGLU).

Why. Between the two FFN matrix products a LightningDiT block computes h = SiLU(g)·v from the w12 output
u = [g | v] (N, T, 2H), and the backward turns dh into du = [dg | dv]. Compiled by inductor on an H200
(results/reference/speed-h200/profile_xl1_sfd.txt), the forward kernel moves the ≈ 0.6 GB per XL block it
must at ≈ 4.2 TB/s, but the backward kernel (`...silu_backward...`, the largest elementwise kernel of the
step: 14.5 ms of 258) moves the ≈ 1 GB it must (dh, g, v in; dg, dv out) at only ≈ 2 TB/s. Here the
backward is one row-contiguous pass over exactly those five activation-sized tensors; whether it runs at
the forward's bandwidth is for a device run to say. Memory: autograd keeps u for this backward and h for
w3's weight gradient (as it keeps any Linear input); inductor's partitioner may instead keep u and
recompute h, so peak memory can be up to one h per block higher (≈ 5.6 GB at XL/1, batch 128).

Math in fp32 from the input dtype, rounded once at the output (inductor's fused kernel rounds the same
way; eager rounds SiLU(g) to bf16 before the product):
    h = g·σ(g)·v,   dg = dh·v·σ(g)·(1 + g·(1 − σ(g))),   dv = dh·g·σ(g).
Runs where backbones/fused_qk.py's kernels run (CUDA, or CPU tensors under Triton's interpreter);
elsewhere `silu_mul` is the module math under ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.triton_ops import autotuned, configs, tl, triton, use_triton

def reference(u: Tensor) -> Tensor:
    """The module math: u (..., 2H) -> SiLU(u[..., :H]) · u[..., H:] (..., H)."""
    gate, value = u.chunk(2, dim=-1)
    return F.silu(gate) * value


if triton is not None:
    @triton.jit
    def _gate_value_tile(u, M, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's (BLOCK_M, BLOCK_N) tile of g and v in fp32, with its rows, columns and mask."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < H)[None, :]
        src = rows[:, None] * (2 * H) + cols[None, :]
        g = tl.load(u + src, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(u + src + H, mask=mask, other=0.0).to(tl.float32)
        return rows, cols, mask, src, g, v

    @triton.jit
    def _silu_mul_fwd(u, h, M, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, mask, src, g, v = _gate_value_tile(u, M, H, BLOCK_M, BLOCK_N)
        out = g * tl.sigmoid(g) * v
        tl.store(h + rows[:, None] * H + cols[None, :], out.to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_bwd(dh, u, du, M, H, s_dh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows, cols, mask, src, g, v = _gate_value_tile(u, M, H, BLOCK_M, BLOCK_N)
        d = tl.load(dh + rows[:, None] * s_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(du + src, (d * v * sig * (1.0 + g * (1.0 - sig))).to(du.dtype.element_ty), mask=mask)
        tl.store(du + src + H, (d * silu).to(du.dtype.element_ty), mask=mask)

    # Candidates free of register spills on sm_90 (tests/test_fused_swiglu.py reads them from the cubin).
    _CONFIGS = configs([({"BLOCK_M": m, "BLOCK_N": n}, w)
                        for m, n, w in ((1, 1024, 4), (2, 1024, 8), (4, 512, 4), (8, 256, 4), (4, 1024, 8))])
    _silu_mul_fwd_tuned = autotuned(_silu_mul_fwd, _CONFIGS, ({"BLOCK_M": 4, "BLOCK_N": 64}, 4), ["M", "H"])
    _silu_mul_bwd_tuned = autotuned(_silu_mul_bwd, _CONFIGS, ({"BLOCK_M": 4, "BLOCK_N": 64}, 4), ["M", "H"])


def _grid(m: int, hidden: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(hidden, meta["BLOCK_N"]))


def triton_forward(u: Tensor) -> Tensor:
    u = u.contiguous()
    hidden = u.shape[-1] // 2
    h = u.new_empty(u.shape[:-1] + (hidden,))
    m = u.numel() // u.shape[-1]
    _silu_mul_fwd_tuned[_grid(m, hidden)](u, h, m, hidden)
    return h


def triton_backward(dh: Tensor, u: Tensor) -> Tensor:
    u = u.contiguous()
    hidden = u.shape[-1] // 2
    m = u.numel() // u.shape[-1]
    dh = dh.reshape(m, hidden)  # a view when dh is row-major (w3's input gradient is); a copy otherwise
    if dh.stride(1) != 1:
        dh = dh.contiguous()
    du = u.new_empty(u.shape)
    _silu_mul_bwd_tuned[_grid(m, hidden)](dh, u, du, m, hidden, dh.stride(0))
    return du


def silu_mul(u: Tensor) -> Tensor:
    """u (..., 2H) -> SiLU(u[..., :H]) · u[..., H:]: the Triton op where it can run, else the module math."""
    if use_triton(u):
        return torch.ops.semprior.silu_mul(u)
    return reference(u)


@torch.library.custom_op("semprior::silu_mul", mutates_args=())
def _silu_mul_op(u: Tensor) -> Tensor:
    return triton_forward(u)


@_silu_mul_op.register_fake
def _(u):
    return u.new_empty(u.shape[:-1] + (u.shape[-1] // 2,))


@torch.library.custom_op("semprior::silu_mul_backward", mutates_args=())
def _silu_mul_backward_op(dh: Tensor, u: Tensor) -> Tensor:
    return triton_backward(dh, u)


@_silu_mul_backward_op.register_fake
def _(dh, u):
    return u.new_empty(u.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dh):
    (u,) = ctx.saved_tensors
    return torch.ops.semprior.silu_mul_backward(dh, u)


_silu_mul_op.register_autograd(_backward, setup_context=_setup_context)
