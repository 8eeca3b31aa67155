"""GLM-Image's VAE: a diffusers-``AutoencoderKL``-compatible KL autoencoder in plain PyTorch.

The module tree and parameter names are the official diffusers ones (``encoder.down_blocks.*``,
``decoder.up_blocks.*``, ``mid_block.resnets``/``attentions``, optional ``quant_conv`` /
``post_quant_conv``), so the official ``vae/diffusion_pytorch_model.safetensors`` loads strictly
with no key conversion. Everything structural comes from ``vae/config.json``: GLM-Image itself
uses ``block_out_channels`` [128, 512, 1024, 1024], 3 layers per block, 16 latent channels, no
mid-block attention and no quant convs, but other AutoencoderKL configs build too.

Every Conv2d / GroupNorm / Linear is created through ``operations`` (``torch.nn`` by default;
ComfyUI passes a ``comfy.ops`` namespace so its model management can move and cast weights), and
the forward pass only ever calls those layers, never reads a ``.weight`` itself.

Conventions (same as diffusers): ``encode`` takes pixels in [-1, 1] (NCHW) and returns the
posterior MODE (its mean) as the raw latent; ``decode`` takes a raw latent and returns pixels in
about [-1, 1]. The per-channel ``latents_mean``/``latents_std`` normalisation is *not* applied here:
that is the DiT's space, handled by the caller.

This module never imports ComfyUI or diffusers.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError


GROUP_NORM_EPS = 1e-6

_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu, "mish": F.mish}


def _activation(name: str):
    try:
        return _ACTIVATIONS[name.lower()]
    except KeyError:
        raise CheckpointError(f"vae/config.json act_fn {name!r} is not supported "
                                   f"(supported: {', '.join(sorted(_ACTIVATIONS))})") from None


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without time embedding (``temb_channels=None``), output scale 1."""

    def __init__(self, cin: int, cout: int, groups: int, act, ops, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.act = act
        self.norm1 = ops.GroupNorm(groups, cin, eps=GROUP_NORM_EPS, affine=True, **kw)
        self.conv1 = ops.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, **kw)
        self.norm2 = ops.GroupNorm(groups, cout, eps=GROUP_NORM_EPS, affine=True, **kw)
        self.conv2 = ops.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1, **kw)
        self.conv_shortcut = ops.Conv2d(cin, cout, kernel_size=1, stride=1, padding=0, **kw) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """diffusers ``Downsample2D(use_conv=True, padding=0)``: zero-pad right/bottom by one, then a stride-2 3×3 conv."""

    def __init__(self, c: int, ops, dtype=None, device=None):
        super().__init__()
        self.conv = ops.Conv2d(c, c, kernel_size=3, stride=2, padding=0, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """diffusers ``Upsample2D(use_conv=True)``: nearest ×2, then a 3×3 conv."""

    def __init__(self, c: int, ops, dtype=None, device=None):
        super().__init__()
        self.conv = ops.Conv2d(c, c, kernel_size=3, stride=1, padding=1, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, add_downsample: bool, groups: int, act, ops,
                 dtype=None, device=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, act, ops, dtype, device) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout, ops, dtype, device)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.downsamplers is not None:
            for d in self.downsamplers:
                x = d(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, add_upsample: bool, groups: int, act, ops,
                 dtype=None, device=None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, act, ops, dtype, device) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout, ops, dtype, device)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        if self.upsamplers is not None:
            for u in self.upsamplers:
                x = u(x)
        return x


