"""One safe reader for third-party weight files (official checkpoints, LDM autoencoders).

torch.load runs pickled code unless `weights_only=True`; released training files also pickle an
`argparse.Namespace` (their `args`), which is allowed. Anything else is refused with a one-line error
unless the caller passes trust_pickle=True for a file whose source it trusts. Zip files are memory-mapped,
so a training file's optimizer state is never read into memory.
"""
from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


class UntrustedFileError(ValueError):
    """torch.load(weights_only=True) refused a pickled object in the file."""


def load_weights_file(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """The object stored in a .pt/.pth/.ckpt file (on the CPU), or a .safetensors file's state dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:                 # what torch raises for a refused global
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UntrustedFileError(f"{path}: holds pickled objects beyond tensors ({first}); pass trust_pickle=True "
                                 f"if you trust the file's source") from None
