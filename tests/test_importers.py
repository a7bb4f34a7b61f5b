"""Official checkpoint import (benchmarks/evaluation/importers.py; docs/checkpoints.md, docs/methods.md §0.2, §5.3, §6.4, §7).

The released files are 0.5-4 GB, so the tests write random-weight files in the official layouts at a reduced
size (depth 2, width 64, 4 heads), with the stored position/RoPE tables computed here independently of the
suite, and check the full-size layouts on the meta device against the tables docs/checkpoints.md publishes.
Outputs are compared with a reference forward written here from the spec, on the file's own tensors.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from backbones.layers import RoPE2D, sincos_pos_embed_2d
from benchmarks.evaluation import importers as imp
from official_ref import (CONTAINER, FULL, PUBLISHED, official_name, parse_table, random_official, ref_forward,
                          ref_layout, ref_pos_embed, ref_rope, ref_time, shown_part, small, suite_backbone,
                          suite_projector, write_official)

SPEC = Path(__file__).resolve().parents[1] / "docs" / "checkpoints.md"


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
#            (b) full-size layouts against docs/checkpoints.md                   #
#################################################################################

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
    """The test's own layout writer reproduces docs/checkpoints.md: names, shapes, tensor and value counts."""
    tensors, mvalues, table = PUBLISHED[kind]
    layout = ref_layout(FULL[kind])
    assert shown_part(layout) == parse_table(table)
    assert len(layout) == tensors
    assert round(sum(math.prod(s) for s in layout.values()) / 1e6, 2) == mvalues


@pytest.mark.parametrize("kind", list(imp.KINDS))
def test_importer_expects_the_official_layout_at_full_size(kind):
    """The layout the importer derives from the suite's full-size preset model (meta device: no memory)
    is the official one, so a released file loads with nothing missing, extra or mis-shaped."""
    backbone = imp.suite_backbone(kind, "meta")     # the full-size model on the meta device: no memory
    layout = imp.official_layout(kind, backbone, imp.suite_projector(kind, backbone.hidden_size, "meta"))
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
