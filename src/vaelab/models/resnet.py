"""arch "resnet": a residual conv encoder and decoder that scale with the image (16 to 128 px, any channels).

One level per entry of `ModelConfig.channels` (its width). The encoder, for an input (B, C, H, W):

    stem      3x3 conv C -> channels[0]                                         (B, channels[0], H, W)
    level i   blocks[i] residual blocks at width channels[i], then a stride-2
              3x3 conv (the downsampling)                                       (B, channels[i], H/2^(i+1), ...)
    head      GroupNorm, SiLU, then either flatten + dense layers (`hidden`) to k x latent_dim (a dense latent:
              ae, vae, cvae, hvae, ...) or a 1x1 conv to k x latent_dim channels (a code grid: the VQ-VAE)

The decoder mirrors it: a dense layer to the smallest feature map (or a 3x3 conv from the code grid); per
level, from the last, blocks[i] residual blocks at width channels[i] and a 2x nearest-neighbour upsampling
with a 3x3 conv; then GroupNorm, SiLU and a 3x3 conv to the likelihood's parameters, params_per_channel x C
channels (losses.Likelihood.raw_shape), with no activation.

A residual block is the pre-activation block of He et al. 2016 ("Identity Mappings in Deep Residual Networks",
https://arxiv.org/abs/1603.05027) with GroupNorm (Wu & He 2018, https://arxiv.org/abs/1803.08494) in place of
batch norm and SiLU as the activation, as in the autoencoders of latent diffusion (Rombach et al. 2022):

    x + conv3x3(SiLU(GN(conv3x3(SiLU(GN(x))))))     (a 1x1 conv on the skip path when the width changes)

GroupNorm, unlike batch norm, makes a sample's output independent of the rest of its batch, so evaluation,
importance sampling and DDP see the function training saw. Its group count is the largest power of two up to
32 that divides the width (`groups`): 32 for the usual widths, fewer for narrow test networks.

H and W must be multiples of 2^levels, so every downsampling halves exactly and the decoder restores the input
size; `problems` says so, naming the size and what to change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.losses import likelihood_of
from vaelab.models.kernels import Conv2d, ConvTranspose2d, UpsampleConv2d

MAX_GROUPS = 32  # GroupNorm's usual 32 groups (Wu & He 2018), fewer when the width does not divide by 32


def groups(width: int) -> int:
    """GroupNorm's group count for `width` channels: the largest power of two <= 32 that divides it."""
    return math.gcd(width, MAX_GROUPS)


def norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups(width), width)


class ResidualBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), (B, c_in, H, W) -> (B, c_out, H, W); a 1x1 conv maps the skip
    path when c_in != c_out."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def level_blocks(config) -> list[int]:
    """Residual blocks per level: config.blocks, one entry meaning the same count at every level."""
    blocks = list(config.blocks)
    return blocks * len(config.channels) if len(blocks) == 1 else blocks


def feature_size(config) -> tuple[int, int]:
    """(h, w) of the smallest feature map: the input's H and W halved once per level."""
    n = 2 ** len(config.channels)
    return config.input_shape[1] // n, config.input_shape[2] // n


def problems(config) -> list[str]:
    """Why arch "resnet" cannot take config.input_shape (empty when it can)."""
    shape, chans = config.input_shape, list(config.channels)
    if len(shape) != 3:
        return [f"arch='resnet' needs image input (C, H, W), got input_shape={shape!r}; use arch='mlp' for vectors"]
    levels, (h, w) = len(chans), shape[1:]
    n = 2 ** levels
    if h % n or w % n:
        fits = min((h & -h).bit_length(), (w & -w).bit_length()) - 1  # the most halvings both sizes allow
        levels_hint = (f"or use at most {fits} level{'s' * (fits != 1)} (channels with {fits} entries)"
                       if fits else "(no level count fits an odd size)")
        size = 2 ** levels * max(1, round(max(h, w) / n))
        return [f"input_shape={shape!r}: arch='resnet' halves H and W at each of its {levels} levels "
                f"(channels={chans}), so H and W must be multiples of 2^{levels} = {n}, got {h} x {w}; resize the "
                f"images to a multiple of {n} (e.g. --image-size {size}) {levels_hint}"]
    return []


