"""Encoder and decoder networks for the three architectures, adapting to any input shape (arch conv also to
windows of a series, (C, L): the same layers in 1-D).

Spatial sizes: a stride-2 3x3 conv with padding 1 (and a 2x2 max-pool with ceil_mode) maps H to ceil(H/2),
as Keras' padding="same" does. Decoders invert that exactly: transposed convs get output_padding 1 for an
even target size and 0 for an odd one; upsampling layers are given the target size. So 28 -> 14 -> 7 -> 14
-> 28 and 8 -> 4 -> 2 -> 4 -> 8, and odd sizes like 7 or 15 round-trip too.

The conv layers come from models/kernels.py (Conv2d, ConvTranspose2d, UpsampleConv2d): subclasses of
torch.nn's conv layers with the same parameters, which take faster paths on a CPU where oneDNN's are slow.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaelab.losses import likelihood_of
from vaelab.models import resnet
from vaelab.models.kernels import Conv2d, ConvDecoder, ConvTranspose2d, UpsampleConv2d


def _half(n: int) -> int:
    return (n + 1) // 2


def _sizes(spatial: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    """Spatial sizes after 0..n halvings: [(H, W), (ceil(H/2), ceil(W/2)), ...] (or [(L,), (ceil(L/2),), ...])."""
    out = [tuple(spatial)]
    for _ in range(n):
        out.append(tuple(_half(s) for s in out[-1]))
    return out


# ModelConfig.activation (config.ACTIVATIONS) -> its layer
ACTIVATION_LAYERS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh,
                                                 "elu": nn.ELU}


def activation(config) -> type[nn.Module]:
    """The layer class of config.activation, the nonlinearity of the hidden layers of vaelab's own networks."""
    return ACTIVATION_LAYERS[config.activation]


