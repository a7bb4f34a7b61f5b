"""REPA's time convention as a reference for the tests (docs/methods.md §0.1, §11.2): the suite itself converts
REPA only at its boundaries (released weights folded at import, the guidance interval in the method preset),
so these maps live with the tests that check those conversions."""
from __future__ import annotations

from torch import Tensor


def repa_to_project(t_repa: Tensor, v_repa: Tensor) -> tuple[Tensor, Tensor]:
    """REPA (t = 0 data, x_t = (1−t)x + tε, v = ε − x) -> project (t = 1 data, u = x1 − x0).

    The time axis is reversed and the velocity flips sign (docs/methods.md §0.1, §11.2):
    t = 1 − t_REPA, v = −v_REPA. Shapes are unchanged.
    """
    return 1 - t_repa, -v_repa


def project_to_repa(t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of `repa_to_project` (the map is an involution)."""
    return 1 - t, -v
