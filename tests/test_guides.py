"""AutoGuidance with a guide loaded from another run's folder (SFD's headline sampling, docs/methods.md §6.6)."""
import pytest
import torch

from benchmarks.execution import train
from benchmarks.build.components import build_run
from benchmarks.config.grid import resolve
from benchmarks.data.prepare import prepare_run
from core.config import ConfigError

pytestmark = pytest.mark.slow


def test_autoguidance_loads_guide_run_and_scale_one_equals_main(tmp_path, smoke_cache):
    guide_cfg = resolve("smoke", {"method": "sfd", "backbone": "lightningdit-tiny", "seed": 1},
                        cli=[f"cache_dir={smoke_cache}"])
    train.run_job(guide_cfg, str(tmp_path / "guide"))
    main = resolve("smoke", {"method": "sfd", "backbone": "lightningdit-tiny", "seed": 0},
                   cli=[f"cache_dir={smoke_cache}", "eval.guidance.name=autoguidance", "eval.guidance.scale=1.0",
                        f"eval.guidance.guide_from={tmp_path / 'guide'}"])
    parts = build_run(main, prepare_run(main), torch.device("cpu"))
    assert parts.method.guidance.guide is not None
    noise, y = torch.randn(3, *parts.latent_shape), torch.arange(3)
    guided = parts.method.sample(parts.model.eval(), noise, y)
    plain = parts.method.sample(parts.model, noise, y, guidance=None)
    torch.testing.assert_close(guided, plain)          # w = 1: the guide has no effect


def test_guide_from_missing_run_is_a_clear_error(tmp_path, smoke_cache):
    main = resolve("smoke", {"method": "sfd", "backbone": "lightningdit-tiny", "seed": 0},
                   cli=[f"cache_dir={smoke_cache}", "eval.guidance.name=autoguidance", "eval.guidance.scale=1.5",
                        f"eval.guidance.guide_from={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="guide_from=.*no run folder"):
        build_run(main, prepare_run(main), torch.device("cpu"))
