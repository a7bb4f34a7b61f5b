"""Official checkpoint layouts written from docs/checkpoints.md and docs/methods.md §0.2, §5.3, §6.4, §7,
independently of the suite: architectures, the published tables, reference position/RoPE tables, a reference
forward, and random-weight files in the official containers. Used by tests/test_importers.py and
tests/test_paper_eval.py. The last section restates ADM's evaluator arithmetic for tests/test_adm_eval.py.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from backbones.dit import DiT
from methods.losses import build_projector


#################################################################################
#                  Official architectures, as their own code defines them        #
#################################################################################

@dataclass(frozen=True)
class Arch:
    """An official model's shape (test side, written from docs/checkpoints.md and docs/methods.md §7)."""

    lightning: bool                 # RMSNorm + SwiGLU + 2-D RoPE (LightningDiT, SFD); else LayerNorm + GELU
    depth: int
    width: int
    heads: int
    c_in: int
    c_out: int
    patch: int
    grid: int = 16                  # tokens per side: 256 tokens at 256 px
    dual_time: bool = False         # SFD's t_embedder_sem / t_embedder_tex
    qk_norm: bool = False
    projector: str | None = None    # key prefix of the REPA projector
    proj_dim: int = 2048
    enc_dim: int = 768              # DINOv2-B tokens


_SFD = dict(dual_time=True, qk_norm=True, projector="repa_projector")
FULL = {
    "dit-xl-2": Arch(False, 28, 1152, 16, 4, 8, 2),                  # learned σ: 8 output channels
    "repa-sit-xl-2": Arch(False, 28, 1152, 16, 4, 4, 2, projector="projectors.0"),
    "lightningdit-xl-1": Arch(True, 28, 1152, 16, 32, 32, 1),
    "sfd-xl-1": Arch(True, 28, 1152, 16, 48, 48, 1, **_SFD),
    "sfd-xxl-1": Arch(True, 24, 1536, 24, 48, 48, 1, **_SFD),        # LightningDiT-1p0B/1
    "sfd-guide-b-1": Arch(True, 12, 768, 12, 48, 48, 1, **_SFD),     # AutoGuidance LightningDiT-B/1
}
# Suite embedder index -> official name: the suite's t_embedders[j] reads channel group j (texture first).
TIME_NAMES = {k: ({0: "t_embedder_tex", 1: "t_embedder_sem"} if a.dual_time else {0: "t_embedder"})
              for k, a in FULL.items()}
CONTAINER = {"dit-xl-2": "bare", "repa-sit-xl-2": "train", "lightningdit-xl-1": "train",
             "sfd-xl-1": "ema", "sfd-xxl-1": "ema", "sfd-guide-b-1": "ema"}


def small(kind: str) -> Arch:
    return replace(FULL[kind], depth=2, width=64, heads=4, grid=4, proj_dim=128)


