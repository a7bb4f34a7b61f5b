"""Official checkpoint import: the released DiT, REPA (SiT), LightningDiT and SFD weights loaded into the
suite's own DiT class, and the REPA projector into the method's loss (docs/checkpoints.md, docs/methods.md §0.2,
§5.3, §6.4, §7). Names are mapped, never guessed: an unknown, missing or mis-shaped tensor is an error.

    imp = load_official("SFD-XL.pt", "sfd-xl-1", device="cuda")
    method = imp.build_method()                      # the `sfd` preset, projector loaded
    x1 = method.sample(imp.model, noise, y)          # project time convention, like any suite model
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from benchmarks.config import presets as api
from core.errors import CheckpointError
from core.torchfile import UntrustedFileError, load_weights_file
from core.types import Groups
from methods.compose import build_method
from methods.losses import RepaCfg, build_projector as build_mlp

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the official kinds

@dataclass(frozen=True)
class OfficialKind:
    """One released model: its source, the suite presets it loads into, its layout facts.
    time_embedders: (official name, channel group it reads; None = the one shared time) in the order the
        official model concatenates them into t_emb (SFD: semantic first, §6.4). projector: key prefix of the
        REPA projector. repa_time: REPA's convention (t = 0 data, v = ε − x, §0.1), converted at import.
    tensors/values: the full-size official state dict (projector and stored tables included); `published`:
        stated by docs/checkpoints.md (else derived from the layout, tests/test_importers.py)."""

    name: str
    source: str
    backbone: str
    method: str
    groups: tuple[tuple[str, int], ...]
    input_size: int
    time_embedders: tuple[tuple[str, str | None], ...] = (("t_embedder", None),)
    projector: str | None = None
    encoder_dim: int = 0
    repa_time: bool = False
    tensors: int = 0
    values: int = 0
    published: bool = False

    @property
    def group_spec(self) -> Groups:
        return Groups(tuple(n for n, _ in self.groups), tuple(c for _, c in self.groups))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.group_spec.channels, self.input_size, self.input_size)


_SFD = dict(method="sfd", groups=(("texture", 32), ("semantic", 16)), input_size=16,
            time_embedders=(("t_embedder_sem", "semantic"), ("t_embedder_tex", "texture")),
            projector="repa_projector", encoder_dim=768)

KINDS: dict[str, OfficialKind] = {k.name: k for k in (
    OfficialKind("dit-xl-2", "facebookresearch/DiT DiT-XL-2-256x256.pt (bare EMA state dict)", "dit-xl-2",
                 "dit", (("texture", 4),), 32, tensors=292, values=675_129_632, published=True),
    OfficialKind("repa-sit-xl-2", "sihyun-yu/REPA SiT-XL/2 last.pt ({'ema', 'model', ...})", "dit-xl-2",
                 "repa", (("texture", 4),), 32, projector="projectors.0", encoder_dim=768, repa_time=True,
                 tensors=298, values=683_242_512, published=True),
    OfficialKind("lightningdit-xl-1", "hustvl/LightningDiT lightningdit-xl-imagenet256-{64,800}ep.pt ({'ema', ...})",
                 "lightningdit-xl-1", "vavae", (("texture", 32),), 16, tensors=351, values=675_293_600,
                 published=True),
    OfficialKind("sfd-xl-1", "SFD-Project/SFD model_weights, LightningDiT-XL/1 ({'ema', ...})", "lightningdit-xl-1",
                 tensors=417, values=682_802_288, published=True, **_SFD),
    OfficialKind("sfd-xxl-1", "SFD-Project/SFD model_weights, LightningDiT-1p0B/1 ({'ema', ...})",
                 "lightningdit-1p0b-1", tensors=361, values=1_037_224_240, **_SFD),
    OfficialKind("sfd-guide-b-1", "SFD-Project/SFD model_weights, AutoGuidance LightningDiT-B/1 ({'ema', ...})",
                 "lightningdit-b-1", tensors=193, values=137_665_072, **_SFD),
)}


def get_kind(kind: str | OfficialKind) -> OfficialKind:
    if isinstance(kind, OfficialKind):
        return kind
    if kind not in KINDS:
        raise CheckpointError(f"unknown official checkpoint kind {kind!r}; valid: {', '.join(KINDS)}")
    return KINDS[kind]


# ---------------------------------------------------------------------------- containers (docs/checkpoints.md)

def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def unwrap_container(obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The weights to import from a loaded file: a bare state dict as is, else `ema` when present (every
    official sampler uses EMA weights, docs/methods.md §0.2), else `model`. A DDP `module.` or torch.compile
    `_orig_mod.` prefix on every key is removed. Returns (state, info)."""
    info: dict[str, Any] = {}
    if _is_state_dict(obj):
        state, info["weights"] = dict(obj), "bare"
    elif isinstance(obj, Mapping) and ("ema" in obj or "model" in obj):
        info["weights"] = "ema" if "ema" in obj else "model"
        state = obj[info["weights"]]
        if not _is_state_dict(state):
            raise CheckpointError(f"checkpoint[{info['weights']!r}] is not a state dict of tensors")
        state = dict(state)
        if info["weights"] == "model":
            log.warning("checkpoint has no 'ema' entry: importing the raw training weights ('model')")
    else:
        keys = sorted(str(k) for k in obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"not an official checkpoint: expected a state dict or a dict with 'ema'/'model', "
                              f"got {keys}")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            info.setdefault("stripped_prefixes", []).append(prefix)
    return state, info


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a .pt/.ckpt file on the CPU (memory-mapped where possible) and unwrap it.

    Official training files also hold `args` (an argparse.Namespace, allowed) and optimizer state; any other
    pickled object is refused unless trust_pickle=True (full unpickling runs code: trusted files only).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist; docs/checkpoints.md lists where each "
                                f"kind is published ({', '.join(KINDS)})")
    try:
        obj = load_weights_file(path, trust_pickle=trust_pickle)
    except UntrustedFileError as e:
        raise CheckpointError(str(e)) from None
    state, info = unwrap_container(obj)
    info["path"] = str(path)
    return state, info


