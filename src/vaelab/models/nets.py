"""Encoder and decoder networks for the three architectures, adapting to any input shape.

Spatial sizes: a stride-2 3x3 conv with padding 1 (and a 2x2 max-pool with ceil_mode) maps H to ceil(H/2),
as Keras' padding="same" does. Decoders invert that exactly: transposed convs get output_padding 1 for an
even target size and 0 for an odd one; upsampling layers are given the target size. So 28 -> 14 -> 7 -> 14
-> 28 and 8 -> 4 -> 2 -> 4 -> 8, and odd sizes like 7 or 15 round-trip too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _half(n: int) -> int:
    return (n + 1) // 2


def _sizes(h: int, w: int, n: int) -> list[tuple[int, int]]:
    """Spatial sizes after 0..n halvings: [(H, W), (ceil(H/2), ceil(W/2)), ...]."""
    out = [(h, w)]
    for _ in range(n):
        h, w = _half(h), _half(w)
        out.append((h, w))
    return out


def _dense(sizes: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return layers


def build_networks(config, encoder_outputs: int) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(encoder, decoder, latent_shape). The encoder's last layer emits `encoder_outputs` latent-shaped
    tensors stacked on dim 1 (2 for a Gaussian posterior's mean and log-variance). A condition of
    `config.condition_dim` entries enters both networks as extra input channels (images, spatial latents)
    or extra input features (vectors): the caller concatenates it."""
    arch = config.resolved_arch
    build = {"conv": _conv, "conv-pool": _conv_pool, "mlp": _mlp}[arch]
    enc, dec, latent_shape = build(config, encoder_outputs)
    _init_like_keras(enc)
    _init_like_keras(dec)
    # Channels-last conv weights make every convolution run in NHWC, the layout oneDNN's CPU kernels
    # (and GPU tensor cores) are fastest in; activations then stay NHWC from layer to layer. Measured on
    # the seed AE (MNIST, 2 cores): 21 -> 13 s per training epoch. Linear layers are unaffected.
    enc.to(memory_format=torch.channels_last)
    dec.to(memory_format=torch.channels_last)
    return enc, dec, latent_shape


def _conv(cfg, k: int):
    c_in, h, w = cfg.input_shape
    cond = cfg.condition_dim
    chans = list(cfg.channels)
    sizes = _sizes(h, w, len(chans))
    enc: list[nn.Module] = []
    prev = c_in + cond
    for c in chans:  # (B, prev, H, W) -> (B, c, ceil(H/2), ceil(W/2))
        enc += [Conv2d(prev, c, 3, stride=2, padding=1), nn.ReLU()]
        prev = c
    flat = prev * sizes[-1][0] * sizes[-1][1]
    enc += [nn.Flatten()] + _dense([flat, *cfg.hidden])
    enc.append(nn.Linear(cfg.hidden[-1] if cfg.hidden else flat, k * cfg.latent_dim))

    dec: list[nn.Module] = [nn.Linear(cfg.latent_dim + cond, flat), nn.ReLU(),
                            nn.Unflatten(1, (prev, *sizes[-1]))]
    for i, c in enumerate(reversed(chans)):  # each transposed conv doubles the size back exactly
        target = sizes[len(chans) - 1 - i]
        pad = (1 - target[0] % 2, 1 - target[1] % 2)
        dec += [ConvTranspose2d(prev, c, 3, stride=2, padding=1, output_padding=pad), nn.ReLU()]
        prev = c
    dec.append(ConvTranspose2d(prev, c_in, 3, stride=1, padding=1))  # the output layer, no activation
    return nn.Sequential(*enc), nn.Sequential(*dec), (cfg.latent_dim,)


def _conv_pool(cfg, k: int):
    c_in, h, w = cfg.input_shape
    cond = cfg.condition_dim
    chans = list(cfg.channels)
    sizes = _sizes(h, w, len(chans))
    enc: list[nn.Module] = []
    prev = c_in + cond
    for c in chans:  # (B, prev, H, W) -> (B, c, ceil(H/2), ceil(W/2))
        # conv, ReLU, pool as the tutorial, with ReLU moved after the pool: ReLU is monotonic, so
        # max(relu(.)) = relu(max(.)) exactly (values and gradients), and it touches 4x fewer values
        enc += [nn.Conv2d(prev, c, 3, padding=1), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU()]
        prev = c
    latent_shape = (prev, *sizes[-1])
    if k != 1:  # a probabilistic latent map: a 1x1 conv head emits k maps per latent channel
        enc.append(nn.Conv2d(prev, k * prev, 1))
    dec: list[nn.Module] = []
    prev += cond
    for i, c in enumerate(reversed(chans)):  # conv at the latent's size, then (upsample, conv) pairs
        conv = nn.Conv2d(prev, c, 3, padding=1) if i == 0 else UpsampleConv2d(prev, c, sizes[len(chans) - i])
        dec += [conv, nn.ReLU()]
        prev = c
    dec.append(UpsampleConv2d(prev, c_in, sizes[0]))  # the output layer, no activation
    return nn.Sequential(*enc), nn.Sequential(*dec), latent_shape


