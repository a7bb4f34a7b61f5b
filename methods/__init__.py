"""Method components: latent builders, schedules, losses, samplers, guidance (docs/architecture.md, "The method interface")."""
from methods import latents  # noqa: F401
from methods import schedules  # noqa: F401
from methods import losses  # noqa: F401
from methods import ddpm  # noqa: F401
from methods import samplers  # noqa: F401
from methods import guidance  # noqa: F401
from methods import reg  # noqa: F401
