"""train.cuda_graph (core/graphs.py): the captured step trains exactly as the eager step.

On the CPU (CI) the capture is emulated (core.graphs.EMULATE_ON_CPU): the same static buffers, warm-up
count and gradient policy with a plain call in place of capture and replay, compared bit for bit with the
eager Trainer over warm-up, capture and replays, with one shard and with two micro-batches. With
SEMPRIOR_TEST_DEVICE=cuda (scripts/device/gpu_tune.sh) the same tests capture and replay a real CUDA graph:
a frozen random draw, a stale input buffer or a dropped gradient would show as a loss or a weight that
leaves the eager run's."""
import dataclasses
import os

import pytest
import torch

import core.graphs
from benchmarks import api
from benchmarks.build.components import RunParts
from benchmarks.execution.train import Trainer
from core.config import TrainCfg
from core.types import Batch

DEVICE = torch.device(os.environ.get("SEMPRIOR_TEST_DEVICE", "cpu"))
STEPS = core.graphs.WARMUP + 3          # warm-up, the capture step and two replays


class StepFeed:
    """A different batch at every step (as the real feed), the same for every trainer."""

    def __init__(self, channels: int, n: int = 16) -> None:
        self.channels, self.n = channels, n

    def batch(self, step: int, rows: slice = slice(None)) -> Batch:
        g = torch.Generator(DEVICE).manual_seed(100 + step)          # drawn on the device: no host copy
        b = Batch(x1=torch.randn(self.n, self.channels, 8, 8, generator=g, device=DEVICE),
                  y=torch.randint(0, 10, (self.n,), generator=g, device=DEVICE),
                  aux={"tokens": torch.randn(self.n, 16, 64, generator=g, device=DEVICE)})
        return Batch(b.x1[rows], b.y[rows], {k: v[rows] for k, v in b.aux.items()})


def _trainer(graph: bool, micro_batches: int = 0, compile_mode: str = "off", precision: str = "fp32") -> Trainer:
    g = api.groups(texture=4, semantic=2)
    mcfg = api.preset("sfd", "tiny")
    torch.manual_seed(0)
    model = api.backbone("lightningdit-tiny", method_cfg=mcfg, in_channels=g.channels, input_size=8, groups=g,
                         num_classes=10).to(DEVICE)
    method = api.method(mcfg, groups=g, hidden_size=model.hidden_size, encoder_dim=64)
    method.loss.to(DEVICE)
    t = TrainCfg(batch_size=16, lr=1e-3, grad_clip=1.0, ema_decay=0.999, micro_batches=micro_batches,
                 precision=precision, compile=compile_mode, cuda_graph=graph)
    cfg = {"seed": 3, "train": dataclasses.asdict(t), "eval": {"num_samples": 10, "sample_seed": 0}}
    parts = RunParts(latent=None, method=method, model=model, feed=StepFeed(g.channels), fdnet=None,
                     latent_shape=(g.channels, 8, 8), num_classes=10)
    return Trainer(cfg, rd=None, parts=parts, device=DEVICE, scorer=None)


def _run(tr: Trainer) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in tr.train_step().items()} for _ in range(STEPS)]


@pytest.fixture
def emulate(monkeypatch):
    if DEVICE.type == "cpu":
        monkeypatch.setattr(core.graphs, "EMULATE_ON_CPU", True)


@pytest.mark.parametrize("micro_batches", [0, 2])
def test_graphed_steps_equal_eager_steps(emulate, micro_batches):
    eager, graphed = _trainer(False, micro_batches), _trainer(True, micro_batches)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # 1e-5 is fair in fp32
    try:
        a, b = _run(eager), _run(graphed)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert graphed.graph is not None and graphed.graph.captured and graphed.graph.steps == STEPS
    assert graphed.graph.accumulate == (micro_batches == 2)
    assert len({round(r["loss"], 6) for r in a}) == STEPS          # every step saw a new batch and new draws
    exact = DEVICE.type == "cpu"
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == (ra[k] if exact else pytest.approx(ra[k], rel=1e-5, abs=1e-6)), k
    for name, sa, sb in (("model", eager.parts.model, graphed.parts.model), ("ema", eager.ema, graphed.ema),
                         ("loss", eager.parts.method.loss, graphed.parts.method.loss)):
        for (k, va), vb in zip(sa.state_dict().items(), sb.state_dict().values()):
            if exact:
                assert torch.equal(va, vb), f"{name}.{k}"
            else:
                torch.testing.assert_close(vb, va, rtol=1e-4, atol=1e-6, msg=f"{name}.{k}")
    sa, sb = eager.opt.state_dict()["state"], graphed.opt.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[i][k], sa[i][k], rtol=0 if exact else 1e-4, atol=0 if exact else 1e-7)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled regions under a real capture: GPU only")
def test_graphed_compiled_bf16_steps_follow_eager():
    """The configuration the speed table runs: compile=regions, bf16 autocast (cache off), a real capture."""
    a = _run(_trainer(False, compile_mode="regions", precision="bf16"))
    b = _run(_trainer(True, compile_mode="regions", precision="bf16"))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-2, abs=1e-3)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA's sync debug mode: GPU only")
@pytest.mark.parametrize("graph", [False, True])
def test_a_training_step_never_waits_for_the_gpu(graph):
    """No host sync in the hot loop (issue 4): after the warm-up (and the capture), a whole Trainer step
    (feed, forward, loss, backward, clipping, fused AdamW, EMA) under CUDA's sync debug mode."""
    tr = _trainer(graph)
    for _ in range(core.graphs.WARMUP + 1):
        tr.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tr.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_changed_batch_shape_is_a_clear_error(emulate):
    tr = _trainer(True)
    for _ in range(core.graphs.WARMUP + 1):
        tr.train_step()
    tr.parts.feed.n = 8
    tr.cfg["train"]["batch_size"] = 8
    with pytest.raises(ValueError, match="same shapes every step"):
        tr.train_step()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU refusal")
def test_cuda_graph_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _trainer(True)
