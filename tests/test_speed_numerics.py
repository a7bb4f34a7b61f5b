"""The speed work must not change the numbers (issue 4): on the same batch and the same random draws,
the compiled / bf16 training path gives the eager fp32 loss to bf16 tolerance, and compiled fp32 gives it
to fp32 rounding. Runs on the CPU in CI; the device check runs the same file with
SEMPRIOR_TEST_DEVICE=cuda (scripts/device/gpu_check.sh)."""
import os
import shutil

import pytest
import torch

from benchmarks import api
from benchmarks.execution.precision import autocast_ctx, set_residual_dtype
from core.compile import attention_context, compile_loss, compile_model, resolve_mode
from core.seed import seed_everything
from core.types import Batch

DEVICE = torch.device(os.environ.get("SEMPRIOR_TEST_DEVICE", "cpu"))
needs_compiler = pytest.mark.skipif(DEVICE.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="inductor's CPU backend needs a C++ compiler")


def _setup(method_name: str, batch: int = 16, layout: str = "bhsd", kernels: str = "torch"):
    g = api.groups(texture=4, semantic=2) if method_name == "sfd" else api.groups(texture=4)
    mcfg = api.preset(method_name, "tiny")
    torch.manual_seed(0)
    model = api.backbone("lightningdit-tiny", method_cfg=mcfg, in_channels=g.channels, input_size=8, groups=g,
                         num_classes=10, attn_layout=layout, kernels=kernels).to(DEVICE)
    method = api.method(mcfg, groups=g, hidden_size=model.hidden_size, encoder_dim=64)
    method.loss.to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    b = Batch(x1=torch.randn(batch, g.channels, 8, 8, generator=gen).to(DEVICE),
              y=torch.randint(0, 10, (batch,), generator=gen).to(DEVICE),
              aux={"tokens": torch.randn(batch, 16, 64, generator=gen).to(DEVICE)})
    return model, method, b


def _loss_and_grads(model, method, forward, b, precision):
    model.zero_grad(set_to_none=True)
    seed_everything(0, 0, 7)                      # the same t, noise and label drops in every path
    with autocast_ctx(precision, DEVICE):
        out = method.losses(forward, b)
    out.total.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return out.total.detach().float(), {k: v.detach().float() for k, v in out.terms.items()}, grads


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


@pytest.mark.parametrize("method_name", ["sit", "sfd"])
def test_bf16_autocast_matches_fp32_loss(method_name):
    model, method, b = _setup(method_name)
    ref, ref_terms, ref_g = _loss_and_grads(model, method, model, b, "fp32")
    low, low_terms, low_g = _loss_and_grads(model, method, model, b, "bf16")
    assert torch.isfinite(low)
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=1e-3)      # bf16: 8 mantissa bits
    for k in ref_terms:
        torch.testing.assert_close(low_terms[k], ref_terms[k], rtol=3e-2, atol=2e-3)
    assert _cos(low_g, ref_g) > 0.99


def _compiled_matches_eager(method_name, mode, precision, layout="bhsd", kernels="torch"):
    """`mode` compiled against eager fp32: compiled fp32 to fp32 rounding, compiled `precision` to bf16
    tolerance; checkpoints keep their keys."""
    model, method, b = _setup(method_name, layout=layout, kernels=kernels)
    keys, loss_keys = list(model.state_dict()), list(method.loss.state_dict())
    ref, ref_terms, ref_g = _loss_and_grads(model, method, model, b, "fp32")
    fwd = compile_model(model, resolve_mode(mode, DEVICE))
    compile_loss(method.loss, mode)
    assert list(model.state_dict()) == keys and list(method.loss.state_dict()) == loss_keys
    c32, _, c32_g = _loss_and_grads(model, method, fwd, b, "fp32")
    torch.testing.assert_close(c32, ref, rtol=1e-4, atol=1e-5)
    assert _cos(c32_g, ref_g) > 0.9999
    set_residual_dtype(model, precision)
    c16, c16_terms, c16_g = _loss_and_grads(model, method, fwd, b, precision)
    torch.testing.assert_close(c16, ref, rtol=2e-2, atol=1e-3)
    for k in ref_terms:
        torch.testing.assert_close(c16_terms[k], ref_terms[k], rtol=3e-2, atol=2e-3)
    assert _cos(c16_g, ref_g) > 0.99


