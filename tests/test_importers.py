"""Official checkpoint import (benchmarks/importers.py; spec CHECKPOINTS.md, METHODS.md §0.2, §5.3, §6.4, §7).

The released files are 0.5-4 GB, so the tests write random-weight files in the official layouts at a reduced
size (depth 2, width 64, 4 heads), with the stored position/RoPE tables computed here independently of the
suite, and check the full-size layouts on the meta device against the tables CHECKPOINTS.md publishes.
Outputs are compared with a reference forward written here from the spec, on the file's own tensors.
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbones.dit import DiT
from backbones.layers import RoPE2D, sincos_pos_embed_2d
from benchmarks import importers as imp
from methods.losses import build_projector

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "CHECKPOINTS.md"


#################################################################################
#                  Official architectures, as their own code defines them        #
#################################################################################

@dataclass(frozen=True)
class Arch:
    """An official model's shape (test side, written from CHECKPOINTS.md and METHODS.md §7)."""

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
    """Official key -> shape: CHECKPOINTS.md's tables, with every block and the given sizes."""
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
#          CHECKPOINTS.md, transcribed (blocks.0 and the non-block keys)         #
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
    """What CHECKPOINTS.md's tables list: the non-block keys and blocks.0."""
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
    column; pair i of an axis = channels (2i, 2i+1) at θ^(−2i/(hd/2)), θ = 10000 (CHECKPOINTS.md: interleaved
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


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """kind -> (Arch, the file's state dict, path, ImportedModel): one reduced-size file per kind."""
    root, out = tmp_path_factory.mktemp("official"), {}
    for i, kind in enumerate(imp.KINDS):
        a = small(kind)
        sd = random_official(a, seed=i)
        path = write_official(root / f"{kind}.pt", sd, CONTAINER[kind], decoy=random_official(a, seed=100 + i))
        loaded = imp.load_official(path, kind, backbone=suite_backbone(a), projector=suite_projector(a))
        out[kind] = (a, sd, path, loaded)
    return out


#################################################################################
#               (b) full-size layouts against CHECKPOINTS.md                     #
#################################################################################

@pytest.mark.skipif(not SPEC.exists(), reason="CHECKPOINTS.md is not beside this checkout")
def test_transcribed_tables_match_checkpoints_md():
    text = SPEC.read_text()
    for kind, (tensors, mvalues, table) in PUBLISHED.items():
        head = {"dit-xl-2": "### DiT-XL/2", "repa-sit-xl-2": "### SiT-XL/2 with REPA",
                "lightningdit-xl-1": "### LightningDiT-XL/1", "sfd-xl-1": "### SFD LightningDiT-XL/1"}[kind]
        section = text[text.index(head):].split("\n### ")[0]
        rows = re.findall(r"^\| `([^`]+)` \| \(([^)]*)\) \|", section, flags=re.M)
        table_md = {k: tuple(int(s) for s in v.replace(" ", "").rstrip(",").split(",")) for k, v in rows}
        assert table_md == parse_table(table)
        assert f"{tensors} tensors, {mvalues:.2f} M values" in section.splitlines()[0]


@pytest.mark.parametrize("kind", list(PUBLISHED))
def test_reference_layout_is_the_published_one(kind):
    """The test's own layout writer reproduces CHECKPOINTS.md: names, shapes, tensor and value counts."""
    tensors, mvalues, table = PUBLISHED[kind]
    layout = ref_layout(FULL[kind])
    assert shown_part(layout) == parse_table(table)
    assert len(layout) == tensors
    assert round(sum(math.prod(s) for s in layout.values()) / 1e6, 2) == mvalues


@pytest.mark.parametrize("kind", list(imp.KINDS))
def test_importer_expects_the_official_layout_at_full_size(kind):
    """The layout the importer derives from the suite's full-size preset model (meta device: no memory)
    is the official one, so a released file loads with nothing missing, extra or mis-shaped."""
    layout = imp.expected_layout(kind)
    assert layout == ref_layout(FULL[kind])
    k = imp.KINDS[kind]
    assert (len(layout), sum(math.prod(s) for s in layout.values())) == (k.tensors, k.values)
    if kind in PUBLISHED:
        assert k.published and (k.tensors, round(k.values / 1e6, 2)) == PUBLISHED[kind][:2]


def test_stored_tables_written_here_equal_the_suites():
    """The independent tables above and the suite's agree at full size (pos_embed D = 1152, 1536, 768;
    RoPE head_dim 72 (XL) and 64 (XXL, B)), so released files pass the importer's table check."""
    for dim in (1152, 1536, 768):
        assert torch.allclose(sincos_pos_embed_2d(dim, 16), ref_pos_embed(dim, 16), atol=1e-5)
    for head_dim in (72, 64):
        rope, (cos, sin) = RoPE2D(head_dim, 16), ref_rope(head_dim, 16)
        assert torch.allclose(rope.cos, cos, atol=1e-5) and torch.allclose(rope.sin, sin, atol=1e-5)


#################################################################################
#                 (a) reduced-size files load tensor for tensor                  #
#################################################################################

@pytest.mark.parametrize("kind", list(imp.KINDS))
def test_small_file_loads_every_tensor(kind, imported):
    a, sd, _, m = imported[kind]
    # REPA's time convention is folded into these three (checked against the reference forward below).
    folded = {"t_embedders.0.mlp.0.weight", "final_layer.linear.weight", "final_layer.linear.bias"} \
        if kind == "repa-sit-xl-2" else set()
    read = {"pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin"} & set(sd)
    for name, value in m.model.state_dict().items():
        read.add(official_name(name, kind))
        if name not in folded:
            assert torch.equal(value, sd[official_name(name, kind)]), name
    if a.projector:
        for name, value in m.projector.state_dict().items():
            read.add(f"{a.projector}.{name}")
            assert torch.equal(value, sd[f"{a.projector}.{name}"]), name
    assert read == set(sd)                                   # every tensor of the file has a place
    assert m.info["weights"] == ("bare" if CONTAINER[kind] == "bare" else "ema")
    assert m.info["tensors"] == len(sd)
    assert m.model.y_embedder.embedding_table.weight.shape[0] == 1001 and m.model.null_label == 1000
    assert not m.model.training and not any(p.requires_grad for p in m.model.parameters())


#################################################################################
#          (c) outputs equal the official forward on the file's tensors          #
#################################################################################

@pytest.mark.parametrize("kind", list(imp.KINDS))
def test_forward_equals_reference(kind, imported):
    """SFD with t_tex ≠ t_sem (embedder order), DiT with integer indices and learned σ, REPA through the
    convention fold (suite(x, t) = −REPA(x, 1 − t)), labels including the null row 1000."""
    a, sd, _, m = imported[kind]
    g = torch.Generator().manual_seed(1)
    size = a.grid * a.patch
    x, y = torch.randn(3, a.c_in, size, size, generator=g), torch.tensor([0, 999, 1000])
    t = torch.tensor([0.1, 0.5, 0.9])
    if a.dual_time:
        t_tex, t_sem = torch.tensor([0.0, 0.25, 0.7]), torch.tensor([0.3, 0.55, 1.0])
        ours = m.model(x, torch.stack([t_tex, t_sem], 1), y).out
        ref = ref_forward(sd, a, x, [("t_embedder_sem", t_sem), ("t_embedder_tex", t_tex)], y)
    elif kind == "dit-xl-2":
        t = torch.tensor([0.0, 499.0, 999.0])                       # DiT embeds the DDPM index
        ours, ref = m.model(x, t, y).out, ref_forward(sd, a, x, [("t_embedder", t)], y)
    elif kind == "repa-sit-xl-2":
        ours, ref = m.model(x, t, y).out, -ref_forward(sd, a, x, [("t_embedder", 1 - t)], y)
    else:
        ours, ref = m.model(x, t, y).out, ref_forward(sd, a, x, [("t_embedder", t)], y)
    assert ours.shape == (3, a.c_out, size, size)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_sfd_time_embedding_is_semantic_then_texture(imported):
    """Spec §6.4 / §11.10: t_emb = concat(E_sem(t_sem), E_tex(t_tex)) with the file's two embedders."""
    a, sd, _, m = imported["sfd-xl-1"]
    t_tex, t_sem = torch.tensor([0.0, 0.4]), torch.tensor([0.3, 0.9])
    emb = m.model.time_embedding(torch.stack([t_tex, t_sem], 1))
    half = a.width // 2
    torch.testing.assert_close(emb[:, :half], ref_time(sd, "t_embedder_sem", t_sem))
    torch.testing.assert_close(emb[:, half:], ref_time(sd, "t_embedder_tex", t_tex))
    moved = m.model.time_embedding(torch.stack([t_tex + 0.1, t_sem], 1))
    assert torch.equal(moved[:, :half], emb[:, :half]) and not torch.equal(moved[:, half:], emb[:, half:])


@pytest.mark.parametrize("kind", list(imp.KINDS))
def test_imported_model_samples_with_its_method(kind, imported):
    """The public path: the kind's method preset, projector loaded into its loss, a short sampler."""
    a, _, _, m = imported[kind]
    sampler = {"name": "ddpm", "steps": 3} if kind == "dit-xl-2" else {"name": "ode", "solver": "euler", "steps": 3}
    overrides = ["method.loss.repa.projector_dim=128"] if a.projector else []
    method = m.build_method(overrides=overrides, sampler_overrides=sampler, guidance=None)
    if a.projector:
        assert torch.equal(method.loss.projector[4].weight, m.projector[4].weight)
    x1 = method.sample(m.model, torch.randn(2, *m.latent_shape), torch.tensor([3, 1000]))
    assert x1.shape == (2, *m.latent_shape) and torch.isfinite(x1).all()


def test_sfd_autoguidance_with_the_imported_guide(imported):
    main, guide = imported["sfd-xl-1"][3], imported["sfd-guide-b-1"][3]
    method = main.build_method(overrides=["method.loss.repa.projector_dim=128"],
                               sampler_overrides={"name": "ode", "solver": "euler", "steps": 2},
                               guidance={"name": "autoguidance", "scale": 1.5})
    imp.attach_guide(method, guide)
    noise, y = torch.randn(2, *main.latent_shape), torch.tensor([5, 6])
    guided = method.sample(main.model, noise, y)
    assert torch.isfinite(guided).all()
    assert not torch.equal(guided, method.sample(main.model, noise, y, guidance=None))
    with pytest.raises(imp.CheckpointError, match="autoguidance"):
        imp.attach_guide(main.build_method(overrides=["method.loss.repa.projector_dim=128"], guidance=None), guide)


#################################################################################
#                   Containers, legacy layouts, (d) bad files                    #
#################################################################################

def _load(path: Path, kind: str, **backbone_kw):
    a = small(kind)
    return imp.load_official(path, kind, backbone=suite_backbone(a, **backbone_kw), projector=suite_projector(a))


def test_legacy_repa_layout_and_prefixes(imported, tmp_path):
    """REPA's `--legacy` naming (blocks after the projector depth as decoder_blocks.i) and a DDP prefix."""
    _, sd, _, ref = imported["repa-sit-xl-2"]
    legacy = {re.sub(r"^blocks\.1\.", "decoder_blocks.0.", k): v for k, v in sd.items()}
    assert any(k.startswith("decoder_blocks.0.") for k in legacy)
    m = _load(write_official(tmp_path / "legacy.pt", legacy, "ema"), "repa-sit-xl-2")
    assert any("legacy" in c for c in m.info["converted"])
    prefixed = _load(write_official(tmp_path / "ddp.pt", {"module." + k: v for k, v in sd.items()}, "ema"),
                     "repa-sit-xl-2")
    assert prefixed.info["stripped_prefixes"] == ["module."]
    for other in (m, prefixed):
        for (name, v), w in zip(other.model.state_dict().items(), ref.model.state_dict().values()):
            assert torch.equal(v, w), name


def _break(kind: str, change: str, sd: dict) -> dict:
    sd = dict(sd)
    a = small(kind)
    if change == "extra":
        sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    elif change == "missing":
        del sd["blocks.1.mlp.w3.bias"]
    elif change == "suite-names":
        sd = {k.replace("t_embedder_sem.", "t_embedders.1."): v for k, v in sd.items()}
    elif change == "no-null-row":
        sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][:1000]
    elif change == "row-first-positions":
        sd["pos_embed"] = ref_pos_embed(a.width, a.grid, column_first=False)
    elif change == "half-split-rope":
        sd["feat_rope.freqs_cos"], sd["feat_rope.freqs_sin"] = ref_rope(a.width // a.heads, a.grid, interleaved=False)
    return sd


@pytest.mark.parametrize("change, message", [
    ("extra", r"unexpected keys: blocks\.0\.attn\.extra\.weight"),
    ("missing", r"missing keys: blocks\.1\.mlp\.w3\.bias"),
    ("suite-names", r"unexpected keys: t_embedders\.1\.mlp\.0\.bias.*missing keys: t_embedder_sem\.mlp\.0\.bias"),
    ("no-null-row", r"y_embedder\.embedding_table\.weight \(1000, 64\) \(expected \(1001, 64\)\)"),
    ("row-first-positions", r"stored pos_embed differs"),
    ("half-split-rope", r"stored feat_rope\.freqs_cos differs.*interleaved"),
])
def test_bad_file_names_the_key(change, message, imported, tmp_path):
    sd = _break("sfd-xl-1", change, imported["sfd-xl-1"][1])
    with pytest.raises(imp.CheckpointError, match=message):
        _load(write_official(tmp_path / f"{change}.pt", sd, "ema"), "sfd-xl-1")


def test_time_embedder_order_is_checked(imported):
    """A suite SFD model built texture-first would condition on concat(tex, sem): refused, with the fix."""
    with pytest.raises(imp.CheckpointError, match=r"time_embed_order=\[1, 0\]"):
        _load(imported["sfd-xl-1"][2], "sfd-xl-1", time_embed_order=(0, 1))


class Opaque:
    """A pickled object that is not a tensor, a container or argparse.Namespace."""


def test_containers_and_untrusted_pickles(imported, tmp_path):
    sd = imported["lightningdit-xl-1"][1]
    with pytest.raises(imp.CheckpointError, match="unknown official checkpoint kind 'sfd'; valid: dit-xl-2"):
        imp.get_kind("sfd")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(imp.CheckpointError, match="not an official checkpoint"):
        _load(tmp_path / "list.pt", "lightningdit-xl-1")
    torch.save({"model": sd}, tmp_path / "model_only.pt")
    assert _load(tmp_path / "model_only.pt", "lightningdit-xl-1").info["weights"] == "model"
    torch.save({"ema": sd, "extra": Opaque()}, tmp_path / "opaque.pt")
    with pytest.raises(imp.CheckpointError, match="trust_pickle=True"):
        _load(tmp_path / "opaque.pt", "lightningdit-xl-1")
    a = small("lightningdit-xl-1")
    m = imp.load_official(tmp_path / "opaque.pt", "lightningdit-xl-1", backbone=suite_backbone(a), trust_pickle=True)
    assert m.info["weights"] == "ema"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "absent.pt", "lightningdit-xl-1")


