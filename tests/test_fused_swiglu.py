"""The SwiGLU SiLU·gate Triton kernels (backbone kernels="triton", backbones/fused_swiglu.py): against the
module math under Triton's interpreter (a subprocess), through layers.SwiGLU eager and compiled, compiled
for sm_90 without register spills; with SEMPRIOR_TEST_DEVICE=cuda the same cases run on the card."""
import os

import pytest
import torch

import triton_util
from backbones import fused_swiglu
from backbones.layers import SwiGLU

DEVICE = torch.device(os.environ.get("SEMPRIOR_TEST_DEVICE", "cpu"))
needs_triton = pytest.mark.skipif(fused_swiglu.triton is None, reason="triton is not installed")


def check_kernels_match_reference(device):
    """Forward and backward against the module math in fp64, without and with the w12 bias (fp32, as the
    parameter is, under an fp32 or bf16 u): hidden width 100 (masked columns), 2·75 rows (three backward
    programs' bias partials, the last one partly masked), and a gradient that is not row-major."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 7, 200, generator=g).to(device).requires_grad_()
    b = torch.randn(200, generator=g).to(device).requires_grad_()
    for args in ((u, None), (u, b)):                        # schema, autograd, fake, AOT dispatch
        result = torch.library.opcheck(torch.ops.semprior.silu_mul.default, args)
        assert set(result.values()) == {"SUCCESS"}, result
    for dtype, tol in [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)]:
        u = (2 * torch.randn(2, 75, 200, generator=g)).to(device, dtype)
        for bias in (None, torch.randn(200, generator=g).to(device)):
            got = fused_swiglu.triton_forward(u, bias)
            want = fused_swiglu.reference(u.double(), None if bias is None else bias.double())
            assert got.dtype == dtype and got.shape == (2, 75, 100)
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
            for dh in (torch.randn(2, 75, 100, generator=g), torch.randn(100, 75, 2, generator=g).permute(2, 1, 0)):
                dh = dh.to(device, dtype)
                leaf = u.double().requires_grad_()
                leaf_b = None if bias is None else bias.double().requires_grad_()
                inputs = [leaf] if bias is None else [leaf, leaf_b]
                wants = torch.autograd.grad(fused_swiglu.reference(leaf, leaf_b), inputs, dh.double())
                du, db = fused_swiglu.triton_backward(dh, u, bias)
                assert du.dtype == dtype and du.shape == u.shape
                torch.testing.assert_close(du.double(), wants[0], rtol=tol, atol=3 * tol)
                if bias is None:
                    assert db.numel() == 0
                else:                       # a sum of 150 rows of fp32 products: fp32 rounding, either dtype
                    assert db.dtype == bias.dtype and db.shape == bias.shape
                    torch.testing.assert_close(db.double(), wants[1], rtol=1e-4, atol=1e-3)


def check_swiglu_through_the_op(device, compiled):
    """layers.SwiGLU with the Triton kernels (the custom op, its autograd and, compiled, its fake
    implementations) gives the module path's outputs and gradients."""
    torch.manual_seed(0)
    ref = SwiGLU(48).to(device)
    alt = SwiGLU(48, kernels="triton").to(device)
    alt.load_state_dict(ref.state_dict())
    run = torch.compile(alt) if compiled else alt
    x = torch.randn(3, 16, 48, device=device)
    res = []
    for m, params in ((ref, ref), (run, alt)):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.square().mean().backward()
        res.append([out.detach(), xi.grad, *(p.grad for p in params.parameters())])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@needs_triton
def test_swiglu_kernels():
    """On a GPU directly; on the CPU in a subprocess under Triton's interpreter."""
    triton_util.check_on(DEVICE, __file__, check_kernels_match_reference, check_swiglu_through_the_op)


@needs_triton
@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernels compile in test_swiglu_kernels")
def test_swiglu_kernels_compile_for_hopper_without_spills():
    """Both kernels, bf16 and fp32, every tuning configuration: a cubin for sm_90 with no register spills."""
    for dtype in ("bf16", "fp32"):
        for cfg in fused_swiglu._CONFIGS:
            consts, warps = dict(cfg.kwargs), cfg.num_warps
            ptr = f"*{dtype}"
            for bias in (False, True):
                fwd = dict(consts, HAS_BIAS=bias)
                bwd = dict(fwd, ROWS_PER_PROGRAM=fused_swiglu.ROWS_PER_PROGRAM)
                for kernel, sig, cons in [
                        (fused_swiglu._silu_mul_fwd, dict(u=ptr, b="*fp32", h=ptr, M="i32", H="i32"), fwd),
                        (fused_swiglu._silu_mul_bwd, dict(dh=ptr, u=ptr, b="*fp32", du=ptr, db_part="*fp32",
                                                          M="i32", H="i32", s_dh="i32"), bwd)]:
                    cubin = triton_util.compile_for_hopper(kernel, sig, cons, warps)
                    triton_util.assert_no_spills(cubin, (kernel.fn.__name__, dtype, cfg, bias))


if __name__ == "__main__":  # the interpreter subprocess of test_swiglu_kernels
    triton_util.interpreted_main("fused_swiglu", check_kernels_match_reference, check_swiglu_through_the_op)
