"""`python -m benchmarks.speed [backbones=...] [methods=...] [batch=...] ...` (`--help`: SPEC below): the speed
benchmark's command. What it times and how: benchmarks/execution/speed.py (docs/performance.md).
"""
from __future__ import annotations

import itertools
import sys
import traceback
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from backbones.layers import ATTN_LAYOUTS, KERNELS
from benchmarks.config import presets as api
from benchmarks.config.cli import Key, Spec, command, parse as parse_args
from benchmarks.config.plugins import load_all
from benchmarks.execution.speed import bench, matmul_ceiling
from core.compile import MODES, PRECISIONS, SDPA_BACKENDS
from core.config import ConfigError
from core.registry import BACKBONES


def _choice(name: str) -> Callable[[], tuple[str, ...]]:
    """The valid values of an option that names a mode, looked up when checked (plugins may add some)."""
    def valid() -> tuple[str, ...]:
        return {"precision": PRECISIONS, "compile": MODES, "sdpa": SDPA_BACKENDS, "layout": ATTN_LAYOUTS,
                "kernels": KERNELS}[name]
    return valid


def _backbones() -> list[str]:
    load_all()
    return BACKBONES.names()


def _methods() -> list[str]:
    load_all()
    return sorted(api.presets())


SPEC = Spec(
    prog="python -m benchmarks.speed",
    purpose="Time the training job's own step (forward, loss, backward, fused AdamW, EMA) and the sampling forward "
            "for every combination of the comma lists given; report ms/step, img/s, FLOPs, MFU and peak memory. "
            "Writes speed.csv and speed.md under out= one row at a time (docs/performance.md).",
    keys=(
        Key("backbones", "registered backbones", type="choice", choices=_backbones, many=True, noun="backbone",
            default="lightningdit-xl-1,lightningdit-b-1 on a GPU, lightningdit-tiny-1 on the CPU"),
        Key("methods", "method presets", type="choice", choices=_methods, many=True, noun="method",
            default="sit,repa,sfd"),
        Key("batch", "images per step", type="int", low=1, many=True, default="128 on a GPU, 32 on the CPU"),
        Key("precision", "training precision", type="choice", choices=_choice("precision"), many=True,
            default="bf16 on a GPU, fp32 on the CPU"),
        Key("compile", "torch.compile mode", type="choice", choices=_choice("compile"), many=True, default="auto"),
        Key("sdpa", "attention backend", type="choice", choices=_choice("sdpa"), many=True, default="auto"),
        Key("layout", "the backbone's attention layout", type="choice", choices=_choice("layout"), many=True,
            default="bhsd"),
        Key("kernels", "the backbone's kernels", type="choice", choices=_choice("kernels"), many=True,
            default="torch"),
        Key("graph", "1: forward + backward replayed as one CUDA graph (train.cuda_graph)", type="choice",
            choices=("0", "1"), many=True, default="0"),
        Key("steps", "timed steps (the median is reported)", type="int", low=1, default="30"),
        Key("warmup", "untimed steps first", type="int", low=0, default="10"),
        Key("threads", "torch CPU threads", type="int", low=1, default="torch's"),
        Key("small", "texture,semantic,grid,token_dim of a small model instead of the profile's "
            "(the tiny profile: 4,2,8,64)", metavar="T,S,G,D"),
        Key("peak_tflops", "the bf16 matrix ceiling for MFU: measure (an 8192³ bf16 product, CUDA) or a number",
            metavar="measure|X", default="measure on a GPU"),
        Key("tune", "cd: inductor's coordinate-descent tuning; autotune: also GEMM autotuning (minutes)",
            type="choice", choices=("cd", "autotune"), default="off"),
        Key("profile", "1: a torch.profiler breakdown by kernel class to out/profile_*.txt", type="choice",
            choices=("0", "1"), default="0"),
        Key("sample", "0: skip timing the sampling forward", type="choice", choices=("0", "1"), default="1"),
        Key("timing", "stream: steps back to back as in training; sync: synchronize after each", type="choice",
            choices=("stream", "sync"), default="stream"),
        Key("out", "the output folder", type="path", default="results/speed"),
        Key("device", "the device (cuda, cuda:1, cpu)", default="cuda when available"),
    ),
    examples=("python -m benchmarks.speed backbones=lightningdit-xl-1 methods=sit,repa,sfd",
              "python -m benchmarks.speed backbones=lightningdit-tiny methods=sit,sfd batch=64 threads=1 "
              "small=4,2,8,64 precision=bf16"),
)
KEYS = tuple(SPEC.key_names)


