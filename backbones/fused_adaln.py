"""adaLN's gated residual, RMSNorm and modulation as one Triton kernel per direction (kernels="triton").

A LightningDiT block enters each of its two branches through the same elementwise chain:

    r = x + gate·y            (the previous branch's gated residual; absent before the first branch)
    h = RMSNorm_w(r)·(1 + scale) + shift

with gate, shift, scale (N, D) per sample. The backward needs row reductions (the norm, over D) and column
reductions (shift, scale, gate over the T tokens of a sample; the norm weight over all tokens), which
inductor cannot put in one kernel: on an H200 its reduction kernels around the norms take 0.16-0.21 ms per
XL block each (results/reference/speed-h200/profile_xl1_sfd.txt, the `..._pow_split_sum...` kernels); their
bandwidth is unmeasured (the profile does not say what each reads). Here:

    forward  one pass: reads x, y (and the per-sample vectors), writes r (when there is a residual) and h
             in the dtype the next matrix product takes (bf16 under autocast: no separate cast);
    backward one pass: each program takes a run of tokens of one sample, reads dh, dr_out, x, y, recomputes
             r and the norm, writes dx and dy, and keeps its column sums (d shift, d scale, d gate, d w) in
             registers; the (N, runs, D) partials are summed afterwards in a fixed order.

Math in fp32, rounded once per output. Eager rounds r to the residual dtype before the norm reads it, and
under autocast h stays fp32 until the product casts it; inductor's fused kernels differ from eager the
same way (bf16 tolerance, tests/test_fused_adaln.py). Runs where fused_qk.py's kernels run; elsewhere
`norm_modulate` is the module math under ordinary autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor

from backbones.fused_qk import rms_norm
from backbones.triton_ops import autotuned, configs, tl, triton, use_triton

ROWS_PER_PROGRAM = 32  # backward: tokens of one sample per program


def reference(x: Tensor, gate: Tensor | None, y: Tensor | None, weight: Tensor, shift: Tensor, scale: Tensor,
              eps: float) -> tuple[Tensor, Tensor]:
    """The module math: r = x + gate·y (or x), h = RMSNorm(r)·(1 + scale) + shift; x, y (N, T, D)."""
    r = x if gate is None else x + gate.unsqueeze(1) * y
    h = rms_norm(r, weight, eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return r, h


if triton is not None:
    @triton.jit
    def _adaln_fwd(x, gate, y, w, shift, scale, r_out, h_out, rows, T, D, eps, s_gate, s_shift, s_scale,
                   RES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        mask = (row < rows)[:, None] & (d < D)[None, :]
        n = (row // T)[:, None]
        off = row[:, None].to(tl.int64) * D + d[None, :]
        r = tl.load(x + off, mask=mask, other=0.0).to(tl.float32)
        if RES:
            g = tl.load(gate + n * s_gate + d[None, :], mask=mask, other=0.0).to(tl.float32)
            r += g * tl.load(y + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(r_out + off, r.to(r_out.dtype.element_ty), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / D + eps)
        wv = tl.load(w + d, mask=d < D, other=0.0).to(tl.float32)
        sc = tl.load(scale + n * s_scale + d[None, :], mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(shift + n * s_shift + d[None, :], mask=mask, other=0.0).to(tl.float32)
        h = r * rstd[:, None] * wv[None, :] * (1.0 + sc) + sh
        tl.store(h_out + off, h.to(h_out.dtype.element_ty), mask=mask)

    @triton.jit
    def _adaln_bwd(dh, dr, x, gate, y, w, scale, dx, dy, parts, T, D, eps, s_gate, s_scale,
                   RES: tl.constexpr, HAS_DR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROWS: tl.constexpr):
        """Program (n, c) takes tokens c·ROWS ... of sample n; parts[n, c] gets its column sums
        (d shift, d scale, d gate, d w) as 4 rows of BLOCK_D."""
        n = tl.program_id(0)
        c = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        wv = tl.load(w + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        sc = tl.load(scale + n * s_scale + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
        g = tl.load(gate + n * s_gate + d, mask=dmask, other=0.0).to(tl.float32)[None, :] if RES else sc
        acc_shift = tl.zeros((BLOCK_D,), tl.float32)
        acc_scale = tl.zeros((BLOCK_D,), tl.float32)
        acc_gate = tl.zeros((BLOCK_D,), tl.float32)
        acc_w = tl.zeros((BLOCK_D,), tl.float32)
        for i in range(ROWS // BLOCK_T):
            t = c * ROWS + i * BLOCK_T + tl.arange(0, BLOCK_T)
            mask = (t < T)[:, None] & dmask[None, :]
            off = (n * T + t)[:, None].to(tl.int64) * D + d[None, :]
            r = tl.load(x + off, mask=mask, other=0.0).to(tl.float32)
            if RES:
                yv = tl.load(y + off, mask=mask, other=0.0).to(tl.float32)
                r += g * yv
            rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / D + eps)
            xhat = r * rstd[:, None]
            gh = tl.load(dh + off, mask=mask, other=0.0).to(tl.float32)
            acc_shift += tl.sum(gh, axis=0)
            acc_scale += tl.sum(gh * xhat * wv, axis=0)
            gn = gh * (1.0 + sc)                       # gradient of RMSNorm's output
            acc_w += tl.sum(gn * xhat, axis=0)
            gx = gn * wv                               # ... of xhat
            grad = rstd[:, None] * (gx - xhat * (tl.sum(gx * xhat, axis=1) / D)[:, None])
            if HAS_DR:
                grad += tl.load(dr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx + off, grad.to(dx.dtype.element_ty), mask=mask)
            if RES:
                tl.store(dy + off, (grad * g).to(dy.dtype.element_ty), mask=mask)
                acc_gate += tl.sum(grad * yv, axis=0)
        base = parts + (n * tl.num_programs(1) + c) * 4 * BLOCK_D + d
        tl.store(base, acc_shift)
        tl.store(base + BLOCK_D, acc_scale)
        tl.store(base + 2 * BLOCK_D, acc_gate)
        tl.store(base + 3 * BLOCK_D, acc_w)

    # Candidates: the ones free of register spills on sm_90 at the B and XL widths (tests/test_fused_adaln.py
    # reads them from the cubin): a whole padded row is in flight, so the backward wants many warps per row
    # ((1, 8), (2, 8), (4, 16) spilled).
    _CONFIGS = configs([({"BLOCK_T": t}, w) for t, w in ((1, 4), (1, 16), (2, 16), (1, 32))])
    _adaln_fwd_tuned = autotuned(_adaln_fwd, _CONFIGS, ({"BLOCK_T": 2}, 4), ["rows", "D"])
    _adaln_bwd_tuned = autotuned(_adaln_bwd, _CONFIGS, ({"BLOCK_T": 2}, 4), ["T", "D"])


def triton_forward(x: Tensor, gate: Tensor | None, y: Tensor | None, weight: Tensor, shift: Tensor,
                   scale: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    x = x.contiguous()
    n, t, dim = x.shape
    res = gate is not None
    y = y.contiguous() if res else x
    gate = gate if res else shift                      # never read without a residual
    r = x.new_empty(x.shape) if res else x.new_empty(0)
    h = x.new_empty(x.shape, dtype=out_dtype)
    rows = n * t
    _adaln_fwd_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_T"]),)](
        x, gate, y, weight, shift, scale, r, h, rows, t, dim, eps, gate.stride(0), shift.stride(0),
        scale.stride(0), RES=res, BLOCK_D=triton.next_power_of_2(dim))
    return r, h


def triton_backward(dh: Tensor, dr: Tensor | None, x: Tensor, gate: Tensor | None, y: Tensor | None,
                    weight: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, ...]:
    """-> dx, dy, d gate, d weight, d shift, d scale (dy and d gate empty without a residual)."""
    x, dh = x.contiguous(), dh.contiguous()
    n, t, dim = x.shape
    res, has_dr = gate is not None, dr is not None
    y = y.contiguous() if res else x
    dr = dr.contiguous() if has_dr else dh
    block_d = triton.next_power_of_2(dim)
    runs = triton.cdiv(t, ROWS_PER_PROGRAM)
    parts = torch.empty(n, runs, 4, block_d, dtype=torch.float32, device=x.device)
    dx = x.new_empty(x.shape)
    dy = y.new_empty(y.shape) if res else x.new_empty(0)
    g = gate if res else scale
    _adaln_bwd_tuned[(n, runs)](dh, dr, x, g, y, weight, scale, dx, dy, parts, t, dim, eps, g.stride(0),
                                scale.stride(0), RES=res, HAS_DR=has_dr, BLOCK_D=block_d, ROWS=ROWS_PER_PROGRAM)
    sums = parts[..., :dim].sum(1)                     # (N, 4, D), fixed order

    def fresh(t: Tensor, dtype: torch.dtype) -> Tensor:  # outputs must not alias each other, and are row-major
        return t.to(dtype).clone(memory_format=torch.contiguous_format)

    d_gate = fresh(sums[:, 2], gate.dtype) if res else x.new_empty(0)
    d_w = sums[:, 3].sum(0).to(weight.dtype)
    return dx, dy, d_gate, d_w, fresh(sums[:, 0], scale.dtype), fresh(sums[:, 1], scale.dtype)


def norm_modulate(x: Tensor, gate: Tensor | None, y: Tensor | None, weight: Tensor, shift: Tensor,
                  scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(r, h): r = x + gate·y (x itself without gate), h = RMSNorm(r)·(1 + scale) + shift, in the dtype
    the next matrix product takes. The Triton op where it can run, else the module math."""
    if not use_triton(x):
        return reference(x, gate, y, weight, shift, scale, eps)
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    r, h = torch.ops.semprior.adaln_norm_modulate(x, gate, y, weight, shift, scale, eps, out_dtype)
    return (x if gate is None else r), h