def build(config, k: int, *, spatial: bool = False) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(encoder, decoder, latent_shape) of arch "resnet" for `config` (its input_shape valid: see `problems`).

    The encoder emits `k` latent-shaped tensors stacked on dim 1 (2: a Gaussian's mean and log-variance): flat,
    (B, k * latent_dim), or with `spatial` a grid, (B, k * latent_dim, h, w). A condition of
    config.condition_dim entries enters the encoder as extra input channels and the decoder as extra latent
    features (dense latent) or channels (grid), concatenated by the caller, as for models/nets.py's networks."""
    cond, d = config.condition_dim, config.latent_dim
    latent_shape = (d, *feature_size(config)) if spatial else (d,)
    return (encoder(config, k * d, extra_channels=cond, spatial=spatial),
            decoder(config, d + cond, spatial=spatial), latent_shape)


def encoder(config, outputs: int, *, extra_channels: int = 0, spatial: bool = False,
            hidden: tuple[int, ...] | None = None) -> nn.Sequential:
    """(B, C + extra_channels, H, W) -> (B, outputs), through dense layers `hidden` (default config.hidden);
    or with `spatial`, -> (B, outputs, h, w) by a 1x1 conv."""
    c_in = config.input_shape[0]
    chans, blocks = list(config.channels), level_blocks(config)
    fh, fw = feature_size(config)
    hidden = list(config.hidden if hidden is None else hidden)
    net: list[nn.Module] = [nn.Conv2d(c_in + extra_channels, chans[0], 3, padding=1)]  # the stem, full size
    prev = chans[0]
    for c, n in zip(chans, blocks):  # (B, prev, H_i, W_i) -> (B, c, H_i / 2, W_i / 2)
        for _ in range(n):
            net.append(ResidualBlock(prev, c))
            prev = c
        net.append(Conv2d(prev, c, 3, stride=2, padding=1))
        prev = c
    net += [norm(prev), nn.SiLU()]
    if spatial:
        net.append(nn.Conv2d(prev, outputs, 1))  # (B, outputs, h, w)
    else:
        flat = prev * fh * fw
        net += [nn.Flatten(), *_dense([flat, *hidden]), nn.Linear(hidden[-1] if hidden else flat, outputs)]
    return _channels_last(nn.Sequential(*net))


def decoder(config, inputs: int, *, spatial: bool = False, hidden: tuple[int, ...] | None = None) -> nn.Sequential:
    """(B, inputs) -> the likelihood's raw output (B, P * C, H, W), through dense layers `hidden` reversed
    (default config.hidden); or with `spatial`, a code grid (B, inputs, h, w) -> the same."""
    h, w = config.input_shape[1:]
    chans, blocks = list(config.channels), level_blocks(config)
    fh, fw = feature_size(config)
    prev = chans[-1]
    if spatial:
        net: list[nn.Module] = [nn.Conv2d(inputs, prev, 3, padding=1)]
    else:
        rev = list(config.hidden if hidden is None else hidden)[::-1]
        net = [*_dense([inputs, *rev]), nn.Linear(rev[-1] if rev else inputs, prev * fh * fw),
               nn.Unflatten(1, (prev, fh, fw))]
    for i in reversed(range(len(chans))):  # (B, prev, H_i / 2, W_i / 2) -> (B, chans[i - 1], H_i, W_i)
        for _ in range(blocks[i]):
            net.append(ResidualBlock(prev, chans[i]))
            prev = chans[i]
        up = chans[max(i - 1, 0)]
        net.append(UpsampleConv2d(prev, up, (h >> i, w >> i)))  # nearest 2x and a 3x3 conv as one
        prev = up
    c_out = likelihood_of(config).raw_shape(config.input_shape)[0]  # the likelihood's parameters per pixel
    net += [norm(prev), nn.SiLU(), ConvTranspose2d(prev, c_out, 3, stride=1, padding=1)]  # the output, raw
    return _channels_last(nn.Sequential(*net))


def _channels_last(net: nn.Module) -> nn.Module:
    # channels-last weights: NHWC convolutions, the fastest layout for oneDNN's CPU kernels (as models/nets.py)
    return net.to(memory_format=torch.channels_last)


def _dense(sizes: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return layers