# ---------------------------------------------------------------------------- name mapping

def _time_embedder_map(kind: OfficialKind, backbone: nn.Module) -> dict[str, int]:
    """Official embedder name -> suite `t_embedders` index. The suite feeds t_embedders[j] the time of
    channel group j (texture first), and concatenates them in `time_embed_order`; that order must equal the
    official concatenation (`kind.time_embedders` order, SFD: semantic first), or t_emb would differ."""
    groups = kind.group_spec
    index = {name: (0 if group is None else groups.index(group)) for name, group in kind.time_embedders}
    if len(set(index.values())) != len(index) or len(index) != backbone.time_inputs:
        raise CheckpointError(f"{kind.name}: the model has {backbone.time_inputs} time embedder(s), the file "
                              f"{len(index)} ({', '.join(index)})")
    official_order = tuple(index[name] for name, _ in kind.time_embedders)
    if tuple(backbone.time_embed_order) != official_order:
        raise CheckpointError(
            f"{kind.name}: the model concatenates its time embedders in order {tuple(backbone.time_embed_order)} "
            f"but the official conditioning is concat({', '.join(n for n, _ in kind.time_embedders)}), i.e. "
            f"order {official_order} (docs/methods.md §6.4); build it with time_embed_order={list(official_order)}")
    return index