#################################################################################
#              Full size on a GPU (skipped by default: -m gpu)                   #
#################################################################################

@pytest.mark.gpu
@pytest.mark.parametrize("kind", list(imp.KINDS))
def test_full_size_file_on_gpu(kind, tmp_path):
    """A full-size random file (0.5-4 GB) per kind: loads on the GPU and matches the reference forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a, dev = FULL[kind], "cuda"
    sd = random_official(a, seed=0, device=dev)
    path = write_official(tmp_path / "full.pt", {k: v.cpu() for k, v in sd.items()}, CONTAINER[kind], decoy=None)
    with torch.device(dev):
        backbone, projector = suite_backbone(a), suite_projector(a)
    m = imp.load_official(path, kind, backbone=backbone, projector=projector)
    path.unlink()
    assert m.info["tensors"] == imp.KINDS[kind].tensors and m.info["values"] == imp.KINDS[kind].values
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        g = torch.Generator(dev).manual_seed(1)
        size = a.grid * a.patch
        x = torch.randn(2, a.c_in, size, size, generator=g, device=dev)
        y = torch.tensor([7, 1000], device=dev)
        t = torch.tensor([0.2, 0.8], device=dev)
        if a.dual_time:
            ours = m.model(x, torch.stack([t * 0.5, t], 1), y).out
            ref = ref_forward(sd, a, x, [("t_embedder_sem", t), ("t_embedder_tex", t * 0.5)], y)
        elif kind == "repa-sit-xl-2":
            ours, ref = m.model(x, t, y).out, -ref_forward(sd, a, x, [("t_embedder", 1 - t)], y)
        else:
            t = t * 999 if kind == "dit-xl-2" else t
            ours, ref = m.model(x, t, y).out, ref_forward(sd, a, x, [("t_embedder", t)], y)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert torch.isfinite(ref).all()
    assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max()
