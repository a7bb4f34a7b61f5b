"""Data parallelism inside one job: process group from torchrun's or SLURM/submitit's environment,
gradient all-reduce, rank-0 helpers. One process (the default) needs none of it.

The training step splits the global batch into `micro_batches` shards whose randomness is seeded by
(seed, shard, step); a rank processes its contiguous share of the shards. So a 2-process run and a
1-process run with 2 micro-batches compute the same thing (tests/test_ddp.py), and gradient accumulation
on one GPU is the same code path.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env() -> tuple[int, int, int] | None:
    """(rank, world, local_rank) from torchrun (RANK/WORLD_SIZE) or from SLURM tasks (submitit)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        import submitit

        env = submitit.JobEnvironment()
        os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
        os.environ.setdefault("MASTER_PORT", str(20000 + int(env.job_id.split("_")[0]) % 20000))
        return env.global_rank, env.num_tasks, env.local_rank
    return None


def setup() -> Dist:
    """Initialise the default process group once when the environment describes several processes."""
    found = _env()
    if found is None or found[1] == 1:
        return Dist()
    rank, world, local = found
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        log.info("process group: rank %d of %d (%s)", rank, world, dist.get_backend())
    return Dist(rank, world, local)


def all_reduce_grads(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Sum gradients over ranks (each rank already divided its loss by the number of shards)."""
    if d.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def mean_over_ranks(values: dict[str, torch.Tensor], d: Dist) -> dict[str, torch.Tensor]:
    if d.world == 1:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].float().reshape(()) for k in keys])
    dist.all_reduce(flat)
    return {k: v / d.world for k, v in zip(keys, flat)}


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def gather_to_main(part: dict, d: Dist) -> dict | None:
    """Merge every rank's dict on rank 0 (None elsewhere); pickled through the process group."""
    if d.world == 1:
        return part
    parts: list = [None] * d.world if d.main else None   # type: ignore[assignment]
    dist.gather_object(part, parts, dst=0)
    if not d.main:
        return None
    return {k: v for p in parts for k, v in p.items()}