def official_names(kind: str | OfficialKind, backbone: nn.Module) -> dict[str, str]:
    """Official parameter name -> suite parameter name, for every tensor of the suite backbone. Only two
    differ: the patch embedding (the official PatchEmbed wraps its conv as `.proj`) and the timestep
    embedders (`t_embedder`, or SFD's `t_embedder_sem` / `t_embedder_tex`)."""
    kind = get_kind(kind)
    by_index = {j: name for name, j in _time_embedder_map(kind, backbone).items()}

    def official(suite: str) -> str:
        suite = re.sub(r"^x_embedder\.", "x_embedder.proj.", suite)
        return re.sub(r"^t_embedders\.(\d+)\.", lambda m: by_index[int(m.group(1))] + ".", suite)

    return {official(suite): suite for suite in backbone.state_dict()}


def stored_tables(backbone: nn.Module) -> dict[str, Tensor]:
    """The fixed tables official files store but the suite recomputes (non-persistent buffers there):
    `pos_embed` (1, T, D) and, with RoPE, `feat_rope.freqs_cos/sin` (T, head_dim)."""
    tables = {"pos_embed": backbone.pos_embed}
    rope = backbone.blocks[0].attn.rope
    if rope is not None:
        tables["feat_rope.freqs_cos"], tables["feat_rope.freqs_sin"] = rope.cos, rope.sin
    return tables


def official_layout(kind: str | OfficialKind, backbone: nn.Module,
                    projector: nn.Module | None = None) -> dict[str, tuple[int, ...]]:
    """Official key -> shape that a file of this kind must hold for this suite backbone (and projector);
    works on meta tensors, so full-size layouts cost no memory."""
    kind = get_kind(kind)
    params = backbone.state_dict()
    layout = {name: tuple(t.shape) for name, t in stored_tables(backbone).items()}
    layout.update({off: tuple(params[suite].shape) for off, suite in official_names(kind, backbone).items()})
    if kind.projector is not None:
        if projector is None:
            raise CheckpointError(f"{kind.name}: the file carries a REPA projector; pass the module to load it into")
        layout.update({f"{kind.projector}.{k}": tuple(v.shape) for k, v in projector.state_dict().items()})
    return layout


# ---------------------------------------------------------------------------- checks and the two conversions

def check_tables(state: Mapping[str, Tensor], backbone: nn.Module, kind_name: str) -> list[str]:
    """Stored position/RoPE tables must equal the suite's own (docs/methods.md §0.2, §5.3): they are not loaded, so a
    difference would silently change which token sits where. Returns the names checked."""
    checked = []
    for name, own in stored_tables(backbone).items():
        stored = state[name]
        # Tolerance of the stored dtype: fp32 tables (official) agree to ~1e-6; a bf16 copy to its rounding.
        atol = 1e-4 if stored.dtype in (torch.float32, torch.float64) else 4 * torch.finfo(stored.dtype).eps
        diff = (stored.detach().double().cpu() - own.detach().double().cpu()).abs().max().item()
        if not diff <= atol:
            hint = ("the 2-D sin-cos positions differ (grid, row/column halves or sin/cos order)" if name == "pos_embed"
                    else "the RoPE layout differs (interleaved pairs vs half split, row/column order, θ)")
            raise CheckpointError(f"{kind_name}: stored {name} differs from the suite's table (max |Δ| = {diff:.3g} "
                                  f"> {atol:.1g}): {hint}")
        checked.append(name)
    return checked