@needs_compiler
@pytest.mark.parametrize("method_name,mode,precision,layout,kernels", [
    ("sit", "blocks", "bf16", "bhsd", "torch"), ("sfd", "blocks", "bf16", "bhsd", "torch"),  # blocks only
    ("sfd", "regions", "bf16", "bhsd", "torch"),                    # the GPU default: + final layer + loss
    ("sfd", "regions", "bf16-residual", "bhsd", "torch"),           # + the bf16 residual stream
    ("sfd", "regions", "bf16", "bshd", "torch"),                    # q/k norm and RoPE without layout copies
    ("sfd", "regions", "bf16-residual", "bhsd", "triton"),          # the suite's Triton kernels (GPU only)
])
def test_compiled_matches_eager(method_name, mode, precision, layout, kernels):
    if kernels == "triton" and DEVICE.type != "cuda":
        pytest.skip("on the CPU kernels=triton runs the module math (covered above); tests/test_fused_qk.py "
                    "and test_fused_swiglu.py check the kernels under Triton's interpreter")
    _compiled_matches_eager(method_name, mode, precision, layout, kernels)


@pytest.mark.parametrize("method_name", ["sit", "sfd"])
def test_bf16_residual_matches_fp32_loss(method_name):
    """train.precision=bf16-residual: the residual stream really is bf16 (the REPA hidden state is), and the
    loss equals eager fp32's to bf16 tolerance; the default keeps it fp32 (type promotion, as the references)."""
    model, method, b = _setup(method_name)
    ref, ref_terms, ref_g = _loss_and_grads(model, method, model, b, "fp32")
    with autocast_ctx("bf16", DEVICE):
        assert model(b.x1, torch.rand(16, method.schedule.num_time_inputs, device=DEVICE), b.y,
                     hidden_at=(1,)).hidden[1].dtype == torch.float32
    set_residual_dtype(model, "bf16-residual")
    with autocast_ctx("bf16-residual", DEVICE):
        assert model(b.x1, torch.rand(16, method.schedule.num_time_inputs, device=DEVICE), b.y,
                     hidden_at=(1,)).hidden[1].dtype == torch.bfloat16
    low, low_terms, low_g = _loss_and_grads(model, method, model, b, "bf16-residual")
    assert torch.isfinite(low)
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=1e-3)
    for k in ref_terms:
        torch.testing.assert_close(low_terms[k], ref_terms[k], rtol=3e-2, atol=2e-3)
    assert _cos(low_g, ref_g) > 0.99
    with pytest.raises(ValueError, match="residual_dtype"):
        set_residual_dtype(torch.nn.Linear(2, 2), "bf16-residual")


@pytest.mark.parametrize("name", ["math", "efficient"])
def test_attention_kernel_choice_keeps_the_loss(name):
    """train.sdpa picks a kernel (with fallbacks for inputs it cannot take); the loss is the same."""
    model, method, b = _setup("sfd")
    ref, _, ref_g = _loss_and_grads(model, method, model, b, "fp32")
    with attention_context(name)():
        got, _, got_g = _loss_and_grads(model, method, model, b, "fp32")
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert _cos(got_g, ref_g) > 0.99999
    with pytest.raises(ValueError, match="valid: auto, flash, cudnn, efficient, math"):
        attention_context("flash3")


@needs_compiler
def test_attention_kernel_choice_reaches_compiled_graphs():
    """The kernel is fixed when a compiled graph is traced; a graph compiled before with torch's choice must
    not be served from the compile cache for another kernel (an H200 run asked for flash and got cuDNN)."""
    from torch.profiler import ProfilerActivity, profile

    from backbones.layers import Attention, RoPE2D

    def attention_ops(name):
        torch._dynamo.reset()
        torch.manual_seed(0)
        f = torch.compile(Attention(64, 4, qk_norm=True, rope=RoPE2D(16, 4)).to(DEVICE))
        x = torch.randn(2, 16, 64, device=DEVICE, requires_grad=True)
        with attention_context(name)(), profile(activities=[ProfilerActivity.CPU]) as prof:
            f(x).sum().backward()
        return {e.key for e in prof.key_averages() if "_scaled_dot_product" in e.key}

    fused = attention_ops("auto")                     # torch's own (fused) kernel, now in the cache
    assert fused and not any("math" in k for k in fused), fused
    assert attention_ops("math") == {"aten::_scaled_dot_product_attention_math"}
    assert attention_ops("auto") == fused


def test_compile_mode_resolution():
    assert resolve_mode("auto", torch.device("cpu")) == "off"
    assert resolve_mode("auto", torch.device("cuda")) == "regions"
    assert resolve_mode(True, torch.device("cuda")) == "regions" and resolve_mode(False, torch.device("cuda")) == "off"
    with pytest.raises(ValueError, match="valid: auto, regions, blocks, full, off"):
        resolve_mode("fast", torch.device("cpu"))
