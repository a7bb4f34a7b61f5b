"""Stage 3 (docs/architecture.md, "The stages of a grid"): the one training job, for every method.

`run_job(cfg, run_dir)` is a pure, picklable function of its arguments. Rerunning it resumes from the
newest valid checkpoint (or returns done.json); every step reseeds from (seed, step), so a resumed run
is bit-identical on CPU to an uninterrupted one. It never looks at which method it trains.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import torch
import torch.distributed as tdist
from torchvision.utils import save_image

from benchmarks.build.components import RunParts, build_run
from benchmarks.evaluation.scoring import ADMScorer, FDNetScorer, eval_labels, generate, reference_dir
from benchmarks.evaluation.phases import phase_figure
from benchmarks.config.plugins import load_all
from benchmarks.data.prepare import FD_NET, prepare_run
from benchmarks.execution.precision import autocast_ctx, resolve_device, set_residual_dtype
from benchmarks.execution.status import PROGRESS_FILE
from benchmarks.execution.trackers import Trackers, current_lr, open_trackers
from benchmarks.evaluation.protocol import eval_protocol, record_protocol
from core.machine import record_machine
from core.cache import full_verification
from core.compile import attention_context, compile_loss, compile_model, resolve_mode
from core.dist import Dist, all_reduce_grads, barrier, mean_over_ranks, setup
from core.errors import NonFiniteError
from core.ema import ema_decay, make_ema, update_ema
from benchmarks.execution.fingerprint import record_fingerprint
from core.graphs import GraphedGrads, check_device
from core.progress import publish
from core.rundir import RunDir
from core.runlock import RunHeld, RunLock, heartbeat_period, stale_after
from core.seed import seed_everything
from core.types import Batch

log = logging.getLogger(__name__)
LOGS = ("metrics.jsonl", "eval.jsonl")   # the run folder's append-only logs


def shard(batch: Batch, j: int, shards: int) -> Batch:
    """Shard j of `shards` equal slices of a batch (the batch size must divide)."""
    n = batch.x1.shape[0]
    if n % shards:
        raise ValueError(f"train.batch_size {n} is not divisible into {shards} micro-batches / processes")
    s = slice(j * n // shards, (j + 1) * n // shards)
    return Batch(batch.x1[s], batch.y[s], {k: v[s] for k, v in batch.aux.items()})


def eval_steps(cfg: dict) -> list[int]:
    steps, every = cfg["train"]["steps"], cfg["eval"]["every"]
    pts = set(s for s in cfg["eval"]["at"] if 0 <= s <= steps) | {steps}
    if every > 0:
        pts |= set(range(0, steps + 1, every))
    return sorted(pts)


@dataclass
class Trainer:
    cfg: dict
    rd: RunDir
    parts: RunParts
    device: torch.device
    scorer: Callable[[torch.Tensor, torch.Tensor], dict] | None   # (uint8 images, labels) -> metrics (evaluate.py)
    dist: Dist = Dist()

    def __post_init__(self) -> None:
        t = self.cfg["train"]
        self.params = [p for p in self.parts.model.parameters() if p.requires_grad] + \
                      [p for p in self.parts.method.loss.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=t["lr"], betas=tuple(t["betas"]),
                                     weight_decay=t["weight_decay"], fused=fused, foreach=not fused)
        self.ema = make_ema(self.parts.model)
        self.step = 0
        self.phase = "idle"              # where train_step is, for checkpoint_now()
        # Compiled in place after the EMA copy is made; the EMA (the sampling model) gets its own compiled
        # blocks, traced without grad at the eval batch size (core/compile.py). The residual dtype and the
        # attention kernel concern the training step only: evaluation samples in fp32.
        set_residual_dtype(self.parts.model, t["precision"])
        self.attention = attention_context(t["sdpa"])
        self.compile_mode = resolve_mode(t["compile"], self.device)
        self.forward = compile_model(self.parts.model, self.compile_mode)
        compile_loss(self.parts.method.loss, self.compile_mode)
        self.sampling_model = compile_model(self.ema, self.compile_mode)
        # train.cuda_graph: this rank's shards of every step replay one captured forward + backward
        shards, d = t["micro_batches"] or self.dist.world, self.dist
        self.shards = (shards, d.rank * shards // d.world, (d.rank + 1) * shards // d.world)  # all, lo, hi
        self.graphed = bool(t.get("cuda_graph", False))
        check_device(self.graphed, self.device)
        self.graph = GraphedGrads(self.shard_grads, self.params, self.device, self.shards[2] - self.shards[1]) \
            if self.graphed else None
        self.labels = eval_labels(self.cfg["eval"]["num_samples"], self.parts.num_classes,
                                  self.cfg["eval"]["sample_seed"])

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"step": self.step, "model": self.parts.model.state_dict(), "ema": self.ema.state_dict(),
                "loss": self.parts.method.loss.state_dict(), "opt": self.opt.state_dict()}

    def restore(self) -> None:
        """Resume from the newest valid checkpoint (or start afresh) and cut the logs back to it. Runs
        while this job is the run folder's one writer: temp files of killed writes are removed; a damaged
        row of metrics.jsonl / eval.jsonl (not a torn last line) raises CorruptFileError before either
        file is rewritten, so the run stops with that error and loses no row."""
        if self.dist.main:
            self.rd.remove_stale_tmp()
            for name in LOGS:
                self.rd.rows(name)       # both read before either is rewritten
        st = self.rd.load_latest(map_location=self.device)
        if st is None:                   # a fresh start: drop rows an attempt killed before its first checkpoint wrote
            if self.dist.main:
                self.rd.truncate_after("metrics.jsonl", 0)
                self.rd.truncate_after("eval.jsonl", -1)
            return
        self.parts.model.load_state_dict(st["model"])
        self.ema.load_state_dict(st["ema"])
        self.parts.method.loss.load_state_dict(st["loss"])
        self.opt.load_state_dict(st["opt"])
        self.step = int(st["step"])
        if self.dist.main:
            self.rd.truncate_after("metrics.jsonl", self.step)
            self.rd.truncate_after("eval.jsonl", self.step - 1)     # the eval at `step` is redone
        log.info("resumed %s at step %d", self.rd.path.name, self.step)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimizer step on the global batch: this rank's shards, each seeded by (seed, shard, step),
        losses averaged over all shards of all ranks (core/dist.py)."""
        t, d = self.cfg["train"], self.dist
        self.phase = "grads"
        (shards, lo, hi), n = self.shards, t["batch_size"]
        if n % shards:
            raise ValueError(f"train.batch_size {n} is not divisible into {shards} micro-batches / processes")
        batch = self.parts.feed.batch(self.step, slice(lo * n // shards, hi * n // shards))   # only its rows
        self.parts.model.train()
        if self.graph is None:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.graph.begin_step()
        grads = self.graph or self.shard_grads
        terms: dict[str, torch.Tensor] = {}
        for j in range(lo, hi):
            seed_everything(self.cfg["seed"], j, self.step)
            for k, v in grads(shard(batch, j - lo, hi - lo)).items():
                terms[k] = terms.get(k, 0.0) + v * d.world / shards
        all_reduce_grads(self.params, d)
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.params, t["grad_clip"])
        self.phase = "stepping"
        self.opt.step()
        self.phase = "stepped"
        self.finish_step()
        return terms

    def shard_grads(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward, loss and backward of one shard, the loss divided by the number of shards; the loss
        terms, detached. What train.cuda_graph captures and replays (core/graphs.py)."""
        with autocast_ctx(self.cfg["train"]["precision"], self.device, cache=not self.graphed), self.attention():
            out = self.parts.method.losses(self.forward, batch)
        (out.total / self.shards[0]).backward()
        return {"loss": out.total.detach(), **{f"loss/{k}": v.detach() for k, v in out.terms.items()}}

    def finish_step(self) -> None:
        t = self.cfg["train"]
        update_ema(self.ema, self.parts.model, ema_decay(t["ema_decay"], self.step, t["ema_warmup"]))
        self.step += 1
        self.phase = "idle"

    def checkpoint_now(self) -> Path | None:
        """Save a consistent checkpoint from a signal handler (preemption), wherever the step was
        interrupted: before the optimizer step the weights are still those of `self.step`; after it the
        EMA update is completed first. Inside the optimizer step (partial update) nothing can be saved
        and the newest periodic checkpoint is used instead."""
        if self.phase == "stepping":
            log.warning("%s: preempted inside the optimizer step; resuming from the last periodic checkpoint",
                        self.rd.path.name)
            return None
        if self.phase == "stepped":
            self.finish_step()
        if not self.dist.main:
            return None
        return self.rd.save_checkpoint(self.step, self.state(), keep=self.cfg["train"]["keep_ckpts"] + 1)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        e, p = self.cfg["eval"], self.parts
        t0 = time.time()
        try:
            images = generate(p.method, self.sampling_model, p.latent, p.latent_shape, self.labels,
                              seed=e["sample_seed"], batch_size=e["batch_size"], device=self.device, dist=self.dist)
        except NonFiniteError as err:
            raise NonFiniteError(f"step {self.step}: {err} ({self.nonfinite_hint()})") from None
        if images is None:               # not rank 0: its share of the samples went to rank 0
            return {}
        try:
            scores = self.scorer(images, self.labels)
        except NonFiniteError as err:
            raise NonFiniteError(f"step {self.step}: {err}") from None
        row = {"step": self.step, **scores,
               "nfe": p.method.last_nfe, "sec": round(time.time() - t0, 2)}
        # protocol.json at the first evaluation; every later one (a resume too) must match it (benchmarks/evaluation/protocol.py)
        record_protocol(self.rd.path, eval_protocol(self.cfg, p.method, self.scorer, row["nfe"]))
        self.rd.samples_dir.mkdir(parents=True, exist_ok=True)
        order = torch.argsort(self.labels[: e["grid_images"]], stable=True)
        save_image(images[: e["grid_images"]][order].float() / 255.0,
                   self.rd.samples_dir / f"step_{self.step:07d}.png", nrow=10)
        self.rd.append("eval.jsonl", row)
        return row

    def nonfinite_hint(self) -> str:
        """Why samples may be NaN/inf: a non-finite setting, weights that diverged, or the sampler."""
        keys = nonfinite_settings(self.cfg)
        if keys:
            return ", ".join(f"{k}={v}" for k, v in keys) + "?"
        if any(not torch.isfinite(v).all() for v in self.ema.state_dict().values() if v.is_floating_point()):
            return "the EMA weights hold NaN/inf"
        return "weights and settings are finite: the sampler diverged; check eval.guidance and eval.sampler"


def nonfinite_settings(cfg: dict, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every NaN/inf number in a config."""
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += nonfinite_settings(v, f"{prefix}{k}.")
        elif isinstance(v, float) and not math.isfinite(v):
            out.append((f"{prefix}{k}", v))
    return out


def make_scorer(cfg: dict, prepared, parts: RunParts, device: torch.device):
    """The eval metric of the profile (eval.metric): the FD network's (small profiles) or the ADM protocol's."""
    e = cfg["eval"]
    if e["metric"] == "adm":
        return ADMScorer(e["adm_ref"], e["inception"], device)
    ref_dir = reference_dir(cfg["cache_dir"], prepared.artifact_dirs[FD_NET], prepared.data, e["num_samples"],
                            device, parts.fdnet)
    return FDNetScorer(parts.fdnet, prepared.data.test_x, ref_dir, device)


def run_job(cfg: dict, run_dir: str) -> dict:
    """Train one run to cfg.train.steps with periodic evaluation; resumes when rerun.
    Holds the run folder's lock for the whole job (core/runlock.py); raises RunHeld when another live
    process holds it, before anything in the folder changes."""
    load_all()
    d = setup()                          # one process, or a rank of torchrun / a multi-task SLURM job
    with _run_lock(d, run_dir), publish(Path(run_dir) / PROGRESS_FILE if d.main else None):
        return _run_job(cfg, run_dir, d)      # (publish: the live table shows this job's prepare stages)


def lock_wait_s() -> float:
    """A SLURM job waits for a held lock to go stale (a requeue may start on another node while the dead
    node's heartbeat is still fresh, or while the cancelled process is still ending); a local or inline
    job skips a held run at once (a second launcher of the same grid)."""
    return stale_after() + 2 * heartbeat_period() if "SLURM_JOB_ID" in os.environ else 0.0


@contextlib.contextmanager
def _run_lock(d: Dist, run_dir: str):
    """Rank 0 holds the lock for the whole job: the ranks of one job are one writer (only rank 0 writes
    the folder) and cannot outlive each other, so per-rank locks would add files and no safety. Rank 0
    tells the other ranks whether it got the lock, so a held run stops on every rank, not in a barrier."""
    lock, held = RunLock(run_dir, wait_s=lock_wait_s()), None
    if d.main:
        try:
            lock.acquire()
        except RunHeld as e:
            held = e
    if d.world > 1:
        box = [None if held is None else held.holder]
        tdist.broadcast_object_list(box, src=0)
        if box[0] is not None and held is None:
            held = RunHeld(Path(run_dir), box[0])
    if held is not None:
        raise held
    try:
        yield
    finally:
        if d.main:
            lock.release()


def _run_job(cfg: dict, run_dir: str, d: Dist) -> dict:
    rd = RunDir(run_dir)
    if rd.is_done():                     # checked under the lock: a launcher that waited sees the finished run
        return rd.read_done()
    if d.main:
        rd.write_config(cfg)
        rd.clear_failed()
        record_fingerprint(rd.path, cfg)   # the code the run starts with (benchmarks/execution/fingerprint.py); kept on resume
    t = cfg["train"]
    if t["threads"] > 0:
        torch.set_num_threads(t["threads"])
    device = resolve_device(t["device"], d.local_rank)
    if d.main:
        record_machine(rd.path, device)  # floats are bit-identical only on one machine type (core/machine.py)
    with full_verification(bool(rd.checkpoints())):   # resuming (after a crash?): caches checked in full (core/cache.py)
        prepared = prepare_run(cfg, device)
        parts = build_run(cfg, prepared, device)
        trainer = Trainer(cfg, rd, parts, device, scorer=make_scorer(cfg, prepared, parts, device) if d.main else None,
                          dist=d)
    barrier(d)                           # every rank sees the same checkpoints
    trainer.restore()
    ACTIVE[:] = [trainer]
    try:
        with open_trackers(cfg, rd.path, trainer.step, d.main) as trackers:   # TensorBoard / W&B (trackers.py)
            return _loop(trainer, trackers)
    finally:
        ACTIVE.clear()


ACTIVE: list[Trainer] = []               # the trainer of this process, for the preemption handler


def checkpoint_active() -> Path | None:
    """Called by the submitit job's checkpoint() on SLURM's signal: save the running trainer's state."""
    return ACTIVE[0].checkpoint_now() if ACTIVE else None


def _loop(tr: Trainer, trackers: Trackers | None = None) -> dict:
    cfg, rd, t = tr.cfg, tr.rd, tr.cfg["train"]
    evals = eval_steps(cfg)
    t_start, t_log, last_eval, acc = time.time(), time.time(), None, {}
    last_finite: dict = {}
    main = tr.dist.main
    while True:
        if tr.step in evals and not any(r["step"] == tr.step for r in rd.rows("eval.jsonl")):
            try:
                last_eval, err = tr.evaluate(), None   # sampling sharded over ranks, scored on rank 0
            except NonFiniteError as e:  # NaN/inf samples, features or statistics: nothing was scored
                last_eval, err = None, e
            if _on_any_rank(err is not None, tr):      # a scoring failure is seen by rank 0 alone
                return _fail(rd, tr.step, f"evaluation: {err or 'NaN/inf on another rank'}", last_finite, stage="evaluation") if main \
                    else {"status": "failed", "step": tr.step}
            if main:
                log.info("%s step %d: %s", rd.path.name, tr.step, last_eval)
                if trackers is not None:
                    trackers.eval(last_eval, rd.samples_dir / f"step_{tr.step:07d}.png")
            barrier(tr.dist)
        if tr.step >= t["steps"]:
            break
        terms = tr.train_step()
        for k, v in terms.items():
            acc[k] = acc.get(k, 0.0) + v
        if tr.step % t["log_every"] == 0 or tr.step == t["steps"] or tr.step % t["ckpt_every"] == 0:
            n = (tr.step - 1) % t["log_every"] + 1
            acc = mean_over_ranks(acc, tr.dist)
            row = {k: float(v) / n for k, v in acc.items()}          # the one host sync per log interval
            if not all(math.isfinite(v) for v in row.values()):
                return _fail(rd, tr.step, "non-finite loss", last_finite, stage="training",
                             loss={k: str(v) for k, v in row.items()}) if main else {"status": "failed", "step": tr.step}
            row.update(step=tr.step, lr=current_lr(tr.opt), sec_per_step=(time.time() - t_log) / n)
            if main:
                rd.append("metrics.jsonl", row)
                if trackers is not None:
                    trackers.train(row)
            last_finite, acc, t_log = row, {}, time.time()
        if tr.step % t["ckpt_every"] == 0 or tr.step == t["steps"]:
            if main:
                rd.save_checkpoint(tr.step, tr.state(), keep=t["keep_ckpts"])
            barrier(tr.dist)
    if not main:
        return {"rank": tr.dist.rank, "step": tr.step}
    evals_rows = rd.rows("eval.jsonl")
    p = tr.parts
    phase_figure(p.method, tr.sampling_model, p.latent, p.latent_shape, rd.samples_dir / "phases.png", device=tr.device)
    done = {"step": tr.step, "final": evals_rows[-1] if evals_rows else last_eval,
            "first": evals_rows[0] if evals_rows else None, "wall_sec": round(time.time() - t_start, 1),
            "last_train": last_finite}
    rd.mark_done(done)
    if trackers is not None:
        trackers.finish(done)
    return done


def _on_any_rank(flag: bool, tr: Trainer) -> bool:
    if tr.dist.world == 1:
        return flag
    return bool(mean_over_ranks({"f": torch.tensor(float(flag), device=tr.device)}, tr.dist)["f"] > 0)


def _fail(rd: RunDir, step: int, reason: str, last_finite: dict, **details) -> dict:
    """Mark the run failed (failed.json: reason, step, stage = training | evaluation, details); the grid goes on."""
    payload = {"status": "failed", "reason": reason, "step": step, **details, "last_finite": last_finite}
    rd.mark_failed(payload)
    log.error("%s: %s at step %d; run marked failed (last finite train row: %s)", rd.path.name, reason, step,
              last_finite)
    return payload
