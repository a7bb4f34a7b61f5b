"""The speed work must not change the numbers (issue 4): on the same batch and the same random draws,
the compiled / bf16 training path gives the eager fp32 loss to bf16 tolerance, and compiled fp32 gives it
to fp32 rounding. Runs on the CPU in CI; the device check runs the same file with
SEMPRIOR_TEST_DEVICE=cuda (scripts/device/gpu_check.sh)."""
import os
import shutil

import pytest
import torch

from benchmarks import api
from benchmarks.train import autocast_ctx
from core.compile import compile_model, resolve_mode
from core.seed import seed_everything
from core.types import Batch

DEVICE = torch.device(os.environ.get("SEMPRIOR_TEST_DEVICE", "cpu"))
needs_compiler = pytest.mark.skipif(DEVICE.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="inductor's CPU backend needs a C++ compiler")


def _setup(method_name: str, batch: int = 16):
    g = api.groups(texture=4, semantic=2) if method_name == "sfd" else api.groups(texture=4)
    mcfg = api.preset(method_name, "tiny")
    torch.manual_seed(0)
    model = api.backbone("lightningdit-tiny", method_cfg=mcfg, in_channels=g.channels, input_size=8, groups=g,
                         num_classes=10).to(DEVICE)
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


@needs_compiler
@pytest.mark.parametrize("method_name", ["sit", "sfd"])
def test_compiled_blocks_match_eager(method_name):
    """The default GPU path (per-block compile, bf16 autocast) against eager fp32, and compiled fp32
    against eager fp32 to fp32 rounding; checkpoints keep their keys."""
    model, method, b = _setup(method_name)
    keys = list(model.state_dict())
    ref, ref_terms, ref_g = _loss_and_grads(model, method, model, b, "fp32")
    fwd = compile_model(model, resolve_mode("blocks", DEVICE))
    assert list(model.state_dict()) == keys
    c32, _, c32_g = _loss_and_grads(model, method, fwd, b, "fp32")
    torch.testing.assert_close(c32, ref, rtol=1e-4, atol=1e-5)
    assert _cos(c32_g, ref_g) > 0.9999
    c16, c16_terms, c16_g = _loss_and_grads(model, method, fwd, b, "bf16")
    torch.testing.assert_close(c16, ref, rtol=2e-2, atol=1e-3)
    for k in ref_terms:
        torch.testing.assert_close(c16_terms[k], ref_terms[k], rtol=3e-2, atol=2e-3)
    assert _cos(c16_g, ref_g) > 0.99


def test_compile_mode_resolution():
    assert resolve_mode("auto", torch.device("cpu")) == "off"
    assert resolve_mode("auto", torch.device("cuda")) == "blocks"
    assert resolve_mode(True, torch.device("cuda")) == "blocks" and resolve_mode(False, torch.device("cuda")) == "off"
    with pytest.raises(ValueError, match="valid: auto, blocks, full, off"):
        resolve_mode("fast", torch.device("cpu"))
