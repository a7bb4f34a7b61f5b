"""Prepare every run of a grid at once (stage 2, docs/architecture.md): each distinct artifact, encoding and
latent cache is built once, independent ones in parallel threads; streamed runs are extracted here on one
machine (benchmarks/data/extract.py). The per-run pieces are benchmarks/data/prepare.py.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from benchmarks.data.extract import extract_run
from benchmarks.data.prepare import (FD_NET, Prepared, artifact_plan, build_encodings, build_node, encoding_kinds,
                                     prepare_run)
from benchmarks.data.run_data import data_key, load_data, streamed
from core.dag import run_dag
from core.types import ImageData


def prepare_grid(cfgs: list[dict], device: torch.device | str = "cpu", workers: int = 2) -> list[Prepared]:
    """Prepare many runs at once: every distinct artifact and encoding is built once, independent ones in
    parallel threads (torch releases the GIL in its kernels), each thread with cores/workers torch threads.

    The texture chain (VAE, its encodings) and the semantic chain (encoder, tokens, PCA, SemVAE) have no
    edge between them, so on 2 cores they overlap; the FD network fills a gap at the end. Streamed runs
    are extracted here in one process; on a cluster run benchmarks.extract as one job per GPU first.
    """
    device = torch.device(device)
    datas: dict[str, ImageData] = {}
    for c in cfgs:
        k = json.dumps(data_key(c), sort_keys=True)
        datas[k] = datas.get(k) or load_data(c)
    tasks: dict[str, tuple[Any, tuple[str, ...]]] = {}
    plans = [(c, artifact_plan(c)) for c in cfgs]
    ordered = [(c, n) for c, p in plans for n in p if n.kind != FD_NET] + \
              [(c, n) for c, p in plans for n in p if n.kind == FD_NET]
    for c, node in ordered:
        data = datas[json.dumps(data_key(c), sort_keys=True)]
        deps = {v: k for k, v in node.key_obj["deps"].items()}            # dep name -> slot
        tasks.setdefault(node.name, (lambda r, node=node, c=c, data=data, deps=deps:
                                     build_node(node, c, data, {deps[n]: d for n, d in r.items()}, device),
                                     tuple(deps)))
        if not streamed(c) and node.kind in encoding_kinds(c):      # streamed: sharded, extracted below
            tasks.setdefault(f"enc:{node.name}", (lambda r, node=node, c=c, data=data:
                                                   build_encodings(c, data, node.kind, r[node.name], device),
                                                   (node.name,)))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        run_dag(tasks, workers)
        for c in [c for c in cfgs if streamed(c)]:
            extract_run(c, device=device)               # one machine: the whole extraction here, rank 0 of 1
        runs = {f"run:{i}": (lambda r, c=c: prepare_run(c, device), ()) for i, c in enumerate(cfgs)}
        out = run_dag(runs, workers)
        return [out[f"run:{i}"] for i in range(len(cfgs))]
    finally:
        torch.set_num_threads(threads)
