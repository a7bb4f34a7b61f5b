"""One safe reader for third-party weight files (official checkpoints, LDM autoencoders).

torch.load runs pickled code unless `weights_only=True`. Released training files also pickle an
`argparse.Namespace` (DiT/REPA `args`) or an OmegaConf config (LightningDiT/SFD `config`, from
OmegaConf.load): those classes are allow-listed, since unpickling them only fills containers. Anything else
is refused with a one-line UntrustedFileError naming the global, unless the caller passes trust_pickle=True
for a file whose source it trusts. A damaged file (not a zip or pickle, truncated, bad magic number, CRC
mismatch) is a CorruptFileError that says to re-download it, never an invitation to trust it. Zip files
are memory-mapped, so a training file's optimizer state is never read into memory.
"""
from __future__ import annotations

import argparse
import collections
import pickle
import re
import typing
import zipfile
from zlib import error as zlib_error
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.errors import CorruptFileError


class UntrustedFileError(ValueError):
    """torch.load(weights_only=True) refused a pickled object in the file."""


def _omegaconf_globals() -> list:
    """What torch.save of an OmegaConf config pickles (found with torch.serialization.
    get_unsafe_globals_in_checkpoint on configs from OmegaConf.load, OmegaConf.create and a typed merge):
    the containers, their metadata and value nodes, and the plain types named in the metadata. EnumNode and
    PathNode are left out: their values would need enum / pathlib classes, which stay refused by name."""
    try:
        from omegaconf import DictConfig, ListConfig, nodes
        from omegaconf.base import ContainerMetadata, Metadata
    except ImportError:                  # omegaconf is a dependency, but the reader must not need it
        return []
    return [DictConfig, ListConfig, ContainerMetadata, Metadata, nodes.AnyNode, nodes.StringNode,
            nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, nodes.BytesNode,
            collections.defaultdict, typing.Any, typing.List, typing.Dict,
            dict, list, int, float, str, bool, bytes]


SAFE_GLOBALS = [argparse.Namespace, *_omegaconf_globals()]
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")      # torch's refusal names the global this way (2.4 - 2.x)


def load_weights_file(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """The object stored in a .pt/.pth/.ckpt file (on the CPU), or a .safetensors file's state dict.
    Raises FileNotFoundError / PermissionError as open() does, CorruptFileError for a damaged file and
    UntrustedFileError for a pickled object outside the allow-list (unless trust_pickle=True)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as e:
            raise CorruptFileError(f"{path}: not a readable safetensors file ({_first_line(e)}); "
                                   "re-download it") from None
    is_zip = zipfile.is_zipfile(path)
    if is_zip and (damage := _pickle_crc(path)):
        raise CorruptFileError(f"{path}: damaged PyTorch file: {damage}; re-download it (or copy it again)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
    except OSError:
        raise                                    # missing or unreadable: the caller's message says which
    except Exception as e:  # noqa: BLE001 - torch.load reports a damaged file with many exception types
        raise _classify(path, e, trust_pickle) from None


def _classify(path: Path, e: Exception, trust_pickle: bool) -> ValueError:
    """A refused global in an intact file -> UntrustedFileError; anything else -> CorruptFileError. The
    file's structure is checked first, so a garbled byte that happens to read as a global is still corrupt."""
    damage = _damage(path)
    if damage is None and not trust_pickle and isinstance(e, pickle.UnpicklingError) and (m := _GLOBAL.search(str(e))):
        return UntrustedFileError(f"{path}: holds a pickled {m.group(1)}, which weights-only loading does not "
                                  "allow; pass trust_pickle=True if you trust the file's source (unpickling "
                                  "runs code)")
    why = damage or f"cannot be unpickled ({_first_line(e)})"
    return CorruptFileError(f"{path}: damaged PyTorch file: {why}; re-download it (or copy it again)")


def _pickle_crc(path: Path) -> str | None:
    """torch.load does not check the zip's CRCs: check the pickle's (small; the tensor data, gigabytes in a
    training file, is memory-mapped unchecked). A flipped byte there could otherwise load as a wrong object."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.endswith("/data.pkl"):
                    z.read(info)
    except (zipfile.BadZipFile, EOFError, ValueError, RuntimeError, zlib_error) as e:
        msg = _first_line(e)                     # "Bad CRC-32 for file 'archive/data.pkl'"
        return f"CRC mismatch ({msg})" if "CRC" in msg else f"broken zip archive ({msg})"
    return None


def _damage(path: Path) -> str | None:
    """What is structurally wrong with a torch.save file, or None when zip CRCs / the legacy magic check out.
    Reads the whole file: called only after torch.load has failed."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as e:
            return f"broken zip archive ({_first_line(e)})"
        return f"CRC mismatch in {bad}" if bad else None
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(b"PK"):
            return "truncated zip archive (no central directory)"
        f.seek(0)
        try:                                     # the legacy format starts with a pickled magic number
            magic = _NoGlobals(f).load()
        except Exception:  # noqa: BLE001 - any failure to read one int means it is not there
            magic = None
    if magic != torch.serialization.MAGIC_NUMBER:
        return "neither a zip archive nor a legacy torch file (no magic number)"
    return None                                  # a legacy file whose problem is further in: see the caller


class _NoGlobals(pickle.Unpickler):
    """Reads plain values only: the legacy magic check never imports anything from the file."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
