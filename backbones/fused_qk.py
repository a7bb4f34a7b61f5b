"""q/k RMSNorm and 2-D RoPE fused into one Triton kernel per direction (backbone kernels="triton").

What it replaces. In a LightningDiT block the attention inputs are prepared by a chain of small ops: split
the qkv projection into q, k, v, RMSNorm q and k over each head, rotate them (RoPE), and hand SDPA its
layout; the backward runs the chain in reverse and stacks dq, dk, dv back into the projection's gradient.
Compiled by inductor this is several memory-bound kernels per direction, ≈ 26 ms of a 258 ms
LightningDiT-XL/1 step on an H200 (results/reference/speed-h200/profile_xl1_sfd.txt: the kernels with
pow/rsqrt, neg/select (RoPE), permute/stack and the q/k weight sums), more than attention itself. Here:

    forward  one kernel reads the projection (N, T, 3, H, hd) once and writes q, k (normalised, rotated)
             and v as three (N, T, H, hd) tensors; SDPA takes them as transposed views, no other copy.
    backward one kernel reads dq, dk, dv (any strides, unit stride along hd) and the saved projection,
             recomputes the norm, and writes the projection's gradient (N, T, 3, H, hd) directly; each
             program keeps a partial sum of the two norm weights' gradients over its rows, summed in a
             fixed order afterwards (deterministic; no atomics).

Same math as layers.RMSNorm followed by layers.RoPE2D, computed in fp32 and rounded once to the input
dtype at the end. The module path rounds q, k to the activation dtype between the norm and the rotation;
inductor does not reproduce that rounding either, so both compiled paths agree with eager to bf16
rounding, not bit for bit (tests/test_fused_qk.py, tests/test_speed_numerics.py).

Where it runs: the Triton kernels on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, which is how CI checks them on a machine without a GPU); elsewhere `qk_norm_rope`
runs the module math (`reference`) under ordinary autograd, so a model built with kernels="triton"
works on any device. The kernels are a torch custom op with its own autograd, so torch.compile keeps them
as one opaque call inside the block graph.
"""
from __future__ import annotations

import torch
from torch import Tensor

from backbones.triton_ops import autotuned, configs, tl, triton, use_triton


#################################################################################
#                              Reference math                                   #
#################################################################################

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim in fp32, scaled by `weight`, cast back to x's dtype (layers.RMSNorm)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def rotate_pairs(x: Tensor) -> Tensor:
    """Interleaved rotate-half (EVA-02 layout): pairs (x0, x1) -> (-x1, x0) along the last dim."""
    x = x.unflatten(-1, (-1, 2))  # (..., d/2, 2)
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x·cos + rotate_pairs(x)·sin with tables broadcast against x, in x's dtype."""
    return (x * cos + rotate_pairs(x) * sin).to(x.dtype)


