"""The per-phase picture of sampling: the state at a few global times τ, texture decoded to pixels and
every other channel group shown as a heat map. For SFD's asynchronous schedule it shows phase I (only
the semantics move), phase II (both) and phase III (only the texture), docs/methods.md §6.6; for a synchronous
schedule the same figure is the ordinary denoising trajectory. Written at a run's last eval."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def breakpoints(schedule: Any, n: int = 2001) -> list[float]:
    """Global times where some group starts moving (its time leaves 0) or stops (reaches 1), plus the
    ends and the midpoints between them: [0, Δt/2, Δt, ..., 1 + Δt] for SFD, [0, 0.5, 1] when synchronous."""
    tau = torch.linspace(0, schedule.tau_max, n, dtype=torch.float64)
    tg = schedule.group_times(tau)                                          # (n, G)
    pts = {0.0, float(schedule.tau_max)}
    for g in range(tg.shape[1]):
        moving = (tg[:, g] > 0).nonzero()
        done = (tg[:, g] >= 1).nonzero()
        if len(moving):
            pts.add(round(float(tau[max(int(moving[0]) - 1, 0)]), 4))
        if len(done):
            pts.add(round(float(tau[int(done[0])]), 4))
    pts = sorted(pts)
    mids = [round((a + b) / 2, 4) for a, b in zip(pts, pts[1:])]
    return sorted(set(pts) | set(mids))


def title(tau: float, names: tuple[str, ...], times) -> str:
    """A column title: the global time τ, then each group's own time under its full name."""
    return "\n".join([f"τ={tau:.2f}", *(f"{g}={float(v):.2f}" for g, v in zip(names, times))])


@torch.no_grad()
def phase_figure(method: Any, model: torch.nn.Module, latent: Any, shape: tuple[int, ...], path: Path,
                 *, n: int = 4, seed: int = 0, device: torch.device = torch.device("cpu")) -> Path:
    """Save the figure for n class-conditional samples (classes 0..n-1)."""
    taus = breakpoints(method.schedule)
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    y = torch.arange(n, device=device)

    def model_fn(x, t, labels):
        return model(x, t, labels).out

    traj = method.sampler.trajectory(model_fn, noise, y, schedule=method.schedule, taus=taus,
                                     guidance=method.guidance, generator=torch.Generator(device).manual_seed(seed))
    groups = latent.groups
    rows = n * len(groups.names)
    fig, axes = plt.subplots(rows, len(taus), figsize=(1.3 * len(taus), 1.3 * rows), squeeze=False)
    for j, (tau, x) in enumerate(traj):
        t_groups = method.schedule.group_times(torch.tensor([tau], dtype=torch.float64))[0]
        images = latent.decode(x.float()).cpu()                            # (n, C_img, H, W) in [-1, 1]
        for i in range(n):
            for k, name in enumerate(groups.names):
                ax = axes[i * len(groups.names) + k, j]
                if k == 0:
                    ax.imshow(images[i].mean(0), cmap="gray", vmin=-1, vmax=1)
                else:
                    ax.imshow(x[i, groups.slice_of(name)].float().mean(0).cpu(), cmap="magma")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 and k == 0:   # the top row only; full group names, one line per group's own time
                    ax.set_title(title(tau, groups.names, t_groups), fontsize=6)
                if j == 0:
                    ax.set_ylabel(f"y={i}\n{name}", fontsize=6)
    fig.suptitle("State during sampling (texture decoded; other groups: channel mean)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