class Conv2d(nn.Conv2d):
    """nn.Conv2d; under bf16 autocast on a CPU a stride-2 3x3 one takes its weight gradient from one GEMM.

    oneDNN's bf16 backward-weights kernel is the slow part of a bf16 step on AVX-512 BF16 CPUs (2x its
    fp32 counterpart); gathering the 9 strided taps and multiplying once is faster: the seed VAE's bf16
    training step 23.0 -> 18.0 s per epoch. fp32 (where oneDNN's kernel wins) and GPUs keep the native path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _gemm_weight_grad(self, x):
            return _StridedConvBF16.apply(*_bf16(x, self.weight, self.bias), False, None)
        return super().forward(x)


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with the bf16 weight gradient of `Conv2d` above for stride 2, 3x3, and, on a CPU,
    a 3x3 stride-1 layer with few output channels (an image's output layer) computed as one GEMM."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is None and _gemm_weight_grad(self, x):
            return _StridedConvBF16.apply(*_bf16(x, self.weight, self.bias), True, self.output_padding)
        if output_size is None and _narrow(self, x):
            dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else x.dtype
            return _NarrowConvTranspose.apply(x.to(dtype), self.weight.to(dtype), self.bias)
        return super().forward(x, output_size)


_NARROW = 4  # the most output channels _NarrowConvTranspose computes (measured: a single output channel). The
# seed AE's sub-pixel output layer (4 channels at 14x14) is 2 ms slower that way than oneDNN's: not used there


def _plain_3x3(conv, stride: tuple[int, int]) -> bool:
    """A 3x3 (transposed) convolution with this stride, padding 1, no dilation or groups, and a bias."""
    return (conv.kernel_size == (3, 3) and conv.stride == stride and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None)


def _narrow(conv, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and conv.out_channels <= _NARROW and _plain_3x3(conv, (1, 1))
            and conv.output_padding == (0, 0) and x.dtype in (torch.float32, torch.bfloat16))


class _NarrowConvTranspose(torch.autograd.Function):
    """A 3x3, stride-1, padding-1 transposed convolution to O <= 4 channels as one GEMM and nine shifted adds.

    oneDNN computes a convolution with a single output channel at 12 GFLOP/s here (the seed VAE's output
    layer, batch 128: 4.9 ms forward, 7.4 ms with backward). Here every tap's contribution is one GEMM of the
    pixels' channel vectors, (B H W, C) @ (C, 9 O), and the output is the sum of the nine tap maps, each
    shifted by its offset. In bf16 the backward is two GEMMs on the nine shifted copies of the output
    gradient; in fp32 oneDNN's own backward kernel, which is fast. Same function, fp32 accumulation. Measured
    on the seed VAE (steps interleaved in one process, median of 12 rounds): forward 4.9 -> 1.5 ms, training
    step 49.3 -> 46.6 ms (fp32) and 31.2 -> 30.4 ms (bf16). The output is fp32: it is the decoder's logits,
    which the loss takes in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (B, C, H, W), weight (C, O, 3, 3) -> (B, O, H, W) fp32
        b, c, h, w = x.shape
        o = weight.shape[1]
        cols = -(-9 * o // 16) * 16  # GEMM columns rounded up to 16: MKL's fp32 kernel is 3x faster at 16 than at 9
        wm = x.new_zeros(c, cols)
        wm[:, :9 * o] = weight.permute(0, 2, 3, 1).reshape(c, 9 * o)  # column (3 ky + kx) O + o
        xs = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # a view for channels-last x
        taps = (xs @ wm).view(b, h, w, cols)
        # y[i, j] = sum over taps of taps_k[i + 1 - ky, j + 1 - kx]: tap k's map lands shifted by (ky, kx)
        # in a frame padded by one pixel
        out = torch.zeros(b, h + 2, w + 2, o, dtype=torch.float32)
        for k in range(9):
            ky, kx = divmod(k, 3)
            out[:, ky:ky + h, kx:kx + w] += taps[..., k * o:(k + 1) * o]
        out = out[:, 1:h + 1, 1:w + 1] + bias.float()
        ctx.save_for_backward(xs, wm)
        ctx.shape = (b, c, h, w, o)
        return out.permute(0, 3, 1, 2)  # (B, O, H, W), channels-last memory

    @staticmethod
    def backward(ctx, grad):  # grad (B, O, H, W)
        xs, wm = ctx.saved_tensors
        b, c, h, w, o = ctx.shape
        if xs.dtype == torch.float32:  # oneDNN's fp32 backward is the faster one: only its forward is slow
            x = xs.view(b, h, w, c).permute(0, 3, 1, 2)
            weight = wm[:, :9 * o].reshape(c, 3, 3, o).permute(0, 3, 1, 2)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                grad.to(x.dtype), x, weight, [o], [1, 1], [1, 1], [1, 1], True, [0, 0], 1,
                [ctx.needs_input_grad[0], True, True])
            return gx, gw, gb
        g = F.pad(grad.permute(0, 2, 3, 1).to(xs.dtype), (0, 0, 1, 1, 1, 1))  # (B, H + 2, W + 2, O)
        # d loss / d taps_k[p, q] = grad[p + ky - 1, q + kx - 1]: the nine shifted copies side by side
        gt = g.new_zeros(b, h, w, wm.shape[1])
        for k in range(9):
            ky, kx = divmod(k, 3)
            gt[..., k * o:(k + 1) * o] = g[:, ky:ky + h, kx:kx + w]
        gt = gt.view(b * h * w, -1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (gt @ wm.t()).view(b, h, w, c).permute(0, 3, 1, 2)  # channels-last (B, C, H, W)
        grad_w = (xs.t() @ gt)[:, :9 * o].float().view(c, 3, 3, o).permute(0, 3, 1, 2)
        return grad_x, grad_w, grad.sum((0, 2, 3))


def _gemm_weight_grad(conv, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and _plain_3x3(conv, (2, 2))
            and torch.is_grad_enabled())


def _bf16(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(torch.bfloat16) for t in tensors)  # what autocast would pass the convolution


def _tap_product(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """sum over b, p of small[b, :, p] (x) big[b, :, 2p + k - 1] for the 9 taps k of a 3x3 window:
    (C_small, 9 * C_big), tap-major, which is a channels-last 3x3 weight's memory layout.

    The 9 taps of `big` are copied side by side (im2col) and multiplied once. The copy is 2.25x the size
    of `big`, so it is made for a few images at a time (about 4 MiB each) that stay in cache for the GEMM
    which reads them back: the seed VAE's last transposed conv, 5.7 -> 4.2 ms with cold caches.
    """
    b, c_small, h, w = small.shape
    c_big = big.shape[1]
    chunk = max(1, (4 << 20) // (h * w * 9 * c_big * big.element_size()))
    total = None
    for s in range(0, b, chunk):
        # (n, H + 2, W + 2, C_big): zero-padded, channels last
        padded = F.pad(big[s:s + chunk].permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()
        s_b, s_h, s_w, s_c = padded.stride()
        # (n, h, w, ky, kx, C_big) = padded[n, 2p + ky, 2q + kx, c], a view; H >= 2h - 1 keeps it inside
        taps = padded.as_strided((padded.shape[0], h, w, 3, 3, c_big), (s_b, 2 * s_h, 2 * s_w, s_h, s_w, s_c))
        part = small[s:s + chunk].permute(0, 2, 3, 1).reshape(-1, c_small).t() @ taps.reshape(-1, 9 * c_big)
        # chunks of a bf16 product add up in fp32
        total = part if total is None else total.to(torch.promote_types(total.dtype, torch.float32)).add_(part)
    return total


class _StridedConvBF16(torch.autograd.Function):
    """A stride-2, padding-1 3x3 (transposed) convolution whose weight gradient is `_tap_product`."""

    @staticmethod
    def forward(ctx, x, weight, bias, transposed: bool, output_padding):
        ctx.save_for_backward(x, weight)
        ctx.transposed = transposed
        if transposed:  # (B, C_in, h, w) -> (B, C_out, 2h - 1 + output_padding, ...)
            return F.conv_transpose2d(x, weight, bias, 2, 1, output_padding)
        return F.conv2d(x, weight, bias, 2, 1)  # (B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.transposed:  # the adjoint of a transposed convolution is the convolution
            if ctx.needs_input_grad[0]:
                grad_x = F.conv2d(grad, weight, None, 2, 1)
            grad_w = _tap_product(x, grad)  # (C_in, 9 C_out)
        else:
            if ctx.needs_input_grad[0]:
                pad = (x.shape[2] + 1 - 2 * grad.shape[2], x.shape[3] + 1 - 2 * grad.shape[3])
                grad_x = F.conv_transpose2d(grad, weight, None, 2, 1, pad)
            grad_w = _tap_product(grad, x)  # (C_out, 9 C_in)
        # (C0, 9 C1) is the memory of a channels-last (C0, C1, 3, 3) weight
        grad_w = grad_w.view(weight.shape[0], 3, 3, weight.shape[1]).permute(0, 3, 1, 2)
        return grad_x, grad_w, grad.sum((0, 2, 3)), None, None


class UpsampleConv2d(nn.Conv2d):
    """Nearest-neighbour upsampling to `size`, then a 3x3 "same" convolution (Keras' UpSampling2D +
    Conv2D), with exactly the parameters of that Conv2d.

    For an exact 2x upsampling the upsampled map is never built. Each of the four output phases (a, b)
    (even/odd row, even/odd column) of the 2x grid is a 3x3 convolution of the small input whose taps are
    sums of the original taps that land on the same input pixel; one convolution computes all four phases
    as 4x the channels, which are then interleaved into the 2x grid (sub-pixel convolution, Shi et al.
    2016, https://arxiv.org/abs/1609.05158). Same function, same gradients (up to float rounding), same
    FLOPs on a 4x smaller grid, and no (B, C, 2H, 2W) intermediate. Measured on the seed AE's output layer
    (batch 256, forward + backward): 22.7 -> 6.5 ms.
    """

    # _PHASE[a][u][k] = 1 where tap k (0..2) of the 3x3 kernel, at output phase a (0 even, 1 odd), reads
    # input offset u - 1: output row 2i reads input rows (i-1, i, i), output row 2i+1 reads (i, i, i+1)
    _PHASE = (((1, 0, 0), (0, 1, 1), (0, 0, 0)),
              ((0, 0, 0), (1, 1, 0), (0, 0, 1)))

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int]):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out, *size)
        b, _, h, w = x.shape
        if self.size != (2 * h, 2 * w):  # odd target sizes: upsample explicitly
            return super().forward(F.interpolate(x, size=self.size, mode="nearest"))
        phase = self.weight.new_tensor(self._PHASE)
        weight = torch.einsum("auk,bvl,oikl->aboiuv", phase, phase, self.weight)  # (2, 2, out, in, 3, 3)
        weight = weight.reshape(-1, *self.weight.shape[1:]).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, weight, self.bias.repeat(4), padding=1)  # (B, 4 * out, H, W), channel (2a + b) * out + o
        # interleave the phases: in channels-last memory y is (B, H, W, a, b, out) and the output is
        # (B, H, a, W, b, out); moving whole runs of `out` channels is 3x faster than pixel_shuffle here
        y = y.permute(0, 2, 3, 1).reshape(b, h, w, 2, 2, -1).transpose(2, 3)  # (B, H, a, W, b, out)
        return y.reshape(b, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)  # (B, out, 2H, 2W), channels-last

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, upsample_to={self.size}"


def _mlp(cfg, k: int):
    shape = tuple(cfg.input_shape)
    d = math.prod(shape)
    cond = cfg.condition_dim
    d_in = d + cond * (math.prod(shape[1:]) if len(shape) == 3 else 1)  # condition channels or features
    hidden = list(cfg.hidden)
    enc = [nn.Flatten()] + _dense([d_in, *hidden]) + [nn.Linear(hidden[-1] if hidden else d_in,
                                                                k * cfg.latent_dim)]
    rev = hidden[::-1]
    z_in = cfg.latent_dim + cond
    dec = _dense([z_in, *rev]) + [nn.Linear(rev[-1] if rev else z_in, d), nn.Unflatten(1, shape)]
    return nn.Sequential(*enc), nn.Sequential(*dec), (cfg.latent_dim,)


def _init_like_keras(net: nn.Module) -> None:
    # Glorot-uniform weights and zero biases, as the tutorial's Keras layers: the presets then start
    # where the tutorial starts (PyTorch's default init is smaller and trains these nets more slowly).
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