def parse(argv: list[str]) -> dict[str, str]:
    """key=value arguments, every value checked before anything runs or is written (ConfigError): the keys'
    types and choices by benchmarks.config.cli.parse, then the values that need more than a type."""
    args = parse_args(SPEC, argv).values
    if "small" in args and not (len(args["small"].split(",")) == 4 and
                                all(x.isdigit() and int(x) > 0 for x in args["small"].split(","))):
        raise ConfigError(f"small={args['small']}: give four positive integers texture,semantic,grid,token_dim "
                          "(the tiny profile: small=4,2,8,64)")
    peak = args.get("peak_tflops", "measure")
    if peak != "measure" and not _positive_float(peak):
        raise ConfigError(f"peak_tflops={peak}: give measure or a number of TFLOP/s > 0")
    if "device" in args:
        try:
            torch.device(args["device"])
        except RuntimeError:
            raise ConfigError(f"device={args['device']}: not a device (e.g. cuda, cuda:1, cpu)") from None
        if torch.device(args["device"]).type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={args['device']}: this machine has no CUDA device (device=cpu runs here)")
    return args


def _positive_float(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


@command(spec=SPEC)
def main(argv: list[str]) -> int:
    args = parse(argv)
    device = torch.device(args.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    backbones = args.get("backbones", "lightningdit-xl-1,lightningdit-b-1" if device.type == "cuda"
                         else "lightningdit-tiny-1").split(",")
    methods = args.get("methods", "sit,repa,sfd").split(",")
    torch.set_float32_matmul_precision("high")        # as benchmarks/run.py: TF32 for fp32 products
    if "threads" in args:
        torch.set_num_threads(int(args["threads"]))
    # small=4,2,8,64 -> texture, semantic channels, latent grid, token dim (the tiny profile: small=4,2,8,64)
    small = dict(zip(("texture", "semantic", "grid", "token_dim"), map(int, args["small"].split(",")))) \
        if "small" in args else None
    peak = args.get("peak_tflops", "measure" if device.type == "cuda" else "nan")
    if peak == "measure" and device.type != "cuda":
        raise ConfigError("peak_tflops=measure needs a CUDA device (it times a bf16 product); give a number")
    peak_tflops = round(matmul_ceiling(device), 1) if peak == "measure" else float(peak)
    print(f"bf16 matrix ceiling: {peak_tflops} TFLOP/s ({'measured' if peak == 'measure' else 'given'})", flush=True)
    out = Path(args.get("out", "results/speed"))
    out.mkdir(parents=True, exist_ok=True)
    tune = args.get("tune", "")
    if tune:
        import torch._inductor.config as inductor   # heavy (the compiler stack): only when tuning is asked for

        inductor.coordinate_descent_tuning = True
        if tune == "autotune":
            inductor.max_autotune = inductor.max_autotune_gemm = True
    profile_dir = out if args.get("profile", "0") == "1" else None
    lists = {k: args.get(k, d).split(",") for k, d in (
        ("batch", "128" if device.type == "cuda" else "32"), ("precision", "bf16" if device.type == "cuda" else "fp32"),
        ("compile", "auto"), ("sdpa", "auto"), ("layout", "bhsd"), ("kernels", "torch"), ("graph", "0"))}
    rows = []
    for bb, m, batch, precision, mode, sdpa, layout, kernels, graph in itertools.product(backbones, methods,
                                                                                         *lists.values()):
        batch, graph = int(batch), graph == "1"
        settings = {"backbone": bb, "method": m, "batch": batch, "precision": precision, "compile": mode,
                    "sdpa": sdpa, "layout": layout, "kernels": kernels, "graph": int(graph)}
        try:
            row = bench(bb, m, batch, precision, mode, int(args.get("steps", 30)), int(args.get("warmup", 10)),
                        device, peak_tflops, small, profile_dir, sdpa, args.get("sample", "1") != "0",
                        args.get("timing", "stream"), layout, kernels, graph)
        except Exception as e:  # noqa: BLE001 - a row that says why; the other configurations still run
            traceback.print_exc()
            row = {**settings, "error": "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError)
                   else f"{type(e).__name__}: {e}"[:300]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["peak_TFLOP_per_s"] = peak_tflops
        row["tune"] = tune or "default"
        print(row, flush=True)
        rows.append(row)
        df = pd.DataFrame(rows)
        df.to_csv(out / "speed.csv", index=False)
        (out / "speed.md").write_text(df.to_markdown(index=False) + "\n")
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
