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

The w12 bias is added here, not in the product (layers.SwiGLU calls the product without it): the
backward then has dg and dv in registers and sums them over the rows into the bias gradient, per program
over ROWS_PER_PROGRAM rows in a fixed order (deterministic, no atomics). Otherwise the bias gradient is a
separate pass over du (inductor's `red_fused_sum` kernel, 2.7 ms of the H200 step in the profile above).

Math in fp32 from the input dtype, rounded once at the output (inductor's fused kernel rounds the same
way; eager rounds SiLU(g) to bf16 before the product), with [g | v] = u + b:
    h = g·σ(g)·v,   dg = dh·v·σ(g)·(1 + g·(1 − σ(g))),   dv = dh·g·σ(g),   db = Σ_rows [dg | dv].
Runs where backbones/fused_qk.py's kernels run (CUDA, or CPU tensors under Triton's interpreter);
elsewhere `silu_mul` is the module math under ordinary autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from backbones.triton_ops import autotuned, configs, tl, triton, use_triton

def reference(u: Tensor, bias: Tensor | None = None) -> Tensor:
    """The module math: [g | v] = u (..., 2H) + bias -> SiLU(g) · v (..., H)."""
    gate, value = (u if bias is None else u + bias.to(u.dtype)).chunk(2, dim=-1)
    return F.silu(gate) * value


if triton is not None:
    @triton.jit
    def _gate_value_tile(u, b, rows, M, H, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        """g and v (+ bias) in fp32 for `rows` and this program's BLOCK_N columns, with the mask."""
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < H)[None, :]
        src = rows[:, None] * (2 * H) + cols[None, :]
        g = tl.load(u + src, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(u + src + H, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            g += tl.load(b + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
            v += tl.load(b + H + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        return cols, mask, src, g, v

    @triton.jit
    def _silu_mul_fwd(u, b, h, M, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols, mask, src, g, v = _gate_value_tile(u, b, rows, M, H, BLOCK_N, HAS_BIAS)
        out = g * tl.sigmoid(g) * v
        tl.store(h + rows[:, None] * H + cols[None, :], out.to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_bwd(dh, u, b, du, db_part, M, H, s_dh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr):
        """ROWS_PER_PROGRAM rows in blocks of BLOCK_M; with a bias, the columns' sums of dg and dv over
        those rows go to db_part[program row] (summed by the caller)."""
        acc_g = tl.zeros((BLOCK_N,), tl.float32)
        acc_v = tl.zeros((BLOCK_N,), tl.float32)
        for i in range(ROWS_PER_PROGRAM // BLOCK_M):
            rows = (tl.program_id(0) * ROWS_PER_PROGRAM + i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            cols, mask, src, g, v = _gate_value_tile(u, b, rows, M, H, BLOCK_N, HAS_BIAS)
            d = tl.load(dh + rows[:, None] * s_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            dg = d * v * sig * (1.0 + g * (1.0 - sig))
            dv = d * g * sig
            tl.store(du + src, dg.to(du.dtype.element_ty), mask=mask)
            tl.store(du + src + H, dv.to(du.dtype.element_ty), mask=mask)
            if HAS_BIAS:                       # masked rows have d = 0, so they add nothing
                acc_g += tl.sum(dg, axis=0)
                acc_v += tl.sum(dv, axis=0)
        if HAS_BIAS:
            cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            part = db_part + tl.program_id(0).to(tl.int64) * 2 * H
            tl.store(part + cols, acc_g, mask=cols < H)
            tl.store(part + H + cols, acc_v, mask=cols < H)

    # Candidates free of register spills on sm_90 (tests/test_fused_swiglu.py reads them from the cubin).
    _CONFIGS = configs([({"BLOCK_M": m, "BLOCK_N": n}, w)
                        for m, n, w in ((1, 1024, 4), (2, 1024, 8), (4, 512, 4), (8, 256, 4), (4, 1024, 8))])
    _silu_mul_fwd_tuned = autotuned(_silu_mul_fwd, _CONFIGS, ({"BLOCK_M": 4, "BLOCK_N": 64}, 4), ["M", "H"])
    _silu_mul_bwd_tuned = autotuned(_silu_mul_bwd, _CONFIGS, ({"BLOCK_M": 4, "BLOCK_N": 64}, 4), ["M", "H"])

ROWS_PER_PROGRAM = 64  # backward: rows per program, a multiple of every BLOCK_M


def _no_grad(like: Tensor) -> Tensor:
    """Stands for the bias gradient without a bias (custom-op outputs cannot be None)."""
    return like.new_empty(0, dtype=torch.float32)


def triton_forward(u: Tensor, bias: Tensor | None = None) -> Tensor:
    u = u.contiguous()
    hidden = u.shape[-1] // 2
    h = u.new_empty(u.shape[:-1] + (hidden,))
    m = u.numel() // u.shape[-1]
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(hidden, meta["BLOCK_N"]))  # noqa: E731
    _silu_mul_fwd_tuned[grid](u, u if bias is None else bias, h, m, hidden, HAS_BIAS=bias is not None)
    return h


def triton_backward(dh: Tensor, u: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """du (..., 2H) and the bias gradient (2H,) in the bias's dtype (empty without a bias)."""
    u = u.contiguous()
    hidden = u.shape[-1] // 2
    m = u.numel() // u.shape[-1]
    dh = dh.reshape(m, hidden)  # a view when dh is row-major (w3's input gradient is); a copy otherwise
    if dh.stride(1) != 1:
        dh = dh.contiguous()
    du = u.new_empty(u.shape)
    programs = triton.cdiv(m, ROWS_PER_PROGRAM)
    # Without a bias the kernel reads and writes no bias buffers: u and du stand in for the pointers.
    db_part = du if bias is None else torch.empty(programs, 2 * hidden, dtype=torch.float32, device=u.device)
    grid = lambda meta: (programs, triton.cdiv(hidden, meta["BLOCK_N"]))  # noqa: E731
    _silu_mul_bwd_tuned[grid](dh, u, u if bias is None else bias, du, db_part, m, hidden, dh.stride(0),
                              HAS_BIAS=bias is not None, ROWS_PER_PROGRAM=ROWS_PER_PROGRAM)
    return du, (_no_grad(u) if bias is None else db_part.sum(0).to(bias.dtype))  # fixed order: deterministic


def silu_mul(u: Tensor, bias: Tensor | None = None) -> Tensor:
    """[g | v] = u (..., 2H) + bias -> SiLU(g) · v: the Triton op where it can run, else the module math."""
    if use_triton(u):
        return torch.ops.semprior.silu_mul(u, bias)
    return reference(u, bias)


@torch.library.custom_op("semprior::silu_mul", mutates_args=())
def _silu_mul_op(u: Tensor, bias: Tensor | None) -> Tensor:
    return triton_forward(u, bias)


@_silu_mul_op.register_fake
def _(u, bias):
    return u.new_empty(u.shape[:-1] + (u.shape[-1] // 2,))


@torch.library.custom_op("semprior::silu_mul_backward", mutates_args=())
def _silu_mul_backward_op(dh: Tensor, u: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    return triton_backward(dh, u, bias)


@_silu_mul_backward_op.register_fake
def _(dh, u, bias):
    return u.new_empty(u.shape), (_no_grad(u) if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, dh):
    u, bias = ctx.saved_tensors
    du, db = torch.ops.semprior.silu_mul_backward(dh, u, bias)
    return du, (db if bias is not None else None)


_silu_mul_op.register_autograd(_backward, setup_context=_setup_context)
