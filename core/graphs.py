"""`train.cuda_graph=true`: the training step's forward, loss and backward replayed as one CUDA graph.

Why. With per-block compilation a LightningDiT-XL step launches over a thousand kernels from ≈ 60 compiled
graphs, and the GPU idles wherever the host falls behind (≈ 11 ms of gaps in a 258 ms step in the H200
profile, docs/performance.md). A CUDA graph launches all of the forward and backward with one call.

What is captured, and what is not (decisions, each with its reason):
- Captured: the method's loss on one shard of the batch (forward, REPA head, loss terms) and its backward
  into the parameters' `.grad`. The random draws of a step (noise, time, label or DINO drop) come from
  torch's default CUDA generator; a graph reads that generator's seed and offset when it is replayed, so
  `seed_everything(seed, shard, step)` before each replay keeps every step seeded by (seed, shard, step)
  as in eager mode (the same seed, not necessarily the same numbers as an eager step: the draws of a
  captured kernel are placed by offsets counted at capture).
- Not captured: the data feed (its batch is copied into static input buffers), the cross-rank all-reduce,
  gradient clipping, the fused AdamW step and the EMA update. Each is a few multi-tensor kernels; keeping
  them out leaves the optimizer, its state dict and checkpoints exactly as in eager mode (no `capturable`
  optimizer) and lets the learning rate and EMA decay stay Python numbers.
- Gradients. With one shard per process the graph writes `.grad` itself: the capture starts from
  `.grad = None`, as in PyTorch's whole-network capture example, so each replay overwrites the same
  tensors and no zeroing pass is needed. With several shards (train.micro_batches) `.grad` is zeroed
  (one foreach kernel) before the first shard and the graph accumulates into it.
- The first WARMUP steps of every start run eagerly on a side stream: compilation, Triton autotuning and
  the lazy set-up of cuBLAS, cuDNN and the optimizer state must happen before a capture. The next step
  captures, then replays; every later step replays.
- Autocast runs with its weight-cast cache off in graph mode (a requirement of capture), in the warm-up
  steps as well, so that the compiled code is traced once under one autocast state.
- Memory: the graph keeps its activations and gradients in a private pool between steps, so the step's
  peak stays reserved while the run evaluates.

On the CPU (the CI machine) there is nothing to capture and `train.cuda_graph=true` is an error; the tests
set EMULATE_ON_CPU to run the same plumbing (static buffers, warm-up count, gradient policy) with a plain
call in place of capture and replay, and compare it with the eager step (tests/test_graphs.py). The capture
itself is tested on a GPU only (the same file, with SEMPRIOR_TEST_DEVICE=cuda).
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from core.types import Batch

WARMUP = 3               # eager steps of every start before the capture (PyTorch's examples use 3)
EMULATE_ON_CPU = False   # tests only: the plumbing without capture on a CPU


def check_device(enabled: bool, device: torch.device) -> None:
    if enabled and device.type != "cuda" and not EMULATE_ON_CPU:
        raise ValueError(f"train.cuda_graph=true needs a CUDA device; this run is on {device.type} "
                         "(set train.cuda_graph=false, or train.device=cuda on a GPU machine)")


class GraphedGrads:
    """Runs `fn(batch) -> {name: 0-dim loss tensor}` (forward, loss and backward of one shard) eagerly for
    WARMUP steps, then captures it once and replays it. Call `begin_step()` once per optimizer step, before
    the step's shards; each call returns the terms of that shard (fresh tensors, safe to keep)."""

    def __init__(self, fn: Callable[[Batch], dict[str, Tensor]], params: list[Tensor], device: torch.device,
                 shards: int) -> None:
        self.fn, self.params, self.device = fn, params, device
        self.accumulate = shards > 1          # several shards: zero, then accumulate (see the module docstring)
        self.on_gpu = device.type == "cuda"   # False only when the tests emulate on the CPU
        self.steps = 0                        # optimizer steps begun on this instance
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch | None = None
        self.out: dict[str, Tensor] = {}
        self.side = torch.cuda.Stream(device) if self.on_gpu else None
        self.capture_seconds = float("nan")   # host time of the capture (benchmarks.speed reports it)

    @property
    def captured(self) -> bool:
        return self.static is not None

    def begin_step(self) -> None:
        self.steps += 1
        if self.steps <= WARMUP:
            for p in self.params:             # eager semantics
                p.grad = None
        elif self.accumulate:                 # the warm-up left every .grad allocated: zero, then accumulate
            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])
        # one shard: each replay overwrites .grad (the capture itself starts from None, _capture)

    def __call__(self, batch: Batch) -> dict[str, Tensor]:
        if self.steps <= WARMUP:
            return self._warmup(batch)
        if not self.captured:
            self._capture(batch)
        self._load(batch)
        if self.on_gpu:
            self.graph.replay()
        else:                                 # emulation: what a replay computes, by a plain call
            if not self.accumulate:
                for p in self.params:
                    p.grad = None
            self.out = self.fn(self.static)
        return {k: v.clone() for k, v in self.out.items()}

    def _warmup(self, batch: Batch) -> dict[str, Tensor]:
        if self.side is None:
            return self.fn(batch)
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            out = self.fn(batch)
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        return out

    def _capture(self, batch: Batch) -> None:
        self.static = Batch(batch.x1.clone(), batch.y.clone(), {k: v.clone() for k, v in batch.aux.items()})
        if not self.on_gpu:
            return
        if not self.accumulate:
            for p in self.params:             # the backward allocates .grad from the graph's pool
                p.grad = None
        rng = torch.cuda.get_rng_state(self.device)
        t0 = time.perf_counter()
        self.graph = torch.cuda.CUDAGraph()
        # On the warm-up's stream (its cuBLAS workspace is set up). thread_local: CUDA calls that a capture
        # forbids are refused in this thread only, so a data thread (ShardedLatentFeed's prefetch pins
        # host memory for the next batch) may run during the capture; the backward's autograd thread
        # launches onto the capturing stream and is captured either way.
        with torch.cuda.graph(self.graph, stream=self.side, capture_error_mode="thread_local"):
            self.out = self.fn(self.static)
        self.capture_seconds = time.perf_counter() - t0
        torch.cuda.set_rng_state(rng, self.device)   # the capture ran nothing; replay draws from this state

    def _load(self, batch: Batch) -> None:
        pairs = [(self.static.x1, batch.x1), (self.static.y, batch.y)]
        if set(batch.aux) != set(self.static.aux):
            raise ValueError(f"train.cuda_graph: the batch's aux keys changed from {sorted(self.static.aux)} "
                             f"to {sorted(batch.aux)}; a captured step needs the same inputs every step")
        pairs += [(self.static.aux[k], v) for k, v in batch.aux.items()]
        for dst, src in pairs:
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise ValueError(f"train.cuda_graph: a batch tensor changed from {tuple(dst.shape)} {dst.dtype} "
                                 f"to {tuple(src.shape)} {src.dtype}; a captured step needs the same shapes "
                                 "every step (train.cuda_graph=false runs any shape)")
            dst.copy_(src, non_blocking=True)
