"""Seeding: every step reseeds from (seed, rank, step), so a resumed run replays the same randomness."""
from __future__ import annotations

import contextlib
import random
import threading

import numpy as np
import torch


def step_seed(seed: int, rank: int = 0, step: int = 0) -> int:
    # Distinct streams per (seed, rank, step); 2**31 keeps numpy happy.
    return (seed * 1_000_003 + rank * 10_007 + step * 7_919 + 12_345) % (2**31 - 1)


def seed_everything(seed: int, rank: int = 0, step: int = 0) -> int:
    s = step_seed(seed, rank, step)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return s


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


_GLOBAL_RNG = threading.RLock()


@contextlib.contextmanager
def seeded_init(seed: int):
    """Draw from torch's global RNG seeded with `seed` (module constructors initialise from it), with the
    caller's RNG state restored afterwards, and no other thread inside the block at the same time.

    prepare trains independent artifacts in threads; the global RNG is shared by all of them, so two
    seeded initialisations at once interleave their draws and the weights depend on timing (measured: a
    texture VAE trained next to the semantic encoder came out different from one trained alone). The
    training loops themselves draw only from their own torch.Generator objects."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