class SpatialSelfAttention(nn.Module):
    """diffusers ``Attention`` as built by ``UNetMidBlock2D`` for VAEs: one head over all channels,
    GroupNorm in front, residual connection, scale 1/sqrt(C)."""

    def __init__(self, c: int, groups: int, ops, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.group_norm = ops.GroupNorm(groups, c, eps=GROUP_NORM_EPS, affine=True, **kw)
        self.to_q = ops.Linear(c, c, bias=True, **kw)
        self.to_k = ops.Linear(c, c, bias=True, **kw)
        self.to_v = ops.Linear(c, c, bias=True, **kw)
        self.to_out = nn.ModuleList([ops.Linear(c, c, bias=True, **kw)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same operation order and tensor layouts as diffusers' AttnProcessor2_0, so results match bitwise.
        b, c, h, w = x.shape
        t = self.group_norm(x.reshape(b, c, h * w)).transpose(1, 2)               # [B, HW, C]
        q, k, v = (m(t).view(b, -1, 1, c).transpose(1, 2) for m in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v)                            # [B, 1, HW, C]
        o = self.to_out[0](o.transpose(1, 2).reshape(b, -1, c))
        return o.transpose(-1, -2).reshape(b, c, h, w) + x


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D``: resnet, (attention, resnet) — attention only when configured."""

    def __init__(self, c: int, groups: int, add_attention: bool, act, ops, dtype=None, device=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups, act, ops, dtype, device) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, groups, ops, dtype, device)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg: "VaeConfig", ops, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        ch, act = cfg.block_out_channels, _activation(cfg.act_fn)
        self.act = act
        self.conv_in = ops.Conv2d(cfg.in_channels, ch[0], kernel_size=3, stride=1, padding=1, **kw)
        blocks, prev = [], ch[0]
        for i, c in enumerate(ch):
            blocks.append(DownEncoderBlock(prev, c, cfg.layers_per_block, i < len(ch) - 1, cfg.norm_num_groups,
                                           act, ops, dtype, device))
            prev = c
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ch[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, act, ops, dtype, device)
        self.conv_norm_out = ops.GroupNorm(cfg.norm_num_groups, ch[-1], eps=GROUP_NORM_EPS, affine=True, **kw)
        self.conv_out = ops.Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        x = self.mid_block(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: "VaeConfig", ops, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        rch, act = list(reversed(cfg.block_out_channels)), _activation(cfg.act_fn)
        self.act = act
        self.conv_in = ops.Conv2d(cfg.latent_channels, rch[0], kernel_size=3, stride=1, padding=1, **kw)
        self.mid_block = MidBlock(rch[0], cfg.norm_num_groups, cfg.mid_block_add_attention, act, ops, dtype, device)
        blocks, prev = [], rch[0]
        for i, c in enumerate(rch):
            blocks.append(UpDecoderBlock(prev, c, cfg.layers_per_block + 1, i < len(rch) - 1, cfg.norm_num_groups,
                                         act, ops, dtype, device))
            prev = c
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = ops.GroupNorm(cfg.norm_num_groups, rch[-1], eps=GROUP_NORM_EPS, affine=True, **kw)
        self.conv_out = ops.Conv2d(rch[-1], cfg.out_channels, kernel_size=3, padding=1, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(self.act(self.conv_norm_out(x)))


class VaeConfig:
    """The structural fields of a diffusers AutoencoderKL ``config.json`` (with diffusers' defaults)."""

    def __init__(self, config: dict):
        c = dict(config)
        self.in_channels = int(c.get("in_channels", 3))
        self.out_channels = int(c.get("out_channels", 3))
        self.latent_channels = int(c.get("latent_channels", 4))
        self.block_out_channels = [int(x) for x in c.get("block_out_channels", [64])]
        self.layers_per_block = int(c.get("layers_per_block", 1))
        self.norm_num_groups = int(c.get("norm_num_groups", 32))
        self.act_fn = str(c.get("act_fn", "silu"))
        self.mid_block_add_attention = bool(c.get("mid_block_add_attention", True))
        self.use_quant_conv = bool(c.get("use_quant_conv", True))
        self.use_post_quant_conv = bool(c.get("use_post_quant_conv", True))
        self.latents_mean: Optional[list] = c.get("latents_mean")
        self.latents_std: Optional[list] = c.get("latents_std")
        n = len(self.block_out_channels)
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = c.get(key)
            if types is not None and (len(types) != n or any(t != want for t in types)):
                raise CheckpointError(f"vae/config.json {key}={types} is not supported: expected "
                                           f"{n} × {want!r} (one per block_out_channels entry)")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise CheckpointError(f"vae/config.json: block channels {ch} not divisible by "
                                           f"norm_num_groups {self.norm_num_groups}")
        _activation(self.act_fn)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent cell along each side: 2^(number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)


class GlmImageVAE(nn.Module):
    """diffusers ``AutoencoderKL`` (official key names), built from its ``config.json`` dict."""

    def __init__(self, config: dict, dtype: Optional[torch.dtype] = None, device=None, operations=nn):
        super().__init__()
        cfg = VaeConfig(config)
        self.config = cfg
        self.encoder = Encoder(cfg, operations, dtype, device)
        self.decoder = Decoder(cfg, operations, dtype, device)
        z2 = 2 * cfg.latent_channels
        self.quant_conv = (operations.Conv2d(z2, z2, kernel_size=1, dtype=dtype, device=device)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (operations.Conv2d(cfg.latent_channels, cfg.latent_channels, kernel_size=1,
                                                  dtype=dtype, device=device) if cfg.use_post_quant_conv else None)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior parameters [B, 2C, H/8, W/8]: mean then log-variance (diffusers' order)."""
        # ComfyUI hands images over as a channels-last view (IMAGE is [B,H,W,C]); convolving that
        # picks other kernels than the NCHW reference and, on flat images, GroupNorm amplifies the
        # rounding difference. One contiguous copy of the input keeps results layout-independent.
        h = self.encoder(x.contiguous())
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return h

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] [B, 3, H, W] -> raw latent [B, C, H/8, W/8]: the posterior mode (mean)."""
        return self.encode_moments(x)[:, : self.config.latent_channels]

    def decode(self, z: torch.Tensor, **_unused) -> torch.Tensor:
        """Raw latent [B, C, h, w] -> pixels in about [-1, 1] [B, 3, 8h, 8w]."""
        z = z.contiguous()
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


# --------------------------------------------------------------------------------------
# Latent -> RGB linear preview fit
# --------------------------------------------------------------------------------------

def sample_normalised_latents(channels: int, batch: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Unit-variance latents in the DiT's normalised space: smooth structure plus fine detail (the
    look of a sampler's intermediate latents), with a different mix for each batch item."""
    coarse = torch.randn(batch, channels, max(2, size // 4), max(2, size // 4), generator=gen)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    smooth = smooth / smooth.flatten(2).std(dim=2).clamp_min(1e-6)[..., None, None]
    white = torch.randn(batch, channels, size, size, generator=gen)
    w = torch.linspace(0.2, 0.8, batch).view(batch, 1, 1, 1)
    return (1 - w) ** 0.5 * smooth + w ** 0.5 * white


def _ridge(a: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin |a w - y|² + lam |w[:-1]|² (the last column of ``a`` is the unpenalised bias)."""
    reg = lam * torch.eye(a.shape[1], dtype=a.dtype)
    reg[-1, -1] = 0.0
    return torch.linalg.solve(a.T @ a + reg, a.T @ y)


RIDGE_GRID = (1e-6, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)   # × number of samples


@torch.no_grad()
def fit_latent_to_rgb(decode: Callable[[torch.Tensor], torch.Tensor], latent_channels: int, scale_factor: int,
                      latents_mean: Sequence[float], latents_std: Sequence[float], size: int = 12,
                      batch: int = 4, seed: int = 0) -> Tuple[list, list]:
    """Least-squares ``rgb ≈ z_norm @ factors + bias`` per latent cell.

    A few random normalised latents (fixed generator) are de-normalised with ``latents_mean`` /
    ``latents_std``, decoded by ``decode`` (raw latent -> pixels in [-1, 1], NCHW) at
    ``scale_factor * size`` pixels, and each latent cell is paired with the mean colour of its
    pixel block. Border cells, where zero padding dominates, are left out. The ridge strength is
    picked by leave-one-image-out cross-validation, so a VAE whose colours are barely linear in
    the latent (e.g. random test weights) gets shrunk factors instead of an over-fitted map; a real
    VAE picks the smallest. Returns ``(factors [C][3], bias [3])`` as lists, RGB in the [-1, 1]
    convention.
    """
    c, ratio = int(latent_channels), int(scale_factor)
    mean = torch.as_tensor(latents_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(latents_std, dtype=torch.float32).view(1, -1, 1, 1)
    if mean.shape[1] != c or std.shape[1] != c:
        raise ValueError(f"latents_mean/std have {mean.shape[1]}/{std.shape[1]} values for a {c}-channel VAE")
    zn = sample_normalised_latents(c, batch, size, torch.Generator().manual_seed(seed))
    rgb = decode(zn * std + mean).float().cpu()                           # [B, 3, r*s, r*s]
    cells = F.avg_pool2d(rgb[:, :3], kernel_size=ratio)                   # [B, 3, s, s]
    inner = slice(1, size - 1) if size > 4 else slice(None)
    x = zn[:, :, inner, inner].permute(0, 2, 3, 1).reshape(-1, c).double()
    y = cells[:, :, inner, inner].permute(0, 2, 3, 1).reshape(-1, 3).double()
    image = torch.arange(batch).repeat_interleave(x.shape[0] // batch)
    ok = torch.isfinite(y).all(dim=1)
    if int(ok.sum()) <= c + 1:
        raise ValueError("preview fit: the VAE decoded too few finite pixels")
    x, y, image = x[ok], y[ok], image[ok]
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    n = a.shape[0]
    best_lam, best_err = RIDGE_GRID[0] * n, float("inf")
    if batch > 1:
        for r in RIDGE_GRID:
            err = 0.0
            for i in range(batch):
                tr, te = image != i, image == i
                if int(te.sum()) == 0 or int(tr.sum()) <= c + 1:
                    continue
                w = _ridge(a[tr], y[tr], r * int(tr.sum()))
                err += float(((a[te] @ w - y[te]) ** 2).sum())
            if err < best_err * (1 - 1e-9):
                best_lam, best_err = r * n, err
    w = _ridge(a, y, best_lam)                                            # [C+1, 3]
    return w[:c].float().tolist(), w[c].float().tolist()
