"""The fused q/k RMSNorm + RoPE Triton kernels (backbone kernels="triton", backbones/fused_qk.py).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, which must be set before
triton decorates them, hence a subprocess running this file), and are compiled for an H100/H200 (sm_90)
to machine code, which needs Triton's bundled compiler but no GPU. With SEMPRIOR_TEST_DEVICE=cuda
(scripts/device/gpu_check.sh) the same cases run on the card.
"""
import os

import pytest
import torch

import triton_util
from backbones import fused_qk
from backbones.layers import Attention, RoPE2D

DEVICE = torch.device(os.environ.get("SEMPRIOR_TEST_DEVICE", "cpu"))
needs_triton = pytest.mark.skipif(fused_qk.triton is None, reason="triton is not installed")
COMBOS = [(True, True), (True, False), (False, True), (False, False)]  # (qk norm, rope)


def _inputs(dtype, norm, rope, bias=False, n=2, grid=3, heads=5, hd=12, device="cpu"):
    """A projection (N, T, 3, H, hd) with hd=12 (not a power of two: the kernels' masked lanes count),
    5 heads (two head blocks of the backward, one partly masked) and 18 tokens (under the interpreter
    three backward programs along the tokens, the last partly masked); the bias in fp32, as the
    parameter is."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(n, grid * grid, 3, heads, hd, generator=g).to(device, dtype)
    b = torch.randn(3 * heads * hd, generator=g).to(device) if bias else None
    ws = [1 + 0.2 * torch.randn(hd, generator=g) for _ in range(2)] if norm else [None, None]
    table = RoPE2D(hd, grid)
    tabs = [table.cos, table.sin] if rope else [None, None]
    to = (lambda t: t if t is None else t.to(device))
    return qkv, b, *map(to, ws), *map(to, tabs)


def _double(*ts):
    return [t if t is None else t.double() for t in ts]


def check_kernels_match_reference(device):
    """Forward and backward of the kernels against the module math in fp64, for every flag combination,
    without and with the qkv bias, with gradients in the strided layouts SDPA returns them in; the
    backward is deterministic. First torch.library.opcheck (schema, autograd registration, fake against
    real, AOT dispatch)."""
    for bias, norm, rope in [(False, True, True)] + [(True, *c) for c in COMBOS]:
        qkv, b, q_w, k_w, cos, sin = _inputs(torch.float32, norm, rope, bias, device=device)
        grads = (qkv, b, q_w, k_w)
        args = (*(t if t is None else t.requires_grad_() for t in grads), cos, sin, 1e-6)
        result = torch.library.opcheck(torch.ops.semprior.qk_norm_rope.default, args)
        assert set(result.values()) == {"SUCCESS"}, result
    for dtype, tol in [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)]:
        for bias in (False, True):
            for norm, rope in COMBOS:
                qkv, b, q_w, k_w, cos, sin = _inputs(dtype, norm, rope, bias, device=device)
                ref = fused_qk.reference(*_double(qkv, b, q_w, k_w, cos, sin), 1e-6)
                got = fused_qk.triton_forward(qkv, b, q_w, k_w, cos, sin, 1e-6)
                for x, y in zip(got, ref):
                    assert x.dtype == dtype and x.is_contiguous()
                    torch.testing.assert_close(x.double(), y, rtol=tol, atol=tol)
                g = torch.Generator().manual_seed(1)
                grads = [torch.randn(q.shape, generator=g).to(device, dtype) for q in got]
                grads[0] = grads[0].transpose(1, 2).contiguous().transpose(1, 2)   # (N, H, T, hd) storage
                grads[2] = grads[2].permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
                leaves = [t if t is None else t.double().requires_grad_() for t in (qkv, b, q_w, k_w)]
                outs = fused_qk.reference(*leaves, *_double(cos, sin), 1e-6)
                want = torch.autograd.grad(outs, [t for t in leaves if t is not None], [x.double() for x in grads])
                got_g = fused_qk.triton_backward(*grads, qkv, b, q_w, k_w, cos, sin, 1e-6)
                assert got_g[0].dtype == dtype
                d_qkv, d_qw, d_kw, d_b = got_g
                present = [d_qkv] + ([d_b] if bias else []) + ([d_qw, d_kw] if norm else [])
                for x, y in zip(present, want):
                    torch.testing.assert_close(x.double(), y, rtol=tol, atol=3 * tol)
                if bias:                      # a sum over 18 tokens: bf16 inputs, fp32 sums
                    assert d_b.dtype == b.dtype and d_b.shape == b.shape
                if not norm:
                    assert d_qw.numel() == 0 and d_kw.numel() == 0
                if not bias:
                    assert d_b.numel() == 0
                if dtype == torch.bfloat16 and bias and norm and rope:     # deterministic: bit-identical rerun
                    again = fused_qk.triton_backward(*grads, qkv, b, q_w, k_w, cos, sin, 1e-6)
                    assert all(torch.equal(x, y) for x, y in zip(again, got_g))


def check_attention_through_the_op(device, compiled):
    """Attention with kernels="triton" (the custom op and its autograd; under torch.compile its fake
    implementations too) gives the module path's outputs and gradients."""
    for qk_norm in (True, False):
        torch.manual_seed(0)
        ref = Attention(48, 4, qk_norm=qk_norm, rope=RoPE2D(12, 4), layout="bhsd").to(device)
        alt = Attention(48, 4, qk_norm=qk_norm, rope=RoPE2D(12, 4), kernels="triton").to(device)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn_like(p))                   # norm weights away from 1
        alt.load_state_dict(ref.state_dict())
        run = torch.compile(alt) if compiled else alt
        x = torch.randn(3, 16, 48, device=device)
        res = []
        for m in (ref, run):
            xi = x.clone().requires_grad_()
            out = m(xi)
            out.square().mean().backward()
            res.append([out.detach(), xi.grad, *(p.grad for p in (m._orig_mod if m is run and compiled else m)
                                                 .parameters())])
        for a, b in zip(*res):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@needs_triton
