"""GPU-hour estimates for a grid's runs from the measured speed table (`--dry-run`, docs/paper_scale.md).

Training: steps × global batch / (img/s per GPU × GPUs), with img/s per GPU from the row of the speed table
(`python -m benchmarks.speed`, committed under results/reference/speed-*/) for the run's backbone and
method. Stated assumptions, printed with every estimate:
  - a method without its own row uses the flow baseline's (`sit`) row of the same backbone (the methods
    differ by a few input channels and small heads: SFD vs sit at XL/1 is 2 % more FLOPs, 7 % slower);
  - the table's per-GPU batch (128) is assumed: smaller per-GPU batches run below it;
  - data-parallel scaling is taken as linear (no all-reduce cost);
  - fp32 runs (the DiT/SiT/ReDi papers' precision) are taken as 2× slower than the bf16 row (TF32 matrix
    units run at half the bf16 rate; not measured here).
Evaluation: eval points × samples × sampler NFE (×2 with guidance) / the row's sampling img/s per forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SPEED_TABLES = sorted((Path(__file__).resolve().parents[2] / "results" / "reference").glob("speed-*/speed*.csv"))
FP32_SLOWDOWN = 2.0
ADAPTIVE_NFE = 100          # dopri5 at rtol 1e-3: an assumption for planning, the real count is logged per eval


@dataclass
class Estimate:
    img_per_s_per_gpu: float
    source: str
    train_gpu_h: float
    eval_gpu_h: float

    @property
    def total_gpu_h(self) -> float:
        return self.train_gpu_h + self.eval_gpu_h


def load_speed_table(paths: list[Path] | None = None) -> pd.DataFrame:
    """Every measured row (errors such as out-of-memory dropped); the newest file wins on duplicates."""
    frames = [pd.read_csv(p).assign(table=str(p.relative_to(p.parents[3]))) for p in (paths or SPEED_TABLES)]
    if not frames:
        return pd.DataFrame(columns=["backbone", "method", "img_per_s", "GFLOP_per_img", "sample_fwd_img_per_s"])
    df = pd.concat(frames, ignore_index=True)
    if "error" in df:
        df = df[df["error"].isna()]
    return df.drop_duplicates(["backbone", "method", "batch", "precision", "compile"], keep="last")


def sampler_nfe(sampler: dict) -> int:
    """Model evaluations per sample for a sampler config (adaptive solvers: ADAPTIVE_NFE, an assumption)."""
    name, solver, steps = sampler.get("name"), sampler.get("solver"), int(sampler.get("steps", 250) or 250)
    if name == "ode" and solver in ("dopri5", None):
        return ADAPTIVE_NFE
    if name == "ode" and solver == "heun":
        return 2 * steps
    return steps


def _row(table: pd.DataFrame, backbone: str, method: str) -> tuple[pd.Series | None, str]:
    rows = table[(table["backbone"] == backbone) & (table["method"] == method)]
    if len(rows):
        r = rows.iloc[-1]
        return r, f"{r['table']}: {backbone} {method}"
    base = table[(table["backbone"] == backbone) & (table["method"] == "sit")]
    if len(base):
        r = base.iloc[-1]
        return r, f"{r['table']}: {backbone} sit (no {method} row)"
    return None, f"no row for {backbone} in the speed table"


def estimate(cfg: dict, gpus: int, table: pd.DataFrame) -> Estimate | None:
    """GPU-hours of one resolved run config on `gpus` GPUs, or None without a matching speed row."""
    backbone, method = cfg["backbone"]["name"], cfg["method"]["name"]
    row, source = _row(table, backbone, method)
    if row is None:
        return None
    img_s = float(row["img_per_s"])
    if cfg["train"]["precision"] == "fp32":
        img_s /= FP32_SLOWDOWN
        source += f", fp32 ÷{FP32_SLOWDOWN:g}"
    t = cfg["train"]
    train_h = t["steps"] * t["batch_size"] / img_s / 3600          # GPU-seconds are the same on any GPU count
    e = cfg["eval"]
    points = len({*e["at"], *(range(e["every"], t["steps"] + 1, e["every"]) if e["every"] else ()), t["steps"]})
    sampler = {**cfg["method"]["sampler"], **e["sampler"]}
    guided = 2 if e["guidance"] else 1
    eval_h = points * e["num_samples"] * sampler_nfe(sampler) * guided / float(row["sample_fwd_img_per_s"]) / 3600
    return Estimate(img_per_s_per_gpu=img_s, source=source, train_gpu_h=train_h, eval_gpu_h=eval_h)


def assumptions() -> str:
    return (f"assumptions: per-GPU throughput of the table's batch-128 row, linear data-parallel scaling, fp32 "
            f"runs ÷{FP32_SLOWDOWN:g}, adaptive samplers {ADAPTIVE_NFE} NFE, missing methods from the same "
            f"backbone's sit row (benchmarks/reporting/estimate.py)")
