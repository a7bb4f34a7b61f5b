"""The notebook API: build any preset's components by name and call them directly.

    from benchmarks import api
    sfd = api.method("sfd", groups=api.groups(texture=32, semantic=16), hidden_size=1152, encoder_dim=768)
    t = sfd.schedule.sample_t(8, device="cpu")                     # (8,) global time in [0, 1]
    t_groups = sfd.schedule.group_times(t * sfd.schedule.tau_max)  # (8, 2) per-group times
    xt, ut = sfd.schedule.path(x0, x1, t_groups)                    # path and velocity target
    x1_hat = sfd.sampler(my_model_fn, noise, y, schedule=sfd.schedule)   # any callable (x, t, y) -> v

This surface is kept stable (docs/api.md); everything else may move.
"""
from __future__ import annotations

from benchmarks.config.presets import backbone, groups, method, preset, presets, schedule

__all__ = ["groups", "preset", "method", "schedule", "backbone", "presets"]
