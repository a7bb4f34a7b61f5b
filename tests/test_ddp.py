"""Data parallelism on the CPU (gloo, 2 processes): the same global batch gives the same training as one
process that splits it into the same 2 micro-batches (core/dist.py), to float tolerance, and evaluation
sampling sharded over the ranks gives the same scores."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from benchmarks.config.grid import expand
from core.rundir import RunDir

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from benchmarks.execution.train import run_job

    run_job(cfg, run_dir)
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_process(tmp_path, smoke_cache):
    (spec,) = expand("smoke", [f"cache_dir={smoke_cache}", "train.micro_batches=2", "train.steps=4",
                               "train.ckpt_every=2", "eval.batch_size=50"]).runs     # 2 sample chunks
    from benchmarks.execution.train import run_job

    run_job(spec.cfg, str(tmp_path / "one"))
    mp.spawn(_worker, args=(2, _free_port(), spec.cfg, str(tmp_path / "two")), nprocs=2, join=True)
    a, b = RunDir(tmp_path / "one"), RunDir(tmp_path / "two")
    assert a.is_done() and b.is_done()
    ca, cb = a.load_latest(), b.load_latest()
    for key in ("model", "ema"):
        for k, v in ca[key].items():
            torch.testing.assert_close(cb[key][k], v, rtol=1e-4, atol=1e-5, msg=f"{key}.{k}")
    la = [r["loss"] for r in a.rows("metrics.jsonl")]
    lb = [r["loss"] for r in b.rows("metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-5)
    ea, eb = a.rows("eval.jsonl"), b.rows("eval.jsonl")
    assert [r["step"] for r in eb] == [0, 4]                      # one row per eval point (rank 0 writes)
    # sampling was sharded over the 2 ranks and gathered: the same images, so the same scores
    assert [r["fd"] for r in eb] == pytest.approx([r["fd"] for r in ea], rel=1e-4)
    assert [r["class_acc"] for r in eb] == [r["class_acc"] for r in ea]
