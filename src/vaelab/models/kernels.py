"""The CPU speed kernels of the conv networks (models/nets.py): layer classes that subclass torch.nn's
conv layers, and the autograd Functions and helpers behind them.

Why they exist: on a CPU a few of the networks' convolutions run far slower in oneDNN's general kernels
than their FLOPs warrant. Each layer class here sends exactly those cases to a formulation the CPU runs
well (one large GEMM, no needless intermediate tensor) and leaves every other case to its torch.nn parent:
- `Conv2d`, `ConvTranspose2d`: under bf16 autocast on a CPU, the weight gradient of a stride-2 3x3
  (transposed) convolution is one GEMM over its 9 strided taps (`_StridedConvBF16`, `_tap_product`), since
  oneDNN's bf16 backward-weights kernel is much slower than its fp32 one; and a 3x3 stride-1 transposed
  convolution to a few output channels (an image decoder's output layer) is one GEMM and nine shifted adds
  (`_NarrowConvTranspose`), since oneDNN runs a convolution with so few output channels far below the
  CPU's GEMM rate.
- `UpsampleConv2d`: nearest-neighbour 2x upsampling and a 3x3 convolution as one sub-pixel convolution on
  the small grid, so the upsampled map is never built.
- `ConvDecoder`: a conv decoder's nn.Sequential whose inference under bf16 autocast on a CPU (the likelihood's
  bf16 decodings) runs each stride-2 transposed convolution as one 2x2 sub-pixel convolution with its ReLU fused,
  and the output layer on the last layer's phases, since oneDNN's bf16 transposed convolution runs far below
  the rate of an ordinary convolution.

Every layer class keeps its torch.nn parent's parameters (names, shapes), so state dicts and checkpoints
are those of the plain layers, and computes the same function (up to float rounding; sums accumulate in
fp32). GPUs and every case not listed above (such as the stride-2 weight gradient in fp32, where oneDNN's
own kernel is the faster one) take the native path.
The measurements behind these choices are in benchmarks/README.md, "Measurements behind the code's speed
choices".
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


class Conv2d(nn.Conv2d):
    """nn.Conv2d; under bf16 autocast on a CPU a stride-2 3x3 one takes its weight gradient from one GEMM.

    oneDNN's bf16 backward-weights kernel is the slow part of a bf16 step on AVX-512 BF16 CPUs (much slower
    than its fp32 counterpart); gathering the 9 strided taps and multiplying once is faster, which speeds
    up the whole bf16 training step. fp32 (where oneDNN's kernel wins) and GPUs keep the native path.
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


_NARROW = 4  # the most output channels _NarrowConvTranspose computes (measured faster: a single output
# channel). The seed AE's sub-pixel output layer (4 channels at 14x14) is slower that way than oneDNN's: not
# used there


def _plain_3x3(conv, stride: tuple[int, int]) -> bool:
    """A 3x3 (transposed) convolution with this stride, padding 1, no dilation or groups, and a bias."""
    return (conv.kernel_size == (3, 3) and conv.stride == stride and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.bias is not None)


def _narrow(conv, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and conv.out_channels <= _NARROW and _plain_3x3(conv, (1, 1))
            and conv.output_padding == (0, 0) and x.dtype in (torch.float32, torch.bfloat16))


class _NarrowConvTranspose(torch.autograd.Function):
    """A 3x3, stride-1, padding-1 transposed convolution to O <= 4 channels as one GEMM and nine shifted adds.

    oneDNN computes a convolution with a single output channel at a small fraction of the CPU's GEMM rate
    (the seed VAE's output layer is such a convolution). Here every tap's contribution is one GEMM of the
    pixels' channel vectors, (B H W, C) @ (C, 9 O), and the output is the sum of the nine tap maps, each
    shifted by its offset. In bf16 the backward is two GEMMs on the nine shifted copies of the output
    gradient; in fp32 oneDNN's own backward kernel, which is fast. Same function, fp32 accumulation; the
    forward and the training step (fp32 and bf16) are faster. The output is fp32: it is the decoder's
    logits, which the loss takes in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # x (B, C, H, W), weight (C, O, 3, 3) -> (B, O, H, W) fp32
        b, c, h, w = x.shape
        o = weight.shape[1]
        cols = -(-9 * o // 16) * 16  # GEMM columns rounded up to 16: MKL's fp32 GEMM is far faster at 16 than at 9
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
    which reads them back, rather than written to memory whole and read back from it.
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
    FLOPs on a 4x smaller grid, and no (B, C, 2H, 2W) intermediate to write, read back and differentiate
    through.
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
        # interleave the phases; moving whole runs of `out` channels is much faster than pixel_shuffle here
        return _interleaved(y).reshape(b, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)  # (B, out, 2H, 2W), channels-last

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, upsample_to={self.size}"


class ConvDecoder(nn.Sequential):
    """The layers of a conv decoder (models/nets.py) as an nn.Sequential whose inference under bf16 autocast on
    a CPU runs the transposed convolutions as sub-pixel convolutions.

    Such a decoder is dense layers, 3x3 stride-2 transposed convolutions that double the size exactly, each
    followed by an elementwise activation, and a 3x3 stride-1 output layer. oneDNN runs a stride-2 transposed
    convolution in bf16 far below the rate of an ordinary convolution of the same FLOPs (on an AMX CPU the seed
    VAE's 64 -> 32 layer took 2.5x as long as a 2x2 convolution to 128 channels on its input). Output pixel
    (2i + a, 2j + b) of such a layer reads input pixels (i, j) to (i + 1, j + 1) only, so its four phases (a, b)
    are one 2x2 convolution to four times the channels (sub-pixel convolution, Shi et al. 2016,
    https://arxiv.org/abs/1609.05158) of the input padded by a zero row and column, with the activation applied
    by oneDNN as it writes (a fused post-op for ReLU). The phases are interleaved into the next layer's padded
    input; the last layer's are not interleaved at all: the output layer reads them as one 2x2 convolution on
    the phase grid to four times its few channels, and only those are interleaved.

    Same function: every phase weight is one of the layer's taps or zero, and the sums accumulate in fp32 as
    oneDNN's do; the logits come out in fp32. Training (gradients), fp32, GPUs, odd sizes and any other layer
    sequence take nn.Sequential's path, and the state dict is nn.Sequential's.
    """

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        plan = _phase_plan(self, z)
        if plan is None:
            return super().forward(z)
        start, ups, out = plan
        h = z
        for layer in list(self)[:start]:
            h = layer(h)
        if h.dim() != 4:
            for layer in list(self)[start:]:
                h = layer(h)
            return h
        return _phase_decode(h, ups, out, torch.bfloat16)


# _UP[a][u][k] = 1 where output row 2i + a of a stride-2, padding-1, output-padding-1 transposed convolution reads
# input row i + u through tap k (y[p] = sum of x[i] w[k] over p = 2i + k - 1): 2i from tap 1 at i, 2i + 1 from tap 2
# at i and tap 0 at i + 1
_UP = (((0, 1, 0), (0, 0, 0)), ((0, 0, 1), (1, 0, 0)))
# _OUT[a][e][u][k] = 1 where output row 2i + a of a stride-1 3x3 transposed convolution (y[p] = sum_k x[p + 1 - k]
# w[k]) reads row i + a + u - 1 of phase e of its input (big row 2 (i + a + u - 1) + e) through tap k: a 2x2 window
# over phase rows i - 1, i for a = 0 and i, i + 1 for a = 1, which one 2x2 convolution with padding 1 computes at
# its output rows i and i + 1
_OUT = tuple(tuple(tuple(tuple(int(a + 1 - k == 2 * (a + u - 1) + e) for k in range(3)) for u in range(2))
                   for e in range(2)) for a in range(2))
_ELEMENTWISE = (nn.ReLU, nn.Softplus, nn.Tanh, nn.ELU)  # activations that commute with moving pixels


def _phase_plan(seq: nn.Sequential, z: torch.Tensor):
    """(index of the first transposed convolution, [(stride-2 layer, activation)], output layer) when `seq`
    qualifies for ConvDecoder's sub-pixel inference now, else None."""
    if (z.device.type != "cpu" or torch.is_grad_enabled() or not torch.is_autocast_enabled("cpu")
            or torch.get_autocast_dtype("cpu") != torch.bfloat16):
        return None
    layers = list(seq)
    start = next((i for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose2d)), None)
    if start is None or (len(layers) - start) % 2 != 1:
        return None
    *ups, out = layers[start:]
    pairs = list(zip(ups[0::2], ups[1::2]))
    if not pairs or not (isinstance(out, nn.ConvTranspose2d) and _plain_3x3(out, (1, 1))
                         and out.output_padding == (0, 0)):
        return None
    for conv, act in pairs:
        if not (isinstance(conv, nn.ConvTranspose2d) and _plain_3x3(conv, (2, 2)) and conv.output_padding == (1, 1)
                and type(act) in _ELEMENTWISE):
            return None
    return start, pairs, out


def _phase_decode(h: torch.Tensor, ups, out: nn.ConvTranspose2d, dtype: torch.dtype) -> torch.Tensor:
    """ConvDecoder's layers from the first transposed convolution on h (B, C, h, w): (B, O, 2^n h, 2^n w) fp32
    logits, channels-last. The convolutions run in `dtype` (bf16; the tests also run float64)."""
    b, c, hh, ww = h.shape
    x = _padded(b, hh, ww, c, dtype)
    x[:, :hh, :ww] = h.permute(0, 2, 3, 1)
    for i, (conv, act) in enumerate(ups):
        weight, bias = _phase_weights(conv, _UP, dtype)
        y = _conv_act(x.permute(0, 3, 1, 2), weight, bias, 0, act)  # (B, 4 C', hh, ww): channel (2 a + b) C' + c'
        if i < len(ups) - 1:  # interleave the phases into the next layer's padded input: (B, hh, a, ww, b, C')
            x = _padded(b, 2 * hh, 2 * ww, conv.out_channels, dtype)
            x[:, :2 * hh, :2 * ww].unflatten(1, (hh, 2)).unflatten(3, (ww, 2)).copy_(_interleaved(y))
            hh, ww = 2 * hh, 2 * ww
    # the output layer on the phase grid (input channel (2 e + f) C' + c' is phase (e, f) of channel c'): output
    # phase (a, b) is rows a.. and columns b.. of its channels of one 2x2 convolution with padding 1
    weight, _ = _phase_weights(out, _OUT, dtype)
    o = F.conv2d(y, weight, None, 1, 1).permute(0, 2, 3, 1)  # (B, hh + 1, ww + 1, 4 O)
    n, bias = out.out_channels, out.bias.float()
    logits = torch.empty(b, hh, 2, ww, 2, n, dtype=torch.float32)
    for a in range(2):
        for e in range(2):
            phase = o[:, a:a + hh, e:e + ww, (2 * a + e) * n:(2 * a + e + 1) * n]
            torch.add(phase, bias, out=logits[:, :, a, :, e])
    return logits.view(b, 2 * hh, 2 * ww, n).permute(0, 3, 1, 2)


def _phase_weights(conv: nn.ConvTranspose2d, table, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """conv's weight as the 2x2 phase convolution of `table` (_UP: (4 O, C, 2, 2); _OUT: (4 O, 4 C, 2, 2)), and
    its bias for the 4 phases, in `dtype`: computed once per state of the weights (their version counter)."""
    key = (table is _UP, dtype, _version(conv.weight), conv.weight.data_ptr(), _version(conv.bias))
    cached = conv.__dict__.get("_phase_cache")
    if cached is None or cached[0] != key or None in key:
        cached = (key, _phase_weight(conv.weight.detach().to(dtype), table), conv.bias.detach().to(dtype).repeat(4))
        conv.__dict__["_phase_cache"] = cached
    return cached[1], cached[2]


def _phase_weight(weight: torch.Tensor, table) -> torch.Tensor:
    """A 3x3 transposed convolution's weight (C, O, 3, 3) as the 2x2 convolution of its phases that `table`
    describes: _UP (4 O, C, 2, 2), _OUT (4 O, 4 C, 2, 2); output channel (2 a + b) O + o, channels-last."""
    t = torch.tensor(table, dtype=weight.dtype)
    if table is _UP:  # (a, u, k) x (b, v, l) x (c, o, k, l) -> (a, b, o, c, u, v)
        w = torch.einsum("auk,bvl,cokl->abocuv", t, t, weight)
    else:  # (a, e, u, k) x (b, f, v, l) x (c, o, k, l) -> (a, b, o, e, f, c, u, v)
        w = torch.einsum("aeuk,bfvl,cokl->aboefcuv", t, t, weight)
    return w.reshape(4 * weight.shape[1], -1, 2, 2).contiguous(memory_format=torch.channels_last)


def _interleaved(y: torch.Tensor) -> torch.Tensor:
    """The four phases of a phase-stacked (B, 4 C, h, w) map (channel (2 a + b) C + c, channels-last memory, so
    (B, h, w, a, b, C)) as a (B, h, a, w, b, C) view: the (B, 2h, 2w, C) map they interleave into, once copied."""
    return y.permute(0, 2, 3, 1).unflatten(3, (2, 2, -1)).transpose(2, 3)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
        return None


def _padded(b: int, h: int, w: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, h + 1, w + 1, C) with a zero last row and column; the caller writes the rest."""
    x = torch.empty(b, h + 1, w + 1, c, dtype=dtype)
    x[:, h].zero_()
    x[:, :h, w].zero_()
    return x


def _conv_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int, act: nn.Module):
    """act(conv2d(x)); for ReLU in bf16 or fp32 as one oneDNN convolution with the ReLU fused into it."""
    fused = _fused_conv()
    if type(act) is nn.ReLU and x.dtype in (torch.bfloat16, torch.float32) and fused is not None:
        return fused(x, weight, bias, [padding] * 2, [1, 1], [1, 1], 1, "relu", [], "")
    return act(F.conv2d(x, weight, bias, 1, padding))


@functools.cache
def _fused_conv():
    """torch's oneDNN convolution with a fused activation (what torch.compile's CPU backend calls), or None
    where this torch build lacks it."""
    try:
        return torch.ops.mkldnn._convolution_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None
