"""A reference LDM KL-autoencoder written from the latent-diffusion layout (encoder.down.{i}.block.{j}, mid,
quant_conv, ...; docs/checkpoints.md), independently of diffusers, and writers of random-weight files in SFD's and
LightningDiT's containers. Used by tests/test_pretrained.py and tests/test_paper_eval.py.
"""
import torch
import torch.nn.functional as F
from torch import nn

MULT, CH, Z = (1, 1, 2, 2, 4), 32, 32   # five levels as f16d32 (ch 128 there), widths divisible by 32 groups


# -------------------- Reference LDM autoencoder, written from the latent-diffusion layout ------------------

def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class RefResnet(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class RefAttn(nn.Module):
    """Single-head self-attention over positions with 1×1-conv q, k, v, proj_out and a residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        n, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(n, c, hh * ww).transpose(1, 2)               # (N, T, C)
        w = torch.softmax(q @ self.k(h).reshape(n, c, hh * ww) * c ** -0.5, dim=-1)   # (N, T_q, T_k)
        out = self.v(h).reshape(n, c, hh * ww) @ w.transpose(1, 2)         # (N, C, T_q)
        return x + self.proj_out(out.reshape(n, c, hh, ww))


class RefResample(nn.Module):
    """down: pad (0, 1, 0, 1) then a stride-2 3×3 conv without padding; up: nearest ×2 then a 3×3 conv."""

    def __init__(self, c: int, down: bool) -> None:
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0, mode="nearest"))


def ref_level(cin: int, cout: int, n: int, attn: bool) -> tuple[nn.Module, int]:
    level = nn.Module()
    level.block = nn.ModuleList([RefResnet(cin if j == 0 else cout, cout) for j in range(n)])
    level.attn = nn.ModuleList([RefAttn(cout) for _ in range(n)] if attn else [])
    return level, cout


def ref_mid(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = RefResnet(c, c), RefAttn(c), RefResnet(c, c)
    return mid


def run_level(level: nn.Module, h, resample: str):
    for j, block in enumerate(level.block):
        h = level.attn[j](block(h)) if len(level.attn) else block(h)
    return getattr(level, resample)(h) if hasattr(level, resample) else h


class RefEncoder(nn.Module):
    def __init__(self, attn_levels: tuple[int, ...]) -> None:
        super().__init__()
        self.conv_in, c = nn.Conv2d(3, CH, 3, padding=1), CH
        self.down = nn.ModuleList()
        for i, m in enumerate(MULT):
            level, c = ref_level(c, CH * m, 2, i in attn_levels)
            if i != len(MULT) - 1:
                level.downsample = RefResample(c, down=True)
            self.down.append(level)
        self.mid, self.norm_out, self.conv_out = ref_mid(c), norm(c), nn.Conv2d(c, 2 * Z, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h, "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class RefDecoder(nn.Module):
    def __init__(self, attn_levels: tuple[int, ...]) -> None:
        super().__init__()
        c = CH * MULT[-1]
        self.conv_in, self.mid, levels = nn.Conv2d(Z, c, 3, padding=1), ref_mid(c), []
        for i in reversed(range(len(MULT))):            # built deepest first, stored by level index
            level, c = ref_level(c, CH * MULT[i], 3, i in attn_levels)
            if i != 0:
                level.upsample = RefResample(c, down=False)
            levels.insert(0, level)
        self.up, self.norm_out, self.conv_out = nn.ModuleList(levels), norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = run_level(level, h, "upsample")
        return self.conv_out(F.silu(self.norm_out(h)))


class RefAutoencoder(nn.Module):
    def __init__(self, attn_levels: tuple[int, ...] = (4,)) -> None:
        super().__init__()
        self.encoder, self.decoder = RefEncoder(attn_levels), RefDecoder(attn_levels)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(2 * Z, 2 * Z, 1), nn.Conv2d(Z, Z, 1)

    def moments(self, x):
        return self.quant_conv(self.encoder(x))          # (N, 2Z, h, w): mean, log-variance

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def ref_model(seed: int = 0, attn_levels: tuple[int, ...] = (4,)) -> RefAutoencoder:
    torch.manual_seed(seed)
    model = RefAutoencoder(attn_levels).eval()
    with torch.no_grad():   # GroupNorm affines away from (1, 0), so a swapped norm would show
        for p in (p for name, p in model.named_parameters() if p.dim() == 1 and "norm" in name):
            p.add_(0.2 * torch.randn_like(p))
    return model


def write_ldm_ckpt(path, model: RefAutoencoder) -> None:
    """SFD's texture decoder container: a Lightning checkpoint, weights under `state_dict`, loss keys included."""
    state = {**model.state_dict(), "loss.logvar": torch.zeros(()), "loss.perceptual_loss.net.0.weight":
             torch.randn(8, 3, 3, 3), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    torch.save({"state_dict": state, "global_step": 3, "epoch": 1}, path)


def write_vavae_pt(path, model: RefAutoencoder) -> None:
    """LightningDiT's VA-VAE container: a bare state dict with the training-only reverse_proj and loss keys."""
    torch.save({**model.state_dict(), "reverse_proj.weight": torch.randn(64, Z, 1, 1),
                "loss.logvar": torch.zeros(())}, path)
