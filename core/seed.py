"""Seeding: every step reseeds from (seed, rank, step), so a resumed run replays the same randomness."""
from __future__ import annotations

import random

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