@torch.library.custom_op("semprior::adaln_norm_modulate", mutates_args=())
def _adaln_op(x: Tensor, gate: Tensor | None, y: Tensor | None, weight: Tensor, shift: Tensor, scale: Tensor,
              eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return triton_forward(x, gate, y, weight, shift, scale, eps, out_dtype)


@_adaln_op.register_fake
def _(x, gate, y, weight, shift, scale, eps, out_dtype):
    r = x.new_empty(x.shape) if gate is not None else x.new_empty(0)
    return r, x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("semprior::adaln_norm_modulate_backward", mutates_args=())
def _adaln_backward_op(dh: Tensor, dr: Tensor | None, x: Tensor, gate: Tensor | None, y: Tensor | None,
                       weight: Tensor, scale: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return triton_backward(dh, dr, x, gate, y, weight, scale, eps)


@_adaln_backward_op.register_fake
def _(dh, dr, x, gate, y, weight, scale, eps):
    res = gate is not None
    return (x.new_empty(x.shape), y.new_empty(y.shape) if res else x.new_empty(0),
            gate.new_empty(gate.shape) if res else x.new_empty(0), weight.new_empty(weight.shape),
            scale.new_empty(scale.shape), scale.new_empty(scale.shape))


def _setup_context(ctx, inputs, output) -> None:
    x, gate, y, weight, shift, scale, eps, out_dtype = inputs
    ctx.save_for_backward(x, gate, y, weight, scale)
    ctx.eps = eps


def _backward(ctx, dr, dh):
    x, gate, y, weight, scale = ctx.saved_tensors
    res = gate is not None
    dr = dr if res and dr is not None and dr.numel() else None
    dx, dy, d_gate, d_w, d_shift, d_scale = torch.ops.semprior.adaln_norm_modulate_backward(
        dh, dr, x, gate, y, weight, scale, ctx.eps)
    return dx, (d_gate if res else None), (dy if res else None), d_w, d_shift, d_scale, None, None


_adaln_op.register_autograd(_backward, setup_context=_setup_context)