def ref_layout(a: Arch) -> dict[str, tuple[int, ...]]:
    """Official key -> shape: docs/checkpoints.md's tables, with every block and the given sizes."""
    d, hd, t = a.width, a.width // a.heads, a.grid ** 2
    ffn = int(2 / 3 * (4 * d))                       # LightningDiT SwiGLU hidden: int(2/3 · mlp_hidden)
    lay = {"pos_embed": (1, t, d), "x_embedder.proj.weight": (d, a.c_in, a.patch, a.patch),
           "x_embedder.proj.bias": (d,)}
    embedders = ["t_embedder_sem", "t_embedder_tex"] if a.dual_time else ["t_embedder"]
    w = d // len(embedders)
    for e in embedders:
        lay |= {f"{e}.mlp.0.weight": (w, 256), f"{e}.mlp.0.bias": (w,),
                f"{e}.mlp.2.weight": (w, w), f"{e}.mlp.2.bias": (w,)}
    lay["y_embedder.embedding_table.weight"] = (1001, d)
    if a.lightning:
        lay |= {"feat_rope.freqs_cos": (t, hd), "feat_rope.freqs_sin": (t, hd)}
    for i in range(a.depth):
        b = f"blocks.{i}."
        if a.lightning:
            lay |= {b + "norm1.weight": (d,), b + "norm2.weight": (d,)}
        lay |= {b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,)}
        if a.qk_norm:
            lay |= {b + "attn.q_norm.weight": (hd,), b + "attn.k_norm.weight": (hd,)}
        lay |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)}
        if a.lightning:
            lay |= {b + "mlp.w12.weight": (2 * ffn, d), b + "mlp.w12.bias": (2 * ffn,),
                    b + "mlp.w3.weight": (d, ffn), b + "mlp.w3.bias": (d,)}
        else:
            lay |= {b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                    b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)}
        lay |= {b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,)}
    if a.lightning:
        lay["final_layer.norm_final.weight"] = (d,)
    p = a.patch ** 2 * a.c_out
    lay |= {"final_layer.linear.weight": (p, d), "final_layer.linear.bias": (p,),
            "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,)}
    if a.projector:
        q, pd = a.projector, a.proj_dim
        lay |= {f"{q}.0.weight": (pd, d), f"{q}.0.bias": (pd,), f"{q}.2.weight": (pd, pd), f"{q}.2.bias": (pd,),
                f"{q}.4.weight": (a.enc_dim, pd), f"{q}.4.bias": (a.enc_dim,)}
    return lay


#################################################################################
#          docs/checkpoints.md, transcribed (blocks.0 and the non-block keys)         #
#################################################################################

_DIT = ("pos_embed:1,256,1152 x_embedder.proj.weight:1152,4,2,2 x_embedder.proj.bias:1152 "
        "t_embedder.mlp.0.weight:1152,256 t_embedder.mlp.0.bias:1152 t_embedder.mlp.2.weight:1152,1152 "
        "t_embedder.mlp.2.bias:1152 y_embedder.embedding_table.weight:1001,1152 blocks.0.attn.qkv.weight:3456,1152 "
        "blocks.0.attn.qkv.bias:3456 blocks.0.attn.proj.weight:1152,1152 blocks.0.attn.proj.bias:1152 "
        "blocks.0.mlp.fc1.weight:4608,1152 blocks.0.mlp.fc1.bias:4608 blocks.0.mlp.fc2.weight:1152,4608 "
        "blocks.0.mlp.fc2.bias:1152 blocks.0.adaLN_modulation.1.weight:6912,1152 blocks.0.adaLN_modulation.1.bias:6912 "
        "final_layer.adaLN_modulation.1.weight:2304,1152 final_layer.adaLN_modulation.1.bias:2304 ")
_LDIT = ("pos_embed:1,256,1152 feat_rope.freqs_cos:256,72 feat_rope.freqs_sin:256,72 "
         "y_embedder.embedding_table.weight:1001,1152 blocks.0.norm1.weight:1152 blocks.0.norm2.weight:1152 "
         "blocks.0.attn.qkv.weight:3456,1152 blocks.0.attn.qkv.bias:3456 blocks.0.attn.proj.weight:1152,1152 "
         "blocks.0.attn.proj.bias:1152 blocks.0.mlp.w12.weight:6144,1152 blocks.0.mlp.w12.bias:6144 "
         "blocks.0.mlp.w3.weight:1152,3072 blocks.0.mlp.w3.bias:1152 blocks.0.adaLN_modulation.1.weight:6912,1152 "
         "blocks.0.adaLN_modulation.1.bias:6912 final_layer.norm_final.weight:1152 "
         "final_layer.adaLN_modulation.1.weight:2304,1152 final_layer.adaLN_modulation.1.bias:2304 ")
_PROJ = ("{p}.0.weight:2048,1152 {p}.0.bias:2048 {p}.2.weight:2048,2048 {p}.2.bias:2048 "
         "{p}.4.weight:768,2048 {p}.4.bias:768 ")
PUBLISHED = {  # kind: (tensors, M values, table)
    "dit-xl-2": (292, 675.13, _DIT + "final_layer.linear.weight:32,1152 final_layer.linear.bias:32"),
    "repa-sit-xl-2": (298, 683.24, _DIT + _PROJ.format(p="projectors.0")
                      + "final_layer.linear.weight:16,1152 final_layer.linear.bias:16"),
    "lightningdit-xl-1": (351, 675.29, _LDIT + "x_embedder.proj.weight:1152,32,1,1 x_embedder.proj.bias:1152 "
                          "t_embedder.mlp.0.weight:1152,256 t_embedder.mlp.0.bias:1152 "
                          "t_embedder.mlp.2.weight:1152,1152 t_embedder.mlp.2.bias:1152 "
                          "final_layer.linear.weight:32,1152 final_layer.linear.bias:32"),
    "sfd-xl-1": (417, 682.80, _LDIT + _PROJ.format(p="repa_projector")
                 + "x_embedder.proj.weight:1152,48,1,1 x_embedder.proj.bias:1152 blocks.0.attn.q_norm.weight:72 "
                 "blocks.0.attn.k_norm.weight:72 final_layer.linear.weight:48,1152 final_layer.linear.bias:48 "
                 + " ".join(f"t_embedder_{g}.mlp.0.weight:576,256 t_embedder_{g}.mlp.0.bias:576 "
                            f"t_embedder_{g}.mlp.2.weight:576,576 t_embedder_{g}.mlp.2.bias:576"
                            for g in ("sem", "tex"))),
}


def parse_table(text: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(s) for s in v.split(",")) for k, v in (item.split(":") for item in text.split())}