def remap_legacy_repa(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """REPA's older layout (its generate.py `--legacy`) numbers the blocks after the projector depth as
    `decoder_blocks.{i}`; they are `blocks.{encoder_depth + i}`. The encoder depth is the number of
    `blocks.*` entries present. Returns (state, encoder_depth), depth 0 when the layout is current."""
    if not any(k.startswith("decoder_blocks.") for k in state):
        return state, 0
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    renumber = lambda m: f"blocks.{depth + int(m.group(1))}."  # noqa: E731
    return {re.sub(r"^decoder_blocks\.(\d+)\.", renumber, k): v for k, v in state.items()}, depth


def fold_repa_time(state: dict[str, Tensor], freq_dim: int, max_period: float = 10000.0) -> None:
    """Make a REPA model speak the project convention with no wrapper (docs/methods.md §0.1, §11.2), in place on a
    suite-named state: model'(x, t) = −model(x, 1 − t). The sinusoid of 1 − t is a fixed rotation of that of
    t (cos ω(1−t) = cos ω·cos ωt + sin ω·sin ωt, sin ω(1−t) = sin ω·cos ωt − cos ω·sin ωt), so it folds into
    the first timestep Linear, the velocity sign into the final Linear; exact up to rounding (float64)."""
    half = freq_dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    c, s = torch.diag(omega.cos()), torch.diag(omega.sin())
    rot = torch.cat([torch.cat([c, s], 1), torch.cat([s, -c], 1)], 0)      # (F, F): f(1 − t) = rot · f(t)
    key = "t_embedders.0.mlp.0.weight"
    state[key] = state[key].double() @ rot                                   # (D, F); cast when loaded
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        state[key] = -state[key]


def _listing(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_official_state(state: Mapping[str, Tensor], kind: str | OfficialKind, backbone: nn.Module,
               projector: nn.Module | None = None) -> dict[str, Any]:
    """Load an unwrapped official state dict into a suite backbone (and the loss's projector), strictly:
    CheckpointError lists unexpected, missing or mis-shaped keys, or names a stored table that differs.
    Returns info: tensors/values in the file, tables checked, conversions applied."""
    kind = get_kind(kind)
    state, legacy_depth = remap_legacy_repa(dict(state)) if kind.repa_time else (dict(state), 0)
    layout = official_layout(kind, backbone, projector)
    unexpected, missing = set(state) - set(layout), set(layout) - set(state)
    if unexpected or missing:
        raise CheckpointError(f"{kind.name}: the file does not match the official layout for "
                              f"{kind.backbone} (depth {backbone.depth}, width {backbone.hidden_size}):"
                              + (f" unexpected keys: {_listing(unexpected)};" if unexpected else "")
                              + (f" missing keys: {_listing(missing)}" if missing else ""))
    bad = [f"{k} {tuple(state[k].shape)} (expected {layout[k]})" for k in layout if tuple(state[k].shape) != layout[k]]
    if bad:
        raise CheckpointError(f"{kind.name}: shape mismatch: {_listing(bad)}")
    info: dict[str, Any] = {"kind": kind.name, "tensors": len(state), "values": sum(v.numel() for v in state.values()),
                            "tables_checked": check_tables(state, backbone, kind.name), "converted": []}
    suite = {s: state[o] for o, s in official_names(kind, backbone).items()}
    if legacy_depth:
        info["converted"].append(f"legacy REPA layout: decoder_blocks.i -> blocks.{legacy_depth}+i")
    if kind.repa_time:
        fold_repa_time(suite, backbone.t_embedders[0].freq_dim)
        info["converted"].append("REPA time: t -> 1 - t folded into t_embedders.0.mlp.0, output sign into final_layer")
    backbone.load_state_dict(suite, strict=True)
    if kind.projector is not None:
        prefix = kind.projector + "."
        projector.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    return info


# ---------------------------------------------------------------------------- the suite model and the entry point

def method_config(kind: str | OfficialKind, overrides: Sequence[str] = ()) -> dict:
    """The kind's method preset (resolved `method` block), e.g. `sfd` for the SFD models."""
    return api.preset(get_kind(kind).method, overrides=list(overrides))


def suite_backbone(kind: str | OfficialKind, device: str | torch.device = "cpu") -> nn.Module:
    """The suite backbone at the kind's full size, built from its presets exactly as a run builds it
    (backbone preset + the method's `backbone:` overrides, output width and time inputs from the schedule)."""
    kind = get_kind(kind)
    c, h, _ = kind.latent_shape
    with torch.device(device):
        return api.backbone(kind.backbone, method_cfg=method_config(kind), in_channels=c, input_size=h,
                            num_classes=1000, groups=kind.group_spec)


def suite_projector(kind: str | OfficialKind, hidden_size: int, device: str | torch.device = "cpu") -> nn.Module | None:
    """The REPA projector the kind's method loss builds (methods/losses.py), or None without one."""
    kind = get_kind(kind)
    if kind.projector is None:
        return None
    repa = RepaCfg(**method_config(kind)["loss"]["repa"])
    with torch.device(device):
        return build_mlp(hidden_size, repa.projector_dim, kind.encoder_dim)


@dataclass
class ImportedModel:
    """An official model inside the suite: `model` is a plain suite backbone in the project's time
    convention (eval mode, no gradients), usable wherever a run's EMA model is."""

    kind: OfficialKind
    model: nn.Module
    projector: nn.Module | None
    info: dict[str, Any]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.model.in_channels, self.model.input_size, self.model.input_size)

    def model_fn(self) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """(x, t_model, y) -> output, the form samplers and AutoGuidance guides take."""
        return lambda x, t, y: self.model(x, t, y).out

    def build_method(self, *, overrides: Sequence[str] = (), sampler_overrides: dict | None = None,
                     guidance: Any = "method") -> Any:
        """The kind's method preset for this model, the imported projector loaded into its loss. `overrides`:
        a dotlist on the preset; `sampler_overrides`, `guidance`: as in methods.compose.build_method."""
        method = build_method(method_config(self.kind, overrides), groups=self.kind.group_spec,
                              hidden_size=self.model.hidden_size, encoder_dim=self.kind.encoder_dim,
                              null_label=self.model.null_label, sampler_overrides=sampler_overrides,
                              guidance=guidance)
        head = getattr(method.loss, "projector", None)         # only flow losses with REPA have one
        if head is not None and self.projector is not None:
            head.load_state_dict(self.projector.state_dict())
        method.loss.to(next(self.model.parameters()).device)
        return method


def load_official(path: str | Path, kind: str | OfficialKind, *, device: str | torch.device = "cpu",
                  backbone: nn.Module | None = None, projector: nn.Module | None = None,
                  trust_pickle: bool = False) -> ImportedModel:
    """Read an official checkpoint file (its EMA weights when present) into the suite's model for `kind`.

    backbone, projector: modules to load into (tests pass reduced-size ones); by default the kind's full-size
    presets are built on `device`. Raises CheckpointError naming unknown/missing/mis-shaped keys or a differing
    position/RoPE table."""
    kind = get_kind(kind)
    state, info = read_checkpoint(path, trust_pickle=trust_pickle)
    if backbone is None:
        backbone = suite_backbone(kind, device)
    if projector is None and kind.projector is not None:
        projector = suite_projector(kind, backbone.hidden_size, device)
    info.update(load_official_state(state, kind, backbone, projector))
    backbone.eval().requires_grad_(False)
    if projector is not None:
        projector.eval().requires_grad_(False)
    log.info("imported %s from %s (%s weights, %d tensors, %.2f M values)", kind.name, path, info["weights"],
             info["tensors"], info["values"] / 1e6)
    return ImportedModel(kind=kind, model=backbone, projector=projector, info=info)


def attach_guide(method: Any, guide: ImportedModel) -> None:
    """Use an imported model as the AutoGuidance guide of `method` (SFD: the B/1 guide, docs/methods.md §6.6)."""
    if getattr(method, "guidance", None) is None or not hasattr(method.guidance, "guide"):
        raise CheckpointError("attach_guide needs a method built with autoguidance, e.g. build_method(guidance="
                              "{'name': 'autoguidance', 'scale': 1.5})")
    if method.schedule.groups != guide.kind.group_spec:
        raise CheckpointError(f"guide {guide.kind.name} works on groups {guide.kind.group_spec}, the method on "
                              f"{method.schedule.groups}: AutoGuidance needs the same latent")
    method.guidance.guide = guide.model_fn()