def test_fused_kernels():
    """On a GPU directly; on the CPU in a subprocess under Triton's interpreter."""
    triton_util.check_on(DEVICE, __file__, check_kernels_match_reference, check_attention_through_the_op)


def _compile(kernel_name, dtype, norm, rope, block_r, warps, bias=True):
    ptr, f32 = f"*{dtype}", "*fp32"
    consts = dict(NORM=norm, ROPE=rope, HAS_BIAS=bias, BLOCK_R=block_r, BLOCK_D=128)
    if kernel_name == "fwd":
        kernel = fused_qk._qk_norm_rope_fwd
        sig = dict(qkv=ptr, bias=f32, q_w=f32, k_w=f32, cos=f32, sin=f32, q_out=ptr, k_out=ptr, v_out=ptr,
                   rows="i32", T="i32", H="i32", HD="i32", eps="fp32")
    else:
        kernel = fused_qk._qk_norm_rope_bwd
        sig = dict(dq=ptr, dk=ptr, dv=ptr, qkv=ptr, bias=f32, q_w=f32, k_w=f32, cos=f32, sin=f32, dqkv=ptr,
                   dw_part=f32, db_part=f32, tokens="i32", T="i32", H="i32", HD="i32", eps="fp32",
                   **{f"s{a}{b}": "i32" for a in "qkv" for b in "nth"})
        consts["TOKENS_PER_PROGRAM"] = fused_qk.TOKENS_PER_PROGRAM
    return triton_util.compile_for_hopper(kernel, sig, consts, warps)


no_gpu = pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernels compile in test_fused_kernels")


@needs_triton
@no_gpu
@pytest.mark.parametrize("dtype,combos", [("bf16", COMBOS), ("fp32", COMBOS[:1])])
def test_kernels_compile_for_hopper(dtype, combos):
    """The kernels pass Triton's whole compiler for sm_90 down to a cubin, for every flag combination, so
    a device session does not find a compile error first."""
    for kernel_name in ("fwd", "bwd"):
        for norm, rope in combos:
            for bias in (False, True):
                _compile(kernel_name, dtype, norm, rope, 8, 4, bias)


@needs_triton
@no_gpu
def test_tuning_configurations_do_not_spill():
    """Every configuration the autotuner may pick keeps its sm_90 code in registers (no local-memory
    spills, read from the cubin's resource usage), so tuning chooses among sound candidates."""
    for kernel_name, candidates in (("fwd", fused_qk.FWD_CONFIGS), ("bwd", fused_qk.BWD_CONFIGS)):
        for cfg in candidates:
            for bias in (False, True):
                cubin = _compile(kernel_name, "bf16", True, True, cfg.kwargs["BLOCK_R"], cfg.num_warps, bias)
                triton_util.assert_no_spills(cubin, (kernel_name, cfg, bias))


if __name__ == "__main__":  # the interpreter subprocess of test_fused_kernels
    triton_util.interpreted_main("fused_qk", check_kernels_match_reference, check_attention_through_the_op)
