"""`python -m benchmarks.speed [backbones=lightningdit-xl-1,lightningdit-b-1] [methods=sit,repa,sfd]
[batch=128] [precision=bf16|fp32] [compile=1|0] [steps=30] [warmup=10] [threads=N] [small=4,2,8,64]
[out=results/speed]`

Times the full training step (forward, loss, backward, AdamW, EMA: the training job's own `train_step`)
and the sampling forward (EMA model, no grad) on random latents of the method's shape, after warm-up,
with CUDA events on a GPU (wall clock on the CPU) and the median of many repeats. FLOPs are counted
with torch's FlopCounterMode on one step (not guessed); MFU = achieved FLOP/s over the card's bf16
dense peak given with `peak_tflops=` (default: the measured H200 matmul ceiling, 790). A script, not
a test: it prints a table and writes speed.csv / speed.md under `out`.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import api
from core.ema import make_ema, update_ema
from core.types import Batch

# Extra (semantic) channels and aux tokens per method at 256 px (spec §0.3); the texture latent follows
# the backbone's patch size: /1 models run on f16d32 latents (16×16×32), /2 models on SD-VAE (32×32×4).
SEMANTIC = {"sfd": 16, "redi": 8, "sfd_redi": 8, "sfd_vavae": 16}
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


def _time(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
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


def bench(backbone: str, method_name: str, batch: int, precision: str, compile_: bool, steps: int,
          warmup: int, device: torch.device, peak_tflops: float, small: dict | None = None) -> dict:
    sizes, grid, tokens = latent_shape(backbone, method_name, small)
    g = _groups(sizes)
    mcfg = api.preset(method_name, "tiny" if "tiny" in backbone else None)   # tiny: REPA depth 1
    model = api.backbone(backbone, method_cfg=mcfg, in_channels=g.channels, input_size=grid, groups=g,
                         num_classes=1000).to(device)
    method = api.method(mcfg, groups=g, hidden_size=model.hidden_size, encoder_dim=tokens[1] if tokens else 0)
    method.loss.to(device)
    ema = make_ema(model)
    params = [*model.parameters(), *method.loss.parameters()]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused, foreach=not fused)
    fwd = torch.compile(model) if compile_ else model
    x1 = torch.randn(batch, g.channels, grid, grid, device=device)
    aux = {"tokens": torch.randn(batch, *tokens, device=device)} if tokens else {}
    b = Batch(x1=x1, y=torch.randint(0, 1000, (batch,), device=device), aux=aux)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with amp:
            out = method.losses(fwd, b)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        update_ema(ema, model, 0.9999)

    t_compile = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_compile = time.perf_counter() - t_compile
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    train = statistics.median(_time(step, steps, warmup, device))
    t = torch.rand(batch, method.schedule.num_time_inputs, device=device)

    def sample_fwd():
        with torch.no_grad(), amp:
            fwd(x1, t, b.y)

    sample = statistics.median(_time(sample_fwd, steps, warmup, device))
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"backbone": backbone, "method": method_name, "batch": batch, "precision": precision,
            "compile": compile_, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "first_step_s": round(t_compile, 1), "ms_per_step": round(train * 1e3, 2),
            "img_per_s": round(batch / train, 1), "GFLOP_per_img": round(flops / batch / 1e9, 1),
            "TFLOP_per_s": round(flops / train / 1e12, 2), "MFU": round(flops / train / 1e12 / peak_tflops, 3),
            "sample_fwd_img_per_s": round(batch / sample, 1), "peak_mem_GiB": round(mem, 2),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main(argv: list[str] | None = None) -> int:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    device = torch.device(args.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    backbones = args.get("backbones", "lightningdit-xl-1,lightningdit-b-1" if device.type == "cuda"
                         else "lightningdit-tiny-1").split(",")
    methods = args.get("methods", "sit,repa,sfd").split(",")
    if "threads" in args:
        torch.set_num_threads(int(args["threads"]))
    # small=4,2,8,64 -> texture, semantic channels, latent grid, token dim (the tiny profile: small=4,2,8,64)
    small = dict(zip(("texture", "semantic", "grid", "token_dim"), map(int, args["small"].split(",")))) \
        if "small" in args else None
    rows = []
    for bb in backbones:
        for m in methods:
            row = bench(bb, m, int(args.get("batch", 128 if device.type == "cuda" else 32)),
                        args.get("precision", "bf16" if device.type == "cuda" else "fp32"),
                        args.get("compile", "1" if device.type == "cuda" else "0") == "1",
                        int(args.get("steps", 30)), int(args.get("warmup", 10)), device,
                        float(args.get("peak_tflops", 790 if device.type == "cuda" else "nan")), small)
            print(row, flush=True)
            rows.append(row)
    df = pd.DataFrame(rows)
    out = Path(args.get("out", "results/speed"))
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "speed.csv", index=False)
    (out / "speed.md").write_text(df.to_markdown(index=False))
    print(df.to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