def reference(qkv: Tensor, q_w: Tensor | None, k_w: Tensor | None, cos: Tensor | None, sin: Tensor | None,
              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The module path's math on qkv (N, T, 3, H, hd) -> q, k, v (N, T, H, hd), contiguous."""
    q, k, v = qkv.unbind(2)
    if q_w is not None:
        q, k = rms_norm(q, q_w, eps), rms_norm(k, k_w, eps)
    if cos is not None:
        c, s = cos[:, None], sin[:, None]  # (T, 1, hd): broadcast over heads
        q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    return q.contiguous(), k.contiguous(), v.contiguous()


#################################################################################
#                                Triton kernels                                 #
#################################################################################

if triton is not None:
    @triton.jit
    def _qk_fwd_slot(qkv, w_ptr, out, src, pair, dst, mask, d, dmask, c, s, sign, HD, eps,
                     NORM: tl.constexpr, ROPE: tl.constexpr):
        """One of q, k for BLOCK_R rows: load, RMSNorm, rotate, store."""
        x = tl.load(qkv + src, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
            w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w[None, :]
        else:
            y = x
        if ROPE:
            xp = tl.load(qkv + pair, mask=mask, other=0.0).to(tl.float32)  # the other channel of each pair
            if NORM:
                wp = tl.load(w_ptr + (d ^ 1), mask=dmask, other=0.0).to(tl.float32)
                xp = xp * rstd[:, None] * wp[None, :]
            y = y * c + sign * xp * s
        tl.store(out + dst, y.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_fwd(qkv, q_w, k_w, cos, sin, q_out, k_out, v_out, rows, T, H, HD, eps,
                          NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = token·H + head
        d = tl.arange(0, BLOCK_D)
        dmask = d < HD
        mask = (r < rows)[:, None] & dmask[None, :]
        tok, head = r // H, r % H
        q_src = (tok * 3 * H + head) * HD  # qkv[n, t, 0, h, 0]; k at + H·HD, v at + 2·H·HD
        src = q_src[:, None] + d[None, :]
        pair = q_src[:, None] + (d ^ 1)[None, :]
        dst = r[:, None] * HD + d[None, :]
        c = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        s = c
        if ROPE:
            tab = (tok % T)[:, None] * HD + d[None, :]
            c = tl.load(cos + tab, mask=mask, other=0.0)
            s = tl.load(sin + tab, mask=mask, other=0.0)
        sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
        _qk_fwd_slot(qkv, q_w, q_out, src, pair, dst, mask, d, dmask, c, s, sign, HD, eps, NORM, ROPE)
        _qk_fwd_slot(qkv, k_w, k_out, src + H * HD, pair + H * HD, dst, mask, d, dmask, c, s, sign, HD, eps,
                     NORM, ROPE)
        v = tl.load(qkv + src + 2 * H * HD, mask=mask, other=0.0)
        tl.store(v_out + dst, v, mask=mask)

    @triton.jit
    def _qk_bwd_slot(g_ptr, g_row, qkv, w_ptr, dqkv, src, mask, d, dmask, c, s_pair, sign, HD, eps,
                     NORM: tl.constexpr, ROPE: tl.constexpr):
        """Gradient of one of q, k for BLOCK_R rows, written into its slot of d qkv; returns these rows'
        contribution to the norm weight's gradient (BLOCK_D,)."""
        g = tl.load(g_ptr + g_row + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if ROPE:
            # out_j = y_j c_j + sign_j y_{j^1} s_j  =>  dy_i = g_i c_i - sign_i g_{i^1} s_{i^1}
            gp = tl.load(g_ptr + g_row + (d ^ 1)[None, :], mask=mask, other=0.0).to(tl.float32)
            g = g * c - sign * gp * s_pair
        dw = tl.zeros_like(d).to(tl.float32)
        if NORM:
            x = tl.load(qkv + src, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
            xhat = x * rstd[:, None]
            w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            dw = tl.sum(g * xhat, axis=0)
            gx = g * w[None, :]
            g = rstd[:, None] * (gx - xhat * (tl.sum(gx * xhat, axis=1) / HD)[:, None])
        tl.store(dqkv + src, g.to(dqkv.dtype.element_ty), mask=mask)
        return dw

    @triton.jit
    def _qk_norm_rope_bwd(dq, dk, dv, qkv, q_w, k_w, cos, sin, dqkv, dw_part, rows, T, H, HD, eps,
                          sqn, sqt, sqh, skn, skt, skh, svn, svt, svh,
                          NORM: tl.constexpr, ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                          ROWS_PER_PROGRAM: tl.constexpr):
        """Each program takes ROWS_PER_PROGRAM rows in blocks of BLOCK_R, keeping its share of the norm
        weights' gradients in registers; one (2, BLOCK_D) partial per program, summed by the caller."""
        pid = tl.program_id(0)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HD
        sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
        dw_q = tl.zeros((BLOCK_D,), tl.float32)
        dw_k = tl.zeros((BLOCK_D,), tl.float32)
        for i in range(ROWS_PER_PROGRAM // BLOCK_R):
            r = pid * ROWS_PER_PROGRAM + i * BLOCK_R + tl.arange(0, BLOCK_R)
            mask = (r < rows)[:, None] & dmask[None, :]
            tok, head = r // H, r % H
            n, t = tok // T, tok % T
            src = ((tok * 3 * H + head) * HD)[:, None] + d[None, :]
            c = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
            s_pair = c
            if ROPE:
                c = tl.load(cos + t[:, None] * HD + d[None, :], mask=mask, other=0.0)
                s_pair = tl.load(sin + t[:, None] * HD + (d ^ 1)[None, :], mask=mask, other=0.0)
            dw_q += _qk_bwd_slot(dq, (n * sqn + t * sqt + head * sqh)[:, None], qkv, q_w, dqkv, src, mask, d,
                                 dmask, c, s_pair, sign, HD, eps, NORM, ROPE)
            dw_k += _qk_bwd_slot(dk, (n * skn + t * skt + head * skh)[:, None], qkv, k_w, dqkv, src + H * HD,
                                 mask, d, dmask, c, s_pair, sign, HD, eps, NORM, ROPE)
            g = tl.load(dv + (n * svn + t * svt + head * svh)[:, None] + d[None, :], mask=mask, other=0.0)
            tl.store(dqkv + src + 2 * H * HD, g.to(dqkv.dtype.element_ty), mask=mask)
        tl.store(dw_part + pid * 2 * BLOCK_D + d, dw_q)
        tl.store(dw_part + (pid * 2 + 1) * BLOCK_D + d, dw_k)

    # Candidates: the configurations whose sm_90 code does not spill registers (cuobjdump -res-usage of
    # the compiled kernels, tests/test_fused_qk.py; larger blocks spill in the backward).
    _CONFIGS = configs([({"BLOCK_R": r}, w) for r, w in ((4, 4), (8, 4), (8, 8), (16, 8))])
    _qk_norm_rope_fwd_tuned = autotuned(_qk_norm_rope_fwd, _CONFIGS, ({"BLOCK_R": 8}, 4), ["rows", "HD"])
    _qk_norm_rope_bwd_tuned = autotuned(_qk_norm_rope_bwd, _CONFIGS, ({"BLOCK_R": 8}, 4), ["rows", "HD"])


def _NO_GRAD(like: Tensor) -> Tensor:
    """Stands for the norm weights' gradients when there is no norm (custom-op outputs cannot be None)."""
    return like.new_empty(0, dtype=torch.float32)


def _launch_shape(qkv: Tensor) -> tuple[int, int, int, int, int]:
    n, t, three, h, hd = qkv.shape
    if qkv.numel() >= 2**31:
        raise ValueError(f"fused q/k kernels index with int32; qkv {tuple(qkv.shape)} has {qkv.numel()} elements "
                         "(use a smaller batch per GPU or backbone.kernels=torch)")
    return n * t * h, t, h, hd, triton.next_power_of_2(hd)


def triton_forward(qkv: Tensor, q_w: Tensor | None, k_w: Tensor | None, cos: Tensor | None, sin: Tensor | None,
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    qkv = qkv.contiguous()
    rows, t, h, hd, block_d = _launch_shape(qkv)
    q, k, v = (qkv.new_empty(qkv.shape[:2] + qkv.shape[3:]) for _ in range(3))
    norm, rope = q_w is not None, cos is not None
    dummy = qkv  # never read when the matching flag is off
    _qk_norm_rope_fwd_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](
        qkv, q_w if norm else dummy, k_w if norm else dummy, cos if rope else dummy, sin if rope else dummy,
        q, k, v, rows, t, h, hd, eps, NORM=norm, ROPE=rope, BLOCK_D=block_d)
    return q, k, v


def _unit_last(g: Tensor) -> Tensor:
    return g if g.stride(-1) == 1 else g.contiguous()


ROWS_PER_PROGRAM = 64  # backward: (token, head) rows per program, a multiple of every BLOCK_R


def triton_backward(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_w: Tensor | None, k_w: Tensor | None,
                    cos: Tensor | None, sin: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    qkv = qkv.contiguous()
    dq, dk, dv = _unit_last(dq), _unit_last(dk), _unit_last(dv)
    rows, t, h, hd, block_d = _launch_shape(qkv)
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    dqkv = qkv.new_empty(qkv.shape)
    norm, rope = q_w is not None, cos is not None
    dw_part = torch.empty(programs, 2, block_d, dtype=torch.float32, device=qkv.device)
    dummy = qkv
    _qk_norm_rope_bwd_tuned[(programs,)](
        dq, dk, dv, qkv, q_w if norm else dummy, k_w if norm else dummy, cos if rope else dummy,
        sin if rope else dummy, dqkv, dw_part, rows, t, h, hd, eps,
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), NORM=norm, ROPE=rope, BLOCK_D=block_d,
        ROWS_PER_PROGRAM=ROWS_PER_PROGRAM)
    if not norm:
        return dqkv, _NO_GRAD(qkv), _NO_GRAD(qkv)
    # Fixed summation order: deterministic. Two reductions, so the outputs do not alias each other.
    return dqkv, dw_part[:, 0, :hd].sum(0).to(q_w.dtype), dw_part[:, 1, :hd].sum(0).to(k_w.dtype)


#################################################################################
#                          Custom op and its autograd                           #
#################################################################################

def qk_norm_rope(qkv: Tensor, q_w: Tensor | None, k_w: Tensor | None, cos: Tensor | None, sin: Tensor | None,
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (N, T, 3, H, hd) -> q, k, v (N, T, H, hd): q, k RMSNorm-ed (weights q_w, k_w, or none) and
    rotated by the (T, hd) cos/sin tables (or not), v copied. The Triton op where it can run, else the
    module math under ordinary autograd (the device type is static, so torch.compile sees one branch)."""
    if use_triton(qkv):
        return torch.ops.semprior.qk_norm_rope(qkv, q_w, k_w, cos, sin, eps)
    return reference(qkv, q_w, k_w, cos, sin, eps)


@torch.library.custom_op("semprior::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(qkv: Tensor, q_w: Tensor | None, k_w: Tensor | None, cos: Tensor | None,
                     sin: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return triton_forward(qkv, q_w, k_w, cos, sin, eps)


@_qk_norm_rope_op.register_fake
def _(qkv, q_w, k_w, cos, sin, eps):
    shape = qkv.shape[:2] + qkv.shape[3:]
    return tuple(qkv.new_empty(shape) for _ in range(3))


@torch.library.custom_op("semprior::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, q_w: Tensor | None,
                              k_w: Tensor | None, cos: Tensor | None, sin: Tensor | None,
                              eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """d qkv (N, T, 3, H, hd) and the two norm weights' gradients (empty without norm)."""
    return triton_backward(dq, dk, dv, qkv, q_w, k_w, cos, sin, eps)


@_qk_norm_rope_backward_op.register_fake
def _(dq, dk, dv, qkv, q_w, k_w, cos, sin, eps):
    dw = (_NO_GRAD(qkv), _NO_GRAD(qkv)) if q_w is None else (q_w.new_empty(q_w.shape), k_w.new_empty(k_w.shape))
    return (qkv.new_empty(qkv.shape), *dw)


def _setup_context(ctx, inputs, output) -> None:
    qkv, q_w, k_w, cos, sin, eps = inputs
    ctx.save_for_backward(qkv, q_w, k_w, cos, sin)
    ctx.eps = eps


def _backward(ctx, dq, dk, dv):
    qkv, q_w, k_w, cos, sin = ctx.saved_tensors
    shape = qkv.shape[:2] + qkv.shape[3:]
    dq, dk, dv = (g if g is not None else qkv.new_zeros(shape) for g in (dq, dk, dv))
    dqkv, dq_w, dk_w = torch.ops.semprior.qk_norm_rope_backward(dq, dk, dv, qkv, q_w, k_w, cos, sin, ctx.eps)
    if q_w is None:
        return dqkv, None, None, None, None, None
    return dqkv, dq_w, dk_w, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)
