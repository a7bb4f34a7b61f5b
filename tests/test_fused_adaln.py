"""adaLN's gated residual + RMSNorm + modulation as Triton kernels (backbone kernels="triton",
backbones/fused_adaln.py): against the module math under Triton's interpreter (a subprocess), through a
LightningDiT block eager and compiled, compiled for sm_90 without register spills; with
SEMPRIOR_TEST_DEVICE=cuda the same cases run on the card."""
import os

import pytest
import torch

import triton_util
from backbones import fused_adaln
from backbones.dit import DiTBlock
from backbones.layers import RoPE2D

DEVICE = torch.device(os.environ.get("SEMPRIOR_TEST_DEVICE", "cpu"))
needs_triton = pytest.mark.skipif(fused_adaln.triton is None, reason="triton is not installed")


def _inputs(device, x_dtype, act_dtype, res, n=3, t=40, d=24):
    """T=40 over runs of 32 tokens (a partial run) and D=24 (masked columns); gate/shift/scale are
    strided views of one (N, 6D) tensor, as the block's adaLN chunks are."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, t, d, generator=g).to(device, x_dtype)
    ada = (0.5 * torch.randn(n, 6 * d, generator=g)).to(device, act_dtype)
    shift, scale, gate = ada.chunk(6, dim=1)[:3]
    y = torch.randn(n, t, d, generator=g).to(device, act_dtype) if res else None
    w = (1 + 0.2 * torch.randn(d, generator=g)).to(device)
    return x, (gate if res else None), y, w, shift, scale


def check_kernels_match_reference(device):
    """Forward and backward against the module math in fp64: with and without the residual, with and
    without a gradient into r, fp32 and the autocast mix (bf16 activations, fp32 or bf16 residual)."""
    check_op_registration(device)
    for x_dtype, act_dtype, tol in [(torch.float32, torch.float32, 2e-5), (torch.float32, torch.bfloat16, 2e-2),
                                    (torch.bfloat16, torch.bfloat16, 2e-2)]:
        for res in (True, False):
            x, gate, y, w, shift, scale = _inputs(device, x_dtype, act_dtype, res)
            r, h = fused_adaln.triton_forward(x, gate, y, w, shift, scale, 1e-6, act_dtype)
            leaves = [t.double().requires_grad_() if t is not None else None for t in (x, gate, y, w, shift, scale)]
            want_r, want_h = fused_adaln.reference(*leaves, 1e-6)
            assert h.dtype == act_dtype
            torch.testing.assert_close(h.double(), want_h, rtol=tol, atol=tol)
            if res:
                assert r.dtype == x_dtype
                torch.testing.assert_close(r.double(), want_r, rtol=tol, atol=tol)
            gen = torch.Generator().manual_seed(1)
            dh = torch.randn(h.shape, generator=gen).to(device, act_dtype)
            for dr in ([torch.randn(x.shape, generator=gen).to(device, x_dtype), None] if res else [None]):
                outs, grads = [want_h], [dh.double()]
                if dr is not None:
                    outs, grads = outs + [want_r], grads + [dr.double()]
                live = [t for t in leaves if t is not None]
                want = dict(zip([i for i, t in enumerate(leaves) if t is not None],
                                torch.autograd.grad(outs, live, grads, retain_graph=True)))
                dx, dy, d_gate, d_w, d_shift, d_scale = fused_adaln.triton_backward(dh, dr, x, gate, y, w, scale, 1e-6)
                got = {0: dx, 3: d_w, 4: d_shift, 5: d_scale, **({1: d_gate, 2: dy} if res else {})}
                assert set(got) == set(want)
                for i in want:   # sums over tokens (gate, w, shift, scale) carry 5x the elementwise tolerance
                    atol = 4 * tol * (5 if i in (1, 3, 4, 5) else 1)
                    torch.testing.assert_close(got[i].double(), want[i], rtol=tol, atol=atol)


def check_op_registration(device):
    """torch.library.opcheck: schema, autograd registration, fake (meta) implementation against the real
    one, and AOT dispatch, with a transposed x as the patch embedding hands the first block."""
    for res in (True, False):
        x, gate, y, w, shift, scale = _inputs(device, torch.float32, torch.float32, res)
        x = x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        args = (x, gate, y, w.requires_grad_(), shift.detach().requires_grad_(), scale, 1e-6, torch.float32)
        result = torch.library.opcheck(torch.ops.semprior.adaln_norm_modulate.default, args)
        assert set(result.values()) == {"SUCCESS"}, result


def check_block_through_the_op(device, compiled):
    """A LightningDiT block with kernels="triton" (all three ops; under torch.compile without graph
    breaks) gives the module path's output and gradients in fp32, and under bf16 autocast is as close to
    the fp32 result as the module path is (relative L2 error of the output and every gradient)."""
    torch.manual_seed(0)
    kw = dict(norm="rmsnorm", ffn="swiglu", qk_norm=True, rope=RoPE2D(12, 4))
    ref = DiTBlock(48, 4, **kw).to(device)
    alt = DiTBlock(48, 4, kernels="triton", **kw).to(device)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))                  # adaLN away from zero, norms away from one
    alt.load_state_dict(ref.state_dict())
    run = torch.compile(alt, fullgraph=True) if compiled else alt
    x, c = torch.randn(3, 16, 48, device=device), torch.randn(3, 48, device=device)

    def results(m, params, amp):
        params.zero_grad()
        xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = m(xi, ci)
        out.float().square().mean().backward()
        return [out.detach().float(), xi.grad, ci.grad, *(p.grad.clone() for p in params.parameters())]

    exact = results(ref, ref, False)
    for a, b in zip(exact, results(run, alt, False)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    ref16, alt16 = results(ref, ref, True), results(run, alt, True)
    for i, (e, r, a) in enumerate(zip(exact, ref16, alt16)):
        err_ref, err_alt = ((t - e).norm() / e.norm() for t in (r, a))
        assert err_alt <= 1.5 * err_ref + 2e-3, (i, err_alt.item(), err_ref.item())


@needs_triton
def test_adaln_kernels():
    """On a GPU directly; on the CPU in a subprocess under Triton's interpreter."""
    triton_util.check_on(DEVICE, __file__, check_kernels_match_reference, check_block_through_the_op)