def shown_part(layout: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """What docs/checkpoints.md's tables list: the non-block keys and blocks.0."""
    return {k: v for k, v in layout.items() if not k.startswith("blocks.") or k.startswith("blocks.0.")}


#################################################################################
#        Stored tables and the forward, written here from the spec               #
#################################################################################

def ref_pos_embed(dim: int, grid: int, *, column_first: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos table (1, T, dim), tokens row-major: the first half of the width encodes the column,
    the second the row (DiT's meshgrid(w, h)); each half is [sin, cos] at frequencies 10000^(−k/(dim/4))."""
    quarter = dim // 4
    omega = 10000.0 ** (-np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.divmod(np.arange(grid * grid), grid)

    def half(pos: np.ndarray) -> np.ndarray:
        ang = np.outer(pos, omega)
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    parts = [half(cols), half(rows)] if column_first else [half(rows), half(cols)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()[None]


def ref_rope(head_dim: int, grid: int, *, interleaved: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA-02 axial RoPE tables (T, head_dim): channels [0, hd/2) turn with the row, [hd/2, hd) with the
    column; pair i of an axis = channels (2i, 2i+1) at θ^(−2i/(hd/2)), θ = 10000 (docs/checkpoints.md: interleaved
    pairs). interleaved=False gives the half-split layout, which must be rejected."""
    half, ang = head_dim // 2, np.zeros((grid * grid, head_dim))
    for n in range(grid * grid):
        for k in range(head_dim):
            pos = n // grid if k < half else n % grid
            i = (k % half) // 2 if interleaved else (k % half) % (half // 2)
            ang[n, k] = pos * 10000.0 ** (-2 * i / half)
    return torch.from_numpy(np.cos(ang)).float(), torch.from_numpy(np.sin(ang)).float()


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def ref_time(sd: dict, name: str, t: torch.Tensor) -> torch.Tensor:
    """Spec §0.2: 256 features [cos, sin] at exp(−ln(10000)·k/128), then Linear → SiLU → Linear."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32, device=t.device) / 128)
    ang = t.float()[:, None] * freqs
    h = F.silu(F.linear(torch.cat([ang.cos(), ang.sin()], 1), sd[f"{name}.mlp.0.weight"], sd[f"{name}.mlp.0.bias"]))
    return F.linear(h, sd[f"{name}.mlp.2.weight"], sd[f"{name}.mlp.2.bias"])


def ref_attention(sd: dict, b: str, h: torch.Tensor, a: Arch) -> torch.Tensor:
    n, t, d = h.shape
    hd = d // a.heads
    qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])         # (N, T, 3D)
    q, k, v = qkv.reshape(n, t, 3, a.heads, hd).permute(2, 0, 3, 1, 4)              # 3 x (N, H, T, hd)
    if a.qk_norm:                                   # normalised before the rotation (LightningDiT order)
        q, k = _rms(q, sd[b + "attn.q_norm.weight"]), _rms(k, sd[b + "attn.k_norm.weight"])
    if a.lightning:                                 # x·cos + rot(x)·sin, rot: (x_2i, x_2i+1) -> (−x_2i+1, x_2i)
        cos, sin = sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"]

        def rot(z: torch.Tensor) -> torch.Tensor:
            pairs = z.reshape(*z.shape[:-1], hd // 2, 2)
            return torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(z.shape)

        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    att = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)
    return F.linear((att @ v).transpose(1, 2).reshape(n, t, d), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])


def ref_forward(sd: dict, a: Arch, x: torch.Tensor, times: list, y: torch.Tensor) -> torch.Tensor:
    """The official model on its own tensors. times: [(embedder name, (N,) time)] in concatenation order."""
    lin = lambda key, v: F.linear(v, sd[key + ".weight"], sd[key + ".bias"])  # noqa: E731
    if a.lightning:
        norm = lambda v, key: _rms(v, sd[key + ".weight"])  # noqa: E731
    else:
        norm = lambda v, key: F.layer_norm(v, v.shape[-1:], eps=1e-6)  # noqa: E731
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=a.patch)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]                     # (N, T, D)
    c = torch.cat([ref_time(sd, name, t) for name, t in times], 1) + sd["y_embedder.embedding_table.weight"][y]
    for i in range(a.depth):
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(b + "adaLN_modulation.1", F.silu(c))[:, None].chunk(6, -1)
        tok = tok + g1 * ref_attention(sd, b, norm(tok, b + "norm1") * (1 + sc1) + sh1, a)
        h = norm(tok, b + "norm2") * (1 + sc2) + sh2
        if a.lightning:
            gate, val = lin(b + "mlp.w12", h).chunk(2, -1)
            tok = tok + g2 * lin(b + "mlp.w3", F.silu(gate) * val)
        else:
            tok = tok + g2 * lin(b + "mlp.fc2", F.gelu(lin(b + "mlp.fc1", h), approximate="tanh"))
    sh, sc = lin("final_layer.adaLN_modulation.1", F.silu(c))[:, None].chunk(2, -1)
    out = lin("final_layer.linear", norm(tok, "final_layer.norm_final") * (1 + sc) + sh)   # (N, T, p·p·C)
    g, p = a.grid, a.patch
    return out.reshape(-1, g, g, p, p, a.c_out).permute(0, 5, 1, 3, 2, 4).reshape(-1, a.c_out, g * p, g * p)


#################################################################################
#                         Files and suite models                                #
#################################################################################

def random_official(a: Arch, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A random state dict in the official layout; stored tables are the true ones, weights scaled by fan-in."""
    g = torch.Generator(device).manual_seed(seed)
    sd = {}
    for k, shape in ref_layout(a).items():
        if k == "pos_embed":
            sd[k] = ref_pos_embed(a.width, a.grid).to(device)
        elif k.startswith("feat_rope."):
            sd[k] = ref_rope(a.width // a.heads, a.grid)[k.endswith("sin")].to(device)
        elif "norm" in k:
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:
            std = 0.1 if len(shape) == 1 else math.prod(shape[1:]) ** -0.5
            sd[k] = std * torch.randn(shape, generator=g, device=device)
    return sd


def write_official(path: Path, sd: dict, how: str, decoy: dict | None = None) -> Path:
    """bare: DiT's release; train: a train.py dict (the `model` entry is a decoy: `ema` must win); ema: SFD's."""
    obj = {"bare": lambda: sd, "ema": lambda: {"ema": sd},
           "train": lambda: {"model": decoy, "ema": sd, "opt": {"state": {}, "param_groups": []},
                             "args": argparse.Namespace(model="XL", lr=1e-4), "steps": 7}}[how]()
    torch.save(obj, path)
    return path


def suite_backbone(a: Arch, **kw) -> DiT:
    args = dict(in_channels=a.c_in, out_channels=a.c_out, input_size=a.grid * a.patch, num_classes=1000,
                patch_size=a.patch, depth=a.depth, hidden_size=a.width, num_heads=a.heads,
                time_inputs=2 if a.dual_time else 1, time_embed_order=(1, 0) if a.dual_time else None,
                norm="rmsnorm" if a.lightning else "layernorm", ffn="swiglu" if a.lightning else "gelu",
                rope=a.lightning, qk_norm=a.qk_norm)
    return DiT(**{**args, **kw})


def suite_projector(a: Arch):
    return build_projector(a.width, a.proj_dim, a.enc_dim) if a.projector else None


def official_name(suite: str, kind: str) -> str:
    """The test's own statement of the name mapping (patch embed `.proj`, time embedders by group)."""
    if suite.startswith("x_embedder."):
        return "x_embedder.proj." + suite.split(".", 1)[1]
    if m := re.match(r"t_embedders\.(\d+)\.(.*)", suite):
        return f"{TIME_NAMES[kind][int(m.group(1))]}.{m.group(2)}"
    return suite


#################################################################################
#   ADM's evaluator (guided-diffusion evaluations/evaluator.py), restated        #
#################################################################################
# Its arithmetic written again in numpy, independently of benchmarks/adm_eval.py, following the official
# structure: IS over `range(0, N, 5000)` splits of a float32 softmax; DistanceBlock's float16 graph and its
# tf.cond fallback to float32; ManifoldEstimator's row/column batches, np.partition radii and `<=` tests.
# tf.reduce_sum of float16 on the GPU adds in float16 in cub's order (tensorflow/core/kernels/
# reduction_gpu_kernels.cu.h: rows of >= 1024 columns go to cub's DeviceSegmentedReduce, 256 threads per
# row); the float16 matmul accumulates in float32 (TF_FP16_MATMUL_USE_FP32_COMPUTE), here exactly.

def adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    x = logits.astype(np.float32)
    e = np.exp(x - x.max(1, keepdims=True))
    preds = (e / e.sum(1, keepdims=True)).astype(np.float32)                   # tf.nn.softmax, float32
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def tf_gpu_row_sum(x: np.ndarray) -> np.ndarray:
    """Row sums of float16 x (N, D) as TF's GPU kernel adds them, written as its loops (vectorised over rows)."""
    n, d = x.shape
    threads = 256 if d >= 1024 else 32                 # cub segmented reduce / TF's one-warp RowReduceKernel
    per_thread = []
    for t in range(threads):
        acc = x[:, t] if t < d else np.zeros(n, np.float16)
        for c in range(t + threads, d, threads):
            acc = acc + x[:, c]                        # float16 + float16 -> float16
        per_thread.append(acc)
    warp_sums = []
    for w in range(0, threads, 32):                    # warp shuffle-down tree: offsets 1, 2, 4, 8, 16
        lanes = per_thread[w:w + 32]
        off = 1
        while off < 32:
            lanes = [lanes[i] + lanes[i + off] if i + off < 32 else lanes[i] for i in range(32)]
            off *= 2
        warp_sums.append(lanes[0])
    total = warp_sums[0]
    for part in warp_sums[1:]:
        total = total + part
    return total


def _adm_pairwise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """max(‖u‖² − 2 u·vᵀ + ‖v‖², 0) of float16 u, v (numpy float16 rounds after every operation)."""
    norm_u = tf_gpu_row_sum(np.square(u)).reshape(-1, 1)
    norm_v = tf_gpu_row_sum(np.square(v)).reshape(1, -1)
    uv = (u.astype(np.float64) @ v.astype(np.float64).T).astype(np.float16)
    return np.maximum(norm_u - np.float16(2) * uv + norm_v, np.float16(0))


def adm_distance_block(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        d16 = _adm_pairwise(u.astype(np.float32).astype(np.float16), v.astype(np.float32).astype(np.float16))
    if np.isfinite(d16).all():
        return d16.astype(np.float32)
    u32, v32 = u.astype(np.float32), v.astype(np.float32)                       # the float32 branch
    return np.maximum(np.square(u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + np.square(v32).sum(1)[None, :],
                      np.float32(0))


def adm_manifold_radii(features: np.ndarray, row_batch: int = 10000, col_batch: int = 10000,
                       k: int = 3) -> np.ndarray:
    n = len(features)
    radii = np.zeros([n], dtype=np.float32)
    distance_batch = np.zeros([row_batch, n], dtype=np.float32)
    for begin1 in range(0, n, row_batch):
        end1 = min(begin1 + row_batch, n)
        for begin2 in range(0, n, col_batch):
            end2 = min(begin2 + col_batch, n)
            distance_batch[0:end1 - begin1, begin2:end2] = adm_distance_block(features[begin1:end1],
                                                                              features[begin2:end2])
        radii[begin1:end1] = np.partition(distance_batch[0:end1 - begin1], np.arange(k + 1), axis=1)[:, k]
    return radii


def adm_precision_recall(ref: np.ndarray, samples: np.ndarray, row_batch: int = 10000, col_batch: int = 10000,
                         k: int = 3) -> tuple[float, float]:
    radii_1 = adm_manifold_radii(ref, row_batch, col_batch, k)
    radii_2 = adm_manifold_radii(samples, row_batch, col_batch, k)
    status_1 = np.zeros([len(ref)], dtype=bool)
    status_2 = np.zeros([len(samples)], dtype=bool)
    for begin_1 in range(0, len(ref), row_batch):
        end_1 = begin_1 + row_batch
        for begin_2 in range(0, len(samples), col_batch):
            end_2 = begin_2 + col_batch
            d = adm_distance_block(ref[begin_1:end_1], samples[begin_2:end_2])
            status_1[begin_1:end_1] |= np.any(d <= radii_2[None, begin_2:end_2], axis=1)
            status_2[begin_2:end_2] |= np.any(d <= radii_1[begin_1:end_1, None], axis=0)
    return float(np.mean(status_2)), float(np.mean(status_1))              # precision, recall
