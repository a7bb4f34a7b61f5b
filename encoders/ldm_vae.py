"""LDM-format KL-autoencoders (latent-diffusion `AutoencoderKL` naming, https://arxiv.org/abs/2112.10752) ->
diffusers `AutoencoderKL`: SFD's texture tokenizer `ldm-imagenet256-f16d32-50ep.ckpt` (docs/methods.md §6.1) and
LightningDiT's VA-VAE `vavae-imagenet256-f16d32-dinov2.pt` (docs/methods.md §5.1; layouts: docs/checkpoints.md).

The architecture is read off the state dict (widths per level, res blocks, which levels have attention,
latent width), so the released f16d32 files (ch 128, ch_mult 1,1,2,2,4, double_z, attention at the 16×16
level) and the tests' tiny random-weight files go through one code path. diffusers' own single-file
converter maps resnets only inside the down/up levels; the f16d32 models also have attention there.
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from core.torchfile import load_weights_file

# Keys the autoencoder is made of; everything else (loss.* = LPIPS + discriminator + logvar, VA-VAE's
# training-only reverse_proj / foundation-model copies, EMA or optimizer leftovers) is dropped and counted.
KEEP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
LDM_GROUPS = 32          # LDM's Normalize() is GroupNorm(32, C, eps=1e-6): not recoverable from the weights
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# ---------------------------------------------------------------------------------------------------
# Reading the file
# ---------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Tensor]:
    """The state dict in an LDM checkpoint: `{"state_dict": ...}` (Lightning .ckpt), a bare dict (.pt), or
    a .safetensors file. `trust_pickle` lets torch.load run arbitrary pickled code (only for files whose
    source you trust); by default only tensors and plain containers are unpickled.
    """
    obj = load_weights_file(path, trust_pickle=trust_pickle)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (bare, or under 'state_dict'), "
                         f"got {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else '-'}")
    return state


def split_autoencoder(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """(the autoencoder's tensors, {dropped top-level name: number of tensors})."""
    kept = {k: v for k, v in state.items() if k.startswith(KEEP)}
    dropped = Counter(k.split(".", 1)[0] for k in state if not k.startswith(KEEP))
    if not any(k.startswith("encoder.down.") for k in kept):
        raise ValueError(f"no encoder.down.* keys: not an LDM-format autoencoder (top-level names: "
                         f"{sorted(dropped) or sorted({k.split('.', 1)[0] for k in kept})})")
    return kept, dict(sorted(dropped.items()))


# ---------------------------------------------------------------------------------------------------
# Architecture and names
# ---------------------------------------------------------------------------------------------------


def _indices(state: dict[str, Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers i of keys `<prefix>.<i>.…`."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def ldm_config(state: dict[str, Tensor]) -> dict:
    """diffusers AutoencoderKL constructor kwargs for an LDM autoencoder state dict (KEEP keys only)."""
    levels = _indices(state, "encoder.down")
    if levels != list(range(len(levels))) or _indices(state, "decoder.up") != levels:
        raise ValueError(f"encoder.down levels {levels} and decoder.up levels {_indices(state, 'decoder.up')} "
                         "must both be 0..L-1")
    widths = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    n_blocks = len(_indices(state, "encoder.down.0.block"))
    if int(state["encoder.conv_in.weight"].shape[0]) != widths[0]:
        raise ValueError("conv_in width differs from level 0 (ch_mult[0] != 1): no diffusers equivalent")
    if len(_indices(state, "decoder.up.0.block")) != n_blocks + 1:
        raise ValueError(f"decoder levels must have num_res_blocks + 1 = {n_blocks + 1} blocks (LDM Decoder)")
    enc_attn = [any(k.startswith(f"encoder.down.{i}.attn.") for k in state) for i in levels]
    dec_attn = [any(k.startswith(f"decoder.up.{i}.attn.") for k in state) for i in levels]
    if enc_attn != dec_attn:
        raise ValueError(f"attention levels differ: encoder {enc_attn}, decoder {dec_attn}")
    z, embed = (int(s) for s in state["post_quant_conv.weight"].shape[:2])   # Conv(embed_dim -> z_channels)
    if z != embed:
        raise ValueError(f"embed_dim {embed} != z_channels {z}: diffusers' AutoencoderKL has one latent width")
    if int(state["encoder.conv_out.weight"].shape[0]) != 2 * z:
        raise ValueError("encoder.conv_out must output mean and log-variance (double_z: true, docs/methods.md §5.1)")
    return dict(
        in_channels=int(state["encoder.conv_in.weight"].shape[1]),
        out_channels=int(state["decoder.conv_out.weight"].shape[0]),
        down_block_types=["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in enc_attn],
        # diffusers' up_blocks run from the deepest level up; LDM's decoder.up is indexed by level
        up_block_types=["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(dec_attn)],
        block_out_channels=widths, layers_per_block=n_blocks, latent_channels=z, norm_num_groups=LDM_GROUPS,
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in state,
        sample_size=256,        # read only by diffusers' tiled decoding, which the suite does not use
        scaling_factor=1.0)     # raw latents: the latent builders normalise per channel (docs/methods.md §5.2)


def _leaf(table: dict[str, str], leaf: str, key: str) -> str:
    layer, _, param = leaf.rpartition(".")
    if layer not in table:
        raise KeyError(f"unknown LDM autoencoder key {key!r}")
    return f"{table[layer]}.{param}"


def diffusers_key(key: str, levels: int) -> str:
    """One LDM name -> its diffusers name (LDM's decoder.up is indexed by level, diffusers' up_blocks from
    the deepest level), e.g. decoder.up.4.attn.0.q.weight -> decoder.up_blocks.0.attentions.0.to_q.weight."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    side = {"encoder": "down", "decoder": "up"}.get(part)
    if m := re.fullmatch(rf"{side}\.(\d+)\.(block|attn)\.(\d+)\.(.+)", rest):
        i, sub, j, leaf = m.groups()
        level = int(i) if side == "down" else levels - 1 - int(i)
        table, group = (_RESNET, "resnets") if sub == "block" else (_ATTN, "attentions")
        return f"{part}.{side}_blocks.{level}.{group}.{j}.{_leaf(table, leaf, key)}"
    if m := re.fullmatch(rf"{side}\.(\d+)\.{side}sample\.conv\.(weight|bias)", rest):
        level = int(m.group(1)) if side == "down" else levels - 1 - int(m.group(1))
        return f"{part}.{side}_blocks.{level}.{side}samplers.0.conv.{m.group(2)}"
    if m := re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(.+)", rest):
        name, leaf = m.groups()
        if name == "attn_1":
            return f"{part}.mid_block.attentions.0.{_leaf(_ATTN, leaf, key)}"
        return f"{part}.mid_block.resnets.{int(name[-1]) - 1}.{_leaf(_RESNET, leaf, key)}"
    if m := re.fullmatch(r"(conv_in|conv_out|norm_out)\.(weight|bias)", rest):
        return f"{part}.{'conv_norm_out' if m.group(1) == 'norm_out' else m.group(1)}.{m.group(2)}"
    raise KeyError(f"unknown LDM autoencoder key {key!r}")


def convert_state(state: dict[str, Tensor], levels: int) -> dict[str, Tensor]:
    """Rename every tensor; LDM's attention q/k/v/proj_out are 1×1 convs (C, C, 1, 1), diffusers' are
    linear layers (C, C): the same matrix, so the weights are only reshaped."""
    out = {}
    for key, value in state.items():
        new = diffusers_key(key, levels)
        if ".attentions." in new and new.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            value = value.reshape(value.shape[0], value.shape[1])    # (C, C, 1, 1) -> (C, C)
        out[new] = value
    return out


def ldm_to_diffusers(state: dict[str, Tensor]) -> tuple[AutoencoderKL, dict[str, int]]:
    """(diffusers AutoencoderKL holding the file's weights, {dropped top-level name: count}).

    Built on the meta device and filled with `assign=True`: no random init of a throwaway 80 M-parameter
    model, and the caller's global RNG stream is untouched. strict loading: a tensor the model needs and
    the file lacks (or the reverse) is an error, never a silently random weight.
    """
    kept, dropped = split_autoencoder(state)
    config = ldm_config(kept)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    converted = convert_state(kept, len(config["block_out_channels"]))
    result = vae.load_state_dict(converted, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"LDM -> diffusers conversion: missing {result.missing_keys[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]} (of {len(converted)} converted tensors)")
    return vae.float().eval().requires_grad_(False), dropped
