"""The speed benchmark behind `python -m benchmarks.speed` (benchmarks/speed.py) [backbones=lightningdit-xl-1,lightningdit-b-1] [methods=sit,repa,sfd]
[batch=128] [precision=bf16|bf16-residual|fp32] [compile=auto|regions|blocks|full|off]
[sdpa=auto|flash|cudnn|efficient|math] [layout=bhsd|bshd] [kernels=torch|triton] [steps=30] [warmup=10]
[threads=N] [small=4,2,8,64] [peak_tflops=measure|<number>] [tune=cd|autotune] [profile=1] [sample=0]
[timing=stream|sync] [graph=0|1] [out=results/speed]`

backbones, methods, batch, precision, compile, sdpa, layout, kernels (the backbone's attn_layout and
kernels) and graph (train.cuda_graph: forward + backward replayed as one CUDA graph, core/graphs.py; the
warm-up steps include its eager steps and the capture) take comma lists: every combination is a row.

Times the training job's own step (`benchmarks.execution.train.Trainer.train_step`: forward, loss incl. the REPA
head, backward, fused AdamW, foreach EMA) and the sampling forward (the EMA model, no grad) on random
latents of the method's shape, after warm-up, with CUDA events on a GPU (wall clock on the CPU), the
median of `steps` repeats; on a GPU the steps run back to back as in training (`timing=stream`, see
_time). The sampling forward runs as evaluation runs it: fp32 with TF32 matrix products (`sample=0` skips
it). The first step's time (compilation included) is reported separately, and with graph=1 the host time
of the CUDA graph capture (`capture_s`).
FLOPs are counted with torch's FlopCounterMode on one eager step (not guessed); MFU = achieved FLOP/s
over the bf16 matrix ceiling, measured on the card at start (an 8192³ bf16 product on random data)
unless `peak_tflops=` gives a number. `tune=cd` turns on inductor's coordinate-descent tuning of its
fused kernels, `tune=autotune` its GEMM autotuning (Triton templates with fused epilogues; minutes of
compile). `profile=1` adds a torch.profiler breakdown of three steps by kernel class (GEMM, attention,
fused inductor kernels, the suite's Triton kernels, optimizer/EMA, other) to `out`/profile_*.txt. A script,
not a test: it prints a table and writes speed.csv / speed.md under `out`, one row at a time (a killed run
keeps the rows it finished; a configuration that fails gets a row with its error, and the others run).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.build.components import RunParts
from benchmarks.config import presets as api
from benchmarks.execution.precision import autocast_ctx
from benchmarks.execution.train import Trainer
from core.config import TrainCfg
from core.graphs import WARMUP
from core.types import Batch

# Extra (semantic) channels and aux tokens per method at 256 px (docs/methods.md §0.3); the texture latent follows
# the backbone's patch size: /1 models run on f16d32 latents (16×16×32), /2 models on SD-VAE (32×32×4).
SEMANTIC = {"sfd": 16, "redi": 8, "sfd_redi": 8, "sfd_vavae": 16}
FLOP_SLICE = 8               # samples in the FLOP-counting step
GRAD_CLIP = {"repa": 1.0}    # docs/methods.md §8: REPA clips the global grad norm at 1.0, the others do not clip
TOKENS = {"repa": (256, 768), "sfd": (256, 768), "sfd_vavae": (256, 768)}


def latent_shape(backbone: str, method: str, small: dict | None = None
                 ) -> tuple[tuple[int, ...], int, tuple[int, int] | None]:
    """Channels per group, latent grid and aux tokens (T, D) at 256 px, or a small profile's shape given as
    small={"texture": 4, "semantic": 2, "grid": 8, "token_dim": 64} (the tiny profile's SFD latent; the
    encoder tokens then sit on the latent grid, as there)."""
    if small:
        sem = small["semantic"] if method in SEMANTIC else 0
        tokens = (small["grid"] ** 2, small["token_dim"]) if method in TOKENS else None
        return ((small["texture"], sem) if sem else (small["texture"],)), small["grid"], tokens
    tex, grid = (32, 16) if backbone.endswith("-1") else (4, 32)
    sem = SEMANTIC.get(method, 0)
    return ((tex, sem) if sem else (tex,)), grid, TOKENS.get(method)


def _groups(sizes: tuple[int, ...]):
    return api.groups(**dict(zip(("texture", "semantic"), sizes)))


def _time(fn, steps: int, warmup: int, device: torch.device, timing: str = "stream") -> list[float]:
    """Seconds per call of `fn`, `steps` times after `warmup` calls.

    On a GPU, timing="stream" (default) records a CUDA event after each call and synchronizes once at
    the end, as the training loop runs (no host sync per step): each interval is one step's share of the
    stream, and the host's work for the next step overlaps the device's. timing="sync" brackets each call
    by events and synchronizes after it, which adds the host's step-start latency to every step (the
    committed GPU tables of sessions 2 and 3 were measured so: a pessimistic bias, ≤ the ≈ 11 ms/step of
    gaps in the H200 profile). On the CPU: wall clock per call."""
    if timing not in ("stream", "sync"):
        raise ValueError(f"timing={timing!r}: valid: stream, sync")
    for _ in range(warmup):
        fn()
    if device.type == "cuda" and timing == "stream":
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for ev in events[1:]:
            fn()
            ev.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


class FixedFeed:
    """The training job's feed interface serving one batch already on the device (data loading is not
    what this script measures: the real feed gathers from a GPU-resident cache, benchmarks/build/components.py)."""

    def __init__(self, batch: Batch) -> None:
        self.fixed = batch

    def batch(self, step: int, rows: slice = slice(None)) -> Batch:
        b = self.fixed
        return Batch(b.x1[rows], b.y[rows], {k: v[rows] for k, v in b.aux.items()})


def matmul_ceiling(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 matrix ceiling in TFLOP/s: mean of `reps` n³ products on random data after warm-up."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


KERNEL_CLASSES = (("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "_mm_")),
                  ("attention", ("flash", "fmha", "attention", "sdpa")),
                  ("optimizer+ema", ("adam", "multi_tensor", "foreach", "lerp")),
                  ("inductor fused", ("triton_",)),
                  ("suite triton kernels", ("qk_norm_rope", "silu_mul", "adaln_")))  # kernels=triton


def profile_step(step, device: torch.device, path: Path, reps: int = 3) -> None:
    """Device time of `reps` steps by kernel class and the top kernels, written to `path`."""
    from torch.profiler import ProfilerActivity, profile   # heavy (Kineto): only with profile=1

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    per_class: dict[str, float] = {}
    kernels = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0.0) if device.type == "cuda" else 0.0
        if us <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA or "#" in ev.key:
            continue                 # "Optimizer.step#AdamW.step"-style ranges would count their kernels twice
        name = ev.key.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in name for k in keys)), "other")
        per_class[cls] = per_class.get(cls, 0.0) + us / reps / 1e3
        kernels.append((us / reps / 1e3, ev.count // reps, cls, ev.key[:110]))
    total = sum(per_class.values())
    lines = [f"device time per step: {total:.1f} ms (kernels only)"]
    lines += [f"  {c:16s} {ms:8.1f} ms  {ms / max(total, 1e-9):6.1%}" for c, ms in
              sorted(per_class.items(), key=lambda kv: -kv[1])]
    lines += ["top kernels (ms/step, launches/step, class, name):"]
    lines += [f"  {ms:8.2f} {n:5d}  {c:16s} {k}" for ms, n, c, k in sorted(kernels, reverse=True)[:25]]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]), flush=True)


def bench(backbone: str, method_name: str, batch: int, precision: str, compile_mode: str, steps: int,
          warmup: int, device: torch.device, peak_tflops: float, small: dict | None = None,
          profile_dir: Path | None = None, sdpa: str = "auto", sample: bool = True, timing: str = "stream",
          layout: str = "bhsd", kernels: str = "torch", graph: bool = False) -> dict:
    torch._dynamo.reset()           # each configuration compiles from scratch, with static shapes
    sizes, grid, tokens = latent_shape(backbone, method_name, small)
    g = _groups(sizes)
    mcfg = api.preset(method_name, "tiny" if "tiny" in backbone else None)   # tiny: REPA depth 1
    with device:                     # built on the device: an XL's init on the host takes seconds
        model = api.backbone(backbone, method_cfg=mcfg, in_channels=g.channels, input_size=grid, groups=g,
                             num_classes=1000, attn_layout=layout, kernels=kernels)
    method = api.method(mcfg, groups=g, hidden_size=model.hidden_size, encoder_dim=tokens[1] if tokens else 0)
    method.loss.to(device)
    x1 = torch.randn(batch, g.channels, grid, grid, device=device)
    aux = {"tokens": torch.randn(batch, *tokens, device=device)} if tokens else {}
    b = Batch(x1=x1, y=torch.randint(0, 1000, (batch,), device=device), aux=aux)
    t = torch.rand(batch, method.schedule.num_time_inputs, device=device)
    amp = autocast_ctx(precision, device)

    # FLOPs are counted on one eager step of a slice of the batch, before anything is compiled, and scaled
    # by batch/slice: every op of these models is per-sample, so the count is exactly linear in the batch
    # (and an eager step at the full batch may not fit where the compiled one does).
    k = min(batch, FLOP_SLICE)
    bk = Batch(x1=x1[:k], y=b.y[:k], aux={n: v[:k] for n, v in aux.items()})

    def eager_step() -> None:
        with amp:
            method.losses(model, bk).total.backward()
        model.zero_grad(set_to_none=True)
        method.loss.zero_grad(set_to_none=True)

    def eager_sample() -> None:
        with torch.no_grad(), amp:
            model(x1[:k], t[:k], b.y[:k])

    flops, sample_flops = (count_flops(f) * batch / k for f in (eager_step, eager_sample))
    train_cfg = dataclasses.asdict(TrainCfg(batch_size=batch, lr=1e-4, precision=precision, compile=compile_mode,
                                            sdpa=sdpa, grad_clip=GRAD_CLIP.get(method_name), ema_decay=0.9999,
                                            cuda_graph=graph))
    cfg = {"seed": 0, "train": train_cfg, "eval": {"num_samples": 10, "sample_seed": 0}}
    parts = RunParts(latent=None, method=method, model=model, feed=FixedFeed(b), fdnet=None,
                     latent_shape=tuple(x1.shape[1:]), num_classes=1000)
    tr = Trainer(cfg, rd=None, parts=parts, device=device, scorer=None)

    def sample_fwd() -> None:        # as evaluate.generate runs it: no grad, no autocast
        with torch.no_grad():
            tr.sampling_model(x1, t, b.y)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr.train_step()                  # compilation of the training graph, paid once
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if graph:                        # time replays only: the eager warm-up steps and the capture come first
        warmup = max(warmup, WARMUP)
    train = statistics.median(_time(tr.train_step, steps, warmup, device, timing))
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    first_sample = sample_s = float("nan")
    if sample:
        t0 = time.perf_counter()
        sample_fwd()                 # compilation of the no-grad sampling graph
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_sample = time.perf_counter() - t0
        sample_s = statistics.median(_time(sample_fwd, steps, warmup, device, timing))
    if profile_dir is not None:
        try:
            name = f"profile_{backbone}_{method_name}_{precision}_{layout}_{kernels}.txt"
            profile_step(tr.train_step, device, profile_dir / name)
        except Exception as e:  # noqa: BLE001 - the breakdown is extra; the timed row stands without it
            print(f"profile failed: {type(e).__name__}: {e}", flush=True)
    return {"backbone": backbone, "method": method_name, "batch": batch, "precision": precision,
            "compile": tr.compile_mode, "sdpa": sdpa, "layout": layout, "kernels": kernels,
            "graph": int(graph), "timing": timing if device.type == "cuda" else "wall",
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "first_step_s": round(first, 1),
            "capture_s": round(tr.graph.capture_seconds, 2) if tr.graph is not None else float("nan"),
            "ms_per_step": round(train * 1e3, 2),
            "img_per_s": round(batch / train, 1), "GFLOP_per_img": round(flops / batch / 1e9, 1),
            "TFLOP_per_s": round(flops / train / 1e12, 2), "MFU": round(flops / train / 1e12 / peak_tflops, 3),
            "first_sample_s": round(first_sample, 1), "sample_fwd_img_per_s": round(batch / sample_s, 1),
            "sample_TFLOP_per_s": round(sample_flops / sample_s / 1e12, 2), "peak_mem_GiB": round(mem, 2),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": dt.date.today().isoformat()}