@needs_triton
@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernels compile in test_adaln_kernels")
@pytest.mark.parametrize("block_d", [1024, 2048])               # B (768) and XL (1152) widths
def test_adaln_kernels_compile_for_hopper_without_spills(block_d):
    """Both kernels with and without the residual, every tuning configuration: an sm_90 cubin with no
    register spills (bf16 activations, fp32 residual: the default training path)."""
    a, f32 = "*bf16", "*fp32"
    fwd = dict(x=f32, gate=a, y=a, w=f32, shift=a, scale=a, r_out=f32, h_out=a, rows="i32", T="i32", D="i32",
               eps="fp32", s_gate="i32", s_shift="i32", s_scale="i32")
    bwd = dict(dh=a, dr=f32, x=f32, gate=a, y=a, w=f32, scale=a, dx=f32, dy=a, parts=f32, T="i32", D="i32",
               eps="fp32", s_gate="i32", s_scale="i32")
    for cfg in fused_adaln._CONFIGS:
        for res in (True, False):
            cases = [(fused_adaln._adaln_fwd, fwd, dict(RES=res, BLOCK_T=cfg.kwargs["BLOCK_T"], BLOCK_D=block_d)),
                     (fused_adaln._adaln_bwd, bwd, dict(RES=res, HAS_DR=res, BLOCK_T=cfg.kwargs["BLOCK_T"],
                                                        BLOCK_D=block_d, ROWS=fused_adaln.ROWS_PER_PROGRAM))]
            for kernel, sig, consts in cases:
                cubin = triton_util.compile_for_hopper(kernel, sig, consts, cfg.num_warps)
                triton_util.assert_no_spills(cubin, (kernel.fn.__name__, res, cfg, block_d))


if __name__ == "__main__":  # the interpreter subprocess of test_adaln_kernels
    triton_util.interpreted_main("fused_adaln", check_kernels_match_reference, check_block_through_the_op)
