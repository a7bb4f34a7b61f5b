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
             program takes 64 tokens of a block of heads and keeps partial sums of the two norm weights'
             gradients and of the qkv bias's gradient, summed in a fixed order afterwards
             (deterministic; no atomics).

The qkv bias is added in these kernels rather than in the projection (layers.Attention calls the product
without it): the backward then sums its gradient from values it holds anyway; otherwise that sum is a
separate pass over d qkv, which inductor fuses into its own kernels in the module path but cannot fuse
into this op.

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

from backbones.triton_ops import autotuned, configs, interpreting, tl, triton, use_triton


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


def reference(qkv: Tensor, bias: Tensor | None, q_w: Tensor | None, k_w: Tensor | None, cos: Tensor | None,
              sin: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The module path's math on qkv (N, T, 3, H, hd) + bias (3·H·hd) -> q, k, v (N, T, H, hd), contiguous."""
    if bias is not None:
        qkv = qkv + bias.view(qkv.shape[2:]).to(qkv.dtype)
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
    def _load_x(qkv, b_ptr, src, col, mask, HAS_BIAS: tl.constexpr):
        """Projection values (+ the qkv bias, whose offsets within a slot are `col`) in fp32."""
        x = tl.load(qkv + src, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(b_ptr + col, mask=mask, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _qk_fwd_slot(qkv, b_ptr, w_ptr, out, src, col, pair, dst, mask, d, dmask, c, s, sign, HD, eps,
                     NORM: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """One of q, k for BLOCK_R rows: load (+ bias), RMSNorm, rotate, store."""
        x = _load_x(qkv, b_ptr, src, col, mask, HAS_BIAS)
        if NORM:
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
            w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            y = x * rstd[:, None] * w[None, :]
        else:
            y = x
        if ROPE:
            # the other channel of each pair (d ^ 1 stays inside the row: hd is even)
            xp = _load_x(qkv, b_ptr, pair, col - d[None, :] + (d ^ 1)[None, :], mask, HAS_BIAS)
            if NORM:
                wp = tl.load(w_ptr + (d ^ 1), mask=dmask, other=0.0).to(tl.float32)
                xp = xp * rstd[:, None] * wp[None, :]
            y = y * c + sign * xp * s
        tl.store(out + dst, y.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_fwd(qkv, bias, q_w, k_w, cos, sin, q_out, k_out, v_out, rows, T, H, HD, eps,
                          NORM: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # row = token·H + head
        d = tl.arange(0, BLOCK_D)
        dmask = d < HD
        mask = (r < rows)[:, None] & dmask[None, :]
        tok, head = r // H, r % H
        q_src = (tok * 3 * H + head) * HD  # qkv[n, t, 0, h, 0]; k at + H·HD, v at + 2·H·HD
        src = q_src[:, None] + d[None, :]
        pair = q_src[:, None] + (d ^ 1)[None, :]
        col = (head * HD)[:, None] + d[None, :]  # the bias's offset within a slot
        dst = r[:, None] * HD + d[None, :]
        c = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        s = c
        if ROPE:
            tab = (tok % T)[:, None] * HD + d[None, :]
            c = tl.load(cos + tab, mask=mask, other=0.0)
            s = tl.load(sin + tab, mask=mask, other=0.0)
        sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
        _qk_fwd_slot(qkv, bias, q_w, q_out, src, col, pair, dst, mask, d, dmask, c, s, sign, HD, eps,
                     NORM, ROPE, HAS_BIAS)
        _qk_fwd_slot(qkv, bias + H * HD, k_w, k_out, src + H * HD, col, pair + H * HD, dst, mask, d, dmask, c, s,
                     sign, HD, eps, NORM, ROPE, HAS_BIAS)
        v = _load_x(qkv, bias + 2 * H * HD, src + 2 * H * HD, col, mask, HAS_BIAS)
        tl.store(v_out + dst, v.to(v_out.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_bwd_slot(g_ptr, g_row, qkv, b_ptr, w_ptr, dqkv, src, col, mask, d, dmask, c, s_pair, sign, HD, eps,
                     NORM: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Gradient of one of q, k for one token's BLOCK_R heads, written into its slot of d qkv; returns
        it in fp32 (the bias gradient's share) and these rows' share of the norm weight's gradient."""
        g = tl.load(g_ptr + g_row + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if ROPE:
            # out_j = y_j c_j + sign_j y_{j^1} s_j  =>  dy_i = g_i c_i - sign_i g_{i^1} s_{i^1}
            gp = tl.load(g_ptr + g_row + (d ^ 1)[None, :], mask=mask, other=0.0).to(tl.float32)
            g = g * c - sign * gp * s_pair
        dw = tl.zeros_like(d).to(tl.float32)
        if NORM:
            x = _load_x(qkv, b_ptr, src, col, mask, HAS_BIAS)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HD + eps)
            xhat = x * rstd[:, None]
            w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            dw = tl.sum(g * xhat, axis=0)
            gx = g * w[None, :]
            g = rstd[:, None] * (gx - xhat * (tl.sum(gx * xhat, axis=1) / HD)[:, None])
        tl.store(dqkv + src, g.to(dqkv.dtype.element_ty), mask=mask)
        return g, dw

    @triton.jit
    def _qk_norm_rope_bwd(dq, dk, dv, qkv, bias, q_w, k_w, cos, sin, dqkv, dw_part, db_part, tokens, T, H, HD,
                          eps, sqn, sqt, sqh, skn, skt, skh, svn, svt, svh,
                          NORM: tl.constexpr, ROPE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_D: tl.constexpr, TOKENS_PER_PROGRAM: tl.constexpr):
        """Program (i, j) takes TOKENS_PER_PROGRAM tokens from i·TOKENS_PER_PROGRAM, one per step, and heads
        j·BLOCK_R ... + BLOCK_R - 1, so each row lane keeps one head and its column sums stay in registers:
        the norm weights' gradients and, with a bias, the bias gradient; one partial per program each,
        summed by the caller in a fixed order (deterministic, no atomics)."""
        pid_t, pid_h = tl.program_id(0), tl.program_id(1)
        head = pid_h * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HD
        hmask = (head < H)[:, None] & dmask[None, :]
        col = (head * HD)[:, None] + d[None, :]  # offset within a slot (H·HD) of qkv, the bias, d qkv
        sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
        dw_q = tl.zeros((BLOCK_D,), tl.float32)
        dw_k = tl.zeros((BLOCK_D,), tl.float32)
        db_q = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        db_k = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        db_v = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for i in range(TOKENS_PER_PROGRAM):
            tok = pid_t * TOKENS_PER_PROGRAM + i
            mask = hmask & (tok < tokens)
            n, t = tok // T, tok % T
            src = tok * 3 * H * HD + col
            c = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
            s_pair = c
            if ROPE:                          # one table row per token, shared by its heads
                c += tl.load(cos + t * HD + d, mask=dmask, other=0.0)[None, :]
                s_pair += tl.load(sin + t * HD + (d ^ 1), mask=dmask, other=0.0)[None, :]
            g_q, w_q = _qk_bwd_slot(dq, (n * sqn + t * sqt + head * sqh)[:, None], qkv, bias, q_w, dqkv, src, col,
                                    mask, d, dmask, c, s_pair, sign, HD, eps, NORM, ROPE, HAS_BIAS)
            g_k, w_k = _qk_bwd_slot(dk, (n * skn + t * skt + head * skh)[:, None], qkv, bias + H * HD, k_w, dqkv,
                                    src + H * HD, col, mask, d, dmask, c, s_pair, sign, HD, eps, NORM, ROPE,
                                    HAS_BIAS)
            dw_q += w_q
            dw_k += w_k
            g_v = tl.load(dv + (n * svn + t * svt + head * svh)[:, None] + d[None, :], mask=mask, other=0.0)
            tl.store(dqkv + src + 2 * H * HD, g_v.to(dqkv.dtype.element_ty), mask=mask)
            if HAS_BIAS:
                db_q += g_q
                db_k += g_k
                db_v += g_v.to(tl.float32)
        part = pid_t * tl.num_programs(1) + pid_h
        tl.store(dw_part + part * 2 * BLOCK_D + d, dw_q)
        tl.store(dw_part + (part * 2 + 1) * BLOCK_D + d, dw_k)
        if HAS_BIAS:                          # db_part (programs along tokens, 3, H, HD)
            out = db_part + pid_t.to(tl.int64) * 3 * H * HD + col
            tl.store(out, db_q, mask=hmask)
            tl.store(out + H * HD, db_k, mask=hmask)
            tl.store(out + 2 * H * HD, db_v, mask=hmask)

    # Candidates: the configurations whose sm_90 code uses no stack (no register spills; cuobjdump
    # -res-usage of the compiled kernels, tests/test_fused_qk.py). BLOCK_R is rows (token·head) per step in
    # the forward, heads per program in the backward, whose bias sums need registers: (16, 8 warps) spills
    # there, (16, 16 warps) does not.
    FWD_CONFIGS = configs([({"BLOCK_R": r}, w) for r, w in ((4, 4), (8, 4), (8, 8), (16, 8))])
    BWD_CONFIGS = configs([({"BLOCK_R": r}, w) for r, w in ((4, 4), (8, 4), (8, 8), (16, 16))])
    _qk_norm_rope_fwd_tuned = autotuned(_qk_norm_rope_fwd, FWD_CONFIGS, ({"BLOCK_R": 8}, 4), ["rows", "HD"])
    _qk_norm_rope_bwd_tuned = autotuned(_qk_norm_rope_bwd, BWD_CONFIGS, ({"BLOCK_R": 4}, 4), ["tokens", "H", "HD"])


def _NO_GRAD(like: Tensor) -> Tensor:
    """Stands for the norm weights' and bias's gradients when there are none (custom-op outputs cannot
    be None)."""
    return like.new_empty(0, dtype=torch.float32)


def _launch_shape(qkv: Tensor) -> tuple[int, int, int, int, int]:
    n, t, three, h, hd = qkv.shape
    if qkv.numel() >= 2**31:
        raise ValueError(f"fused q/k kernels index with int32; qkv {tuple(qkv.shape)} has {qkv.numel()} elements "
                         "(use a smaller batch per GPU or backbone.kernels=torch)")
    return n * t, t, h, hd, triton.next_power_of_2(hd)


def triton_forward(qkv: Tensor, bias: Tensor | None, q_w: Tensor | None, k_w: Tensor | None, cos: Tensor | None,
                   sin: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    qkv = qkv.contiguous()
    tokens, t, h, hd, block_d = _launch_shape(qkv)
    rows = tokens * h
    q, k, v = (qkv.new_empty(qkv.shape[:2] + qkv.shape[3:]) for _ in range(3))
    norm, rope = q_w is not None, cos is not None
    dummy = qkv  # never read when the matching flag is off
    _qk_norm_rope_fwd_tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]),)](
        qkv, dummy if bias is None else bias, q_w if norm else dummy, k_w if norm else dummy,
        cos if rope else dummy, sin if rope else dummy, q, k, v, rows, t, h, hd, eps, NORM=norm, ROPE=rope,
        HAS_BIAS=bias is not None, BLOCK_D=block_d)
    return q, k, v


def _unit_last(g: Tensor) -> Tensor:
    return g if g.stride(-1) == 1 else g.contiguous()


# Backward: tokens per program (one partial sum per program). Under the interpreter (CI) 8, so that the
# tests' few tokens still span several programs and each program's loop is short.
TOKENS_PER_PROGRAM = 8 if interpreting() else 64


def triton_backward(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, bias: Tensor | None, q_w: Tensor | None,
                    k_w: Tensor | None, cos: Tensor | None, sin: Tensor | None,
                    eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """d qkv, the two norm weights' gradients and the bias gradient (each empty where there is none)."""
    qkv = qkv.contiguous()
    dq, dk, dv = _unit_last(dq), _unit_last(dk), _unit_last(dv)
    tokens, t, h, hd, block_d = _launch_shape(qkv)
    programs = triton.cdiv(tokens, TOKENS_PER_PROGRAM)
    dqkv = qkv.new_empty(qkv.shape)
    norm, rope = q_w is not None, cos is not None
    # Norm-weight partials per program (tokens × head blocks; BLOCK_R ≥ 4, so ≤ cdiv(H, 4) head blocks).
    dw_part = torch.zeros(programs, triton.cdiv(h, 4), 2, block_d, dtype=torch.float32, device=qkv.device)
    db_part = qkv if bias is None else torch.empty(programs, 3, h, hd, dtype=torch.float32, device=qkv.device)
    dummy = qkv
    _qk_norm_rope_bwd_tuned[lambda meta: (programs, triton.cdiv(h, meta["BLOCK_R"]))](
        dq, dk, dv, qkv, dummy if bias is None else bias, q_w if norm else dummy, k_w if norm else dummy,
        cos if rope else dummy, sin if rope else dummy, dqkv, dw_part, db_part, tokens, t, h, hd, eps,
        dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), NORM=norm, ROPE=rope, HAS_BIAS=bias is not None,
        BLOCK_D=block_d, TOKENS_PER_PROGRAM=TOKENS_PER_PROGRAM)
    # Fixed summation orders: deterministic. Separate reductions, so the outputs do not alias each other.
    db = _NO_GRAD(qkv) if bias is None else db_part.sum(0).flatten().to(bias.dtype)
    if not norm:
        return dqkv, _NO_GRAD(qkv), _NO_GRAD(qkv), db
    dw = dw_part.flatten(0, 1)
    return dqkv, dw[:, 0, :hd].sum(0).to(q_w.dtype), dw[:, 1, :hd].sum(0).to(k_w.dtype), db


#################################################################################
#                          Custom op and its autograd                           #
#################################################################################

def qk_norm_rope(qkv: Tensor, bias: Tensor | None, q_w: Tensor | None, k_w: Tensor | None, cos: Tensor | None,
                 sin: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (N, T, 3, H, hd) + bias (3·H·hd, or none) -> q, k, v (N, T, H, hd): q, k RMSNorm-ed (weights q_w,
    k_w, or none) and rotated by the (T, hd) cos/sin tables (or not), v copied. The Triton op where it can
    run, else the module math under ordinary autograd (the device type is static, so torch.compile sees
    one branch). The bias is added here, not in the projection, so that the backward sums its gradient
    while d qkv is in registers instead of in a separate pass over d qkv."""
    if use_triton(qkv):
        return torch.ops.semprior.qk_norm_rope(qkv, bias, q_w, k_w, cos, sin, eps)
    return reference(qkv, bias, q_w, k_w, cos, sin, eps)


@torch.library.custom_op("semprior::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(qkv: Tensor, bias: Tensor | None, q_w: Tensor | None, k_w: Tensor | None,
                     cos: Tensor | None, sin: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return triton_forward(qkv, bias, q_w, k_w, cos, sin, eps)


@_qk_norm_rope_op.register_fake
def _(qkv, bias, q_w, k_w, cos, sin, eps):
    shape = qkv.shape[:2] + qkv.shape[3:]
    return tuple(qkv.new_empty(shape) for _ in range(3))


@torch.library.custom_op("semprior::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(dq: Tensor, dk: Tensor, dv: Tensor, qkv: Tensor, bias: Tensor | None,
                              q_w: Tensor | None, k_w: Tensor | None, cos: Tensor | None, sin: Tensor | None,
                              eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """d qkv (N, T, 3, H, hd), the two norm weights' gradients and the bias gradient (empty where none)."""
    return triton_backward(dq, dk, dv, qkv, bias, q_w, k_w, cos, sin, eps)


@_qk_norm_rope_backward_op.register_fake
def _(dq, dk, dv, qkv, bias, q_w, k_w, cos, sin, eps):
    dw = (_NO_GRAD(qkv), _NO_GRAD(qkv)) if q_w is None else (q_w.new_empty(q_w.shape), k_w.new_empty(k_w.shape))
    return (qkv.new_empty(qkv.shape), *dw, _NO_GRAD(qkv) if bias is None else bias.new_empty(bias.shape))


def _setup_context(ctx, inputs, output) -> None:
    qkv, bias, q_w, k_w, cos, sin, eps = inputs
    ctx.save_for_backward(qkv, bias, q_w, k_w, cos, sin)
    ctx.eps = eps


def _backward(ctx, dq, dk, dv):
    qkv, bias, q_w, k_w, cos, sin = ctx.saved_tensors
    shape = qkv.shape[:2] + qkv.shape[3:]
    dq, dk, dv = (g if g is not None else qkv.new_zeros(shape) for g in (dq, dk, dv))
    dqkv, dq_w, dk_w, db = torch.ops.semprior.qk_norm_rope_backward(dq, dk, dv, qkv, bias, q_w, k_w, cos, sin,
                                                                     ctx.eps)
    norm = q_w is not None
    return dqkv, db if bias is not None else None, dq_w if norm else None, dk_w if norm else None, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)
