"""Method components: latent builders, schedules, losses, samplers, guidance (DESIGN.md §2)."""