def _dense(sizes: list[int], act: type[nn.Module]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return layers


def build_networks(config, encoder_outputs: int, arch: str) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(encoder, decoder, latent_shape) of network `arch` (conv, conv-pool, mlp or resnet; the model resolves
    "auto").
    The encoder's last layer emits `encoder_outputs` latent-shaped
    tensors stacked on dim 1 (2 for a Gaussian posterior's mean and log-variance). A condition of
    `config.condition_dim` entries enters both networks as extra input channels (images, spatial latents)
    or extra input features (vectors): the caller concatenates it."""
    if arch == "resnet":  # models/resnet.py: GroupNorm residual networks, initialised as PyTorch's defaults
        return resnet.build(config, encoder_outputs)
    build = {"conv": _conv, "conv-pool": _conv_pool, "mlp": _mlp}[arch]
    enc, dec, latent_shape = build(config, encoder_outputs)
    _init_like_keras(enc)
    _init_like_keras(dec)
    # Channels-last conv weights make every convolution run in NHWC, the layout oneDNN's CPU kernels
    # (and GPU tensor cores) are fastest in; activations then stay NHWC from layer to layer, with no layout
    # conversions between them. Linear layers are unaffected.
    enc.to(memory_format=torch.channels_last)
    dec.to(memory_format=torch.channels_last)
    return enc, dec, latent_shape


def _conv(cfg, k: int):
    """Stride-2 convs of width 3 down, dense layers, transposed convs back up: on images (C, H, W) in 2-D, on
    windows of a series (C, L) the same layers in 1-D along time."""
    c_in, *spatial = cfg.input_shape
    conv, convt = (Conv2d, ConvTranspose2d) if len(spatial) == 2 else (nn.Conv1d, nn.ConvTranspose1d)
    act = activation(cfg)
    cond = cfg.condition_dim
    chans = list(cfg.channels)
    sizes = _sizes(spatial, len(chans))
    enc: list[nn.Module] = []
    prev = c_in + cond
    for c in chans:  # (B, prev, H, W) -> (B, c, ceil(H/2), ceil(W/2)); (B, prev, L) -> (B, c, ceil(L/2))
        enc += [conv(prev, c, 3, stride=2, padding=1), act()]
        prev = c
    flat = prev * math.prod(sizes[-1])
    enc += [nn.Flatten()] + _dense([flat, *cfg.hidden], act)
    enc.append(nn.Linear(cfg.hidden[-1] if cfg.hidden else flat, k * cfg.latent_dim))

    dec: list[nn.Module] = [nn.Linear(cfg.latent_dim + cond, flat), act(),
                            nn.Unflatten(1, (prev, *sizes[-1]))]
    for i, c in enumerate(reversed(chans)):  # each transposed conv doubles the size back exactly
        target = sizes[len(chans) - 1 - i]
        pad = tuple(1 - t % 2 for t in target)
        dec += [convt(prev, c, 3, stride=2, padding=1, output_padding=pad), act()]
        prev = c
    c_out = likelihood_of(cfg).raw_shape(cfg.input_shape)[0]  # the likelihood's parameters per pixel or step
    dec.append(convt(prev, c_out, 3, stride=1, padding=1))  # the output layer, no activation
    decoder = ConvDecoder(*dec) if len(spatial) == 2 else nn.Sequential(*dec)  # images: sub-pixel inference
    return nn.Sequential(*enc), decoder, (cfg.latent_dim,)


def _conv_pool(cfg, k: int):
    c_in, h, w = cfg.input_shape
    act = activation(cfg)
    cond = cfg.condition_dim
    chans = list(cfg.channels)
    sizes = _sizes((h, w), len(chans))
    enc: list[nn.Module] = []
    prev = c_in + cond
    for c in chans:  # (B, prev, H, W) -> (B, c, ceil(H/2), ceil(W/2))
        # conv, ReLU, pool as the tutorial, with the activation moved after the pool: every one of
        # config.ACTIVATIONS is monotonic, so max(f(.)) = f(max(.)) exactly (values and gradients), and it
        # touches 4x fewer values
        enc += [nn.Conv2d(prev, c, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), act()]
        prev = c
    latent_shape = (prev, *sizes[-1])
    if k != 1:  # a probabilistic latent map: a 1x1 conv head emits k maps per latent channel
        enc.append(nn.Conv2d(prev, k * prev, 1))
    dec: list[nn.Module] = []
    prev += cond
    for i, c in enumerate(reversed(chans)):  # conv at the latent's size, then (upsample, conv) pairs
        conv = nn.Conv2d(prev, c, 3, padding=1) if i == 0 else UpsampleConv2d(prev, c, sizes[len(chans) - i])
        dec += [conv, act()]
        prev = c
    c_out = likelihood_of(cfg).raw_shape(cfg.input_shape)[0]  # the likelihood's parameters per pixel
    dec.append(UpsampleConv2d(prev, c_out, sizes[0]))  # the output layer, no activation
    return nn.Sequential(*enc), nn.Sequential(*dec), latent_shape




def _mlp(cfg, k: int):
    shape = tuple(cfg.input_shape)
    d = math.prod(shape)
    cond = cfg.condition_dim
    d_in = d + cond * (math.prod(shape[1:]) if len(shape) == 3 else 1)  # condition channels or features
    hidden = list(cfg.hidden)
    act = activation(cfg)
    enc = [nn.Flatten()] + _dense([d_in, *hidden], act) + [nn.Linear(hidden[-1] if hidden else d_in,
                                                                     k * cfg.latent_dim)]
    rev = hidden[::-1]
    z_in = cfg.latent_dim + cond
    raw = likelihood_of(cfg).raw_shape(shape)  # the likelihood's parameters per dimension
    dec = _dense([z_in, *rev], act) + [nn.Linear(rev[-1] if rev else z_in, math.prod(raw)), nn.Unflatten(1, raw)]
    return nn.Sequential(*enc), nn.Sequential(*dec), (cfg.latent_dim,)


def _init_like_keras(net: nn.Module) -> None:
    # Glorot-uniform weights and zero biases, as the tutorial's Keras layers: the presets then start
    # where the tutorial starts (PyTorch's default init is smaller and trains these nets more slowly).
    for m in net.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
