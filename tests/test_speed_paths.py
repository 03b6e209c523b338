"""The fast paths compute the same function: sub-pixel upsample-convs, pool-before-ReLU, channels-last weights,
bf16 mixed precision as an option, and the allocator setting."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import TrainConfig
from vaelab.data import load_dataset
from vaelab.errors import ConfigError
from vaelab.models import MODELS, build_model
from vaelab.models.kernels import (ConvDecoder, ConvTranspose2d, UpsampleConv2d, _conv_act, _NarrowConvTranspose,
                                   _phase_decode, _phase_plan, _StridedConvBF16, _tap_product)
from vaelab.training import fit
from vaelab.training.loop import keep_freed_memory


@pytest.mark.parametrize("size", [(14, 14), (8, 12), (7, 7), (5, 8)])
def test_upsample_conv_equals_upsample_then_conv(size):
    torch.manual_seed(0)
    layer = UpsampleConv2d(6, 3, size).double()
    x = torch.randn(4, 6, (size[0] + 1) // 2, (size[1] + 1) // 2, dtype=torch.double, requires_grad=True)
    expected = F.conv2d(F.interpolate(x, size=size, mode="nearest"), layer.weight, layer.bias, padding=1)
    got = layer(x)
    assert got.shape == (4, 3, *size)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, layer.weight, layer.bias), g)
    grads_ref = torch.autograd.grad(expected, (x, layer.weight, layer.bias), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", [5, 6])
def test_strided_conv_gradients_by_gemm_are_exact(size):
    cl = torch.channels_last
    x = torch.randn(2, 2, size, size, dtype=torch.double).contiguous(memory_format=cl).requires_grad_()
    bias = torch.randn(3, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.double).contiguous(memory_format=cl).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _StridedConvBF16.apply(x, w, b, False, None), (x, w, bias))
    wt = torch.randn(2, 3, 3, 3, dtype=torch.double).contiguous(memory_format=cl).requires_grad_()
    for pad in [(1, 1), (0, 0), (1, 0)]:
        assert torch.autograd.gradcheck(lambda x, w, b: _StridedConvBF16.apply(x, w, b, True, pad), (x, wt, bias))


@pytest.mark.parametrize("out_channels, size", [(1, (28, 28)), (3, (5, 8)), (4, (1, 1))])
def test_narrow_output_layer_is_the_transposed_convolution(out_channels, size):
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(6, out_channels, 3, stride=1, padding=1).double()
    x = torch.randn(3, 6, *size, dtype=torch.double, requires_grad=True)
    w, b = ref.weight.detach().requires_grad_(), ref.bias.detach().requires_grad_()
    expected = F.conv_transpose2d(x, w, b, 1, 1)
    got = _NarrowConvTranspose.apply(x, w, b)
    assert got.shape == (3, out_channels, *size)
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)  # fp32 accumulation
    g = torch.randn_like(expected)
    for a, r in zip(torch.autograd.grad(got, (x, w, b), g.float()), torch.autograd.grad(expected, (x, w, b), g)):
        torch.testing.assert_close(a.double(), r, rtol=0, atol=1e-5)


def test_narrow_output_layer_serves_fp32_and_bf16_and_leaves_wide_layers_to_onednn():
    torch.manual_seed(0)
    layer = ConvTranspose2d(8, 1, 3, stride=1, padding=1)
    x = torch.rand(2, 8, 7, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    expected = F.conv_transpose2d(x, layer.weight, layer.bias, 1, 1)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_NarrowConvTransposeBackward" and y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    g = torch.randn_like(y)  # fp32: oneDNN's backward on the GEMM forward's saved tensors
    for a, r in zip(torch.autograd.grad(y, (x, layer.weight, layer.bias), g),
                    torch.autograd.grad(expected, (x, layer.weight, layer.bias), g)):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.float32  # logits accumulated in fp32 from bf16 products
    torch.testing.assert_close(y16, expected, rtol=0, atol=0.05)
    layer.zero_grad()
    y16.sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.shape == layer.weight.shape
    wide = ConvTranspose2d(8, 5, 3, stride=1, padding=1)
    assert type(wide(x).grad_fn).__name__ == "ConvolutionBackward0"


def _decoder(act=nn.ReLU, ups=2, out_channels=1, side=7, pads=(1, 1)):
    """A conv decoder as models/nets.py builds one: dense, then stride-2 transposed convs, then the output layer."""
    chans = [16, 12, 8][:ups]
    layers = [nn.Linear(3, chans[0] * side * side), act(), nn.Unflatten(1, (chans[0], side, side))]
    for c_in, c_out in zip(chans, chans[1:] + [chans[-1]]):
        layers += [ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=pads), act()]
    layers.append(ConvTranspose2d(chans[-1], out_channels, 3, stride=1, padding=1))
    dec = ConvDecoder(*layers)
    for p in dec.parameters():  # biases of the size of the weights, so that a misplaced one shows
        nn.init.normal_(p, std=0.3)
    return dec


@pytest.mark.parametrize("act", [nn.ReLU, nn.ELU, nn.Softplus, nn.Tanh])
@pytest.mark.parametrize("ups, out_channels, side", [(1, 1, 7), (2, 1, 7), (3, 3, 2), (2, 2, 1)])
def test_sub_pixel_decoding_is_the_decoders_function(act, ups, out_channels, side):
    torch.manual_seed(0)
    dec = _decoder(act, ups, out_channels, side).double()
    z = torch.randn(5, 3, dtype=torch.double)
    with torch.no_grad():
        expected = nn.Sequential.forward(dec, z)
        start, pairs, out = _phase_plan_now(dec, z)
        h = nn.Sequential(*list(dec)[:start])(z)
        got = _phase_decode(h, pairs, out, torch.double)
    assert got.shape == expected.shape == (5, out_channels, side * 2 ** ups, side * 2 ** ups)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)  # fp32 logits of a float64 decoding


def _phase_plan_now(dec, z):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return _phase_plan(dec, z)


def test_the_seed_vae_decodes_by_sub_pixel_convolutions_in_bf16_inference_only():
    torch.manual_seed(0)
    model = build_model("seed-vae", input_shape=(1, 28, 28)).eval()
    dec = model.decoder
    assert type(dec) is ConvDecoder and list(dec.state_dict()) == list(nn.Sequential(*dec).state_dict())
    for p in dec.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    z = torch.randn(64, 2) * 2
    with torch.no_grad():
        exact = nn.Sequential.forward(dec, z)  # fp32
        assert torch.equal(dec(z), exact)  # fp32 inference: nn.Sequential's path
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = dec(z)
            onednn = nn.Sequential.forward(dec, z).float()
            start, pairs, out = _phase_plan(dec, z)
            assert start == 3 and len(pairs) == 2 and out is dec[-1]
            assert torch.equal(fast, _phase_decode(dec[:start](z), pairs, out, torch.bfloat16))
    assert fast.dtype == torch.float32 and fast.shape == (64, 1, 28, 28)
    # bf16 rounding either way: the sub-pixel path is as close to the fp32 function as oneDNN's bf16 path
    err, err_onednn = (fast - exact).abs().max().item(), (onednn - exact).abs().max().item()
    assert 0 < err < 0.02 and err < 2 * err_onednn, (err, err_onednn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _phase_plan(dec, z) is None  # gradients on: training takes nn.Sequential's path
        assert type(dec(z).grad_fn).__name__ == "_NarrowConvTransposeBackward"


def test_sub_pixel_decoding_leaves_other_decoders_to_nn_sequential():
    z = torch.randn(2, 3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _phase_plan(_decoder(), z) is not None
        assert _phase_plan(_decoder(pads=(0, 0)), z) is None  # odd sizes: 7 -> 13
        assert _phase_plan(_decoder(nn.Identity), z) is None  # not a known elementwise activation
        assert _phase_plan(ConvDecoder(*list(_decoder())[:-1]), z) is None  # no output layer
        dec = _decoder(pads=(0, 0))
        torch.testing.assert_close(dec(z), nn.Sequential.forward(dec, z))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        assert _phase_plan(_decoder(), z) is None


def test_fused_relu_convolution_is_conv_then_relu():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 9, 9).bfloat16().contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 16, 2, 2).bfloat16().contiguous(memory_format=torch.channels_last)
    b = torch.randn(32).bfloat16()
    fused = _conv_act(x, w, b, 0, nn.ReLU())
    torch.testing.assert_close(fused, F.relu(F.conv2d(x, w, b)))
    assert fused.shape == (4, 32, 8, 8) and fused.min() == 0


@pytest.mark.parametrize("big, small, channels", [(6, 3, 3), (5, 3, 3), (7, 4, 3), (64, 32, 24)])
def test_tap_product_is_the_strided_convolutions_weight_gradient(big, small, channels):
    # the last case is cut into chunks of 2 images (of 3): 32 * 32 * 9 taps * 24 channels * 8 bytes > 4 MiB / 3
    torch.manual_seed(0)
    x = torch.randn(3, channels, big, big, dtype=torch.double).contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 4, small, small, dtype=torch.double)
    w = torch.zeros(4, channels, 3, 3, dtype=torch.double, requires_grad=True)
    (F.conv2d(x, w, None, 2, 1) * g).sum().backward()
    got = _tap_product(g, x).view(4, 3, 3, channels).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, w.grad)


def test_the_gemm_weight_gradient_is_used_under_bf16_autocast_only():
    conv = ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert type(y.grad_fn).__name__ == "_StridedConvBF16Backward" and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and conv.weight.grad.shape == conv.weight.shape
    assert type(conv(x).grad_fn).__name__ == "ConvolutionBackward0"  # fp32: oneDNN's own kernels


def test_conv_pool_encoder_is_the_tutorials_conv_relu_pool():
    model = build_model("seed-conv-ae", input_shape=(1, 28, 28)).double()
    x = torch.rand(3, 1, 28, 28, dtype=torch.double)
    h = x
    for conv in [m for m in model.encoder if isinstance(m, nn.Conv2d)]:  # the Keras order
        h = F.max_pool2d(F.relu(F.conv2d(h, conv.weight, conv.bias, padding=1)), 2, ceil_mode=True)
    torch.testing.assert_close(model.encoder(x), h, rtol=0, atol=0)


def test_conv_weights_are_channels_last_and_save_contiguous(tmp_path):
    model = build_model("seed-vae", input_shape=(1, 28, 28))
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_precision_is_validated():
    with pytest.raises(ConfigError, match="precision='fp16' is unknown"):
        TrainConfig(precision="fp16").validate()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_mixed_precision_trains_every_model_with_fp32_weights(name):
    digits = load_dataset("digits")
    torch.manual_seed(0)
    cond = {"condition_dim": 10} if MODELS[name].cls.capabilities.conditional else {}
    model = build_model(model=name, channels=(8, 8), hidden=(16,), input_shape=digits.train.sample_shape, **cond)
    history = fit(model, digits.train, digits.test, epochs=3, batch_size=64, progress=False, precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(isinstance(v, float) for v in history[-1].values() if not isinstance(v, int))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_validation_runs_in_the_training_precision_and_evaluate_in_fp32(precision):
    from vaelab.evaluation import loss_terms

    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("seed-vae", input_shape=digits.train.sample_shape)
    history = fit(model, digits.train, digits.test, epochs=1, batch_size=64, progress=False, precision=precision)
    val = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")}
    assert val == loss_terms(model, digits.test, batch_size=256, precision=precision)  # the very same numbers
    fp32 = loss_terms(model, digits.test, batch_size=256)
    if precision == "fp32":
        assert val == fp32
    else:  # bf16 keeps 8 bits of mantissa: the loss moves, by well under a percent
        assert val["loss"] != fp32["loss"]
        assert val["loss"] == pytest.approx(fp32["loss"], rel=5e-3)


def test_loss_terms_refuses_an_unknown_precision():
    from vaelab.evaluation import loss_terms

    digits = load_dataset("digits")
    model = build_model("seed-vae", input_shape=digits.train.sample_shape)
    with pytest.raises(ConfigError, match=r"^invalid evaluation: precision='fp16' is unknown; choose one of "
                                          r"\['fp32', 'bf16', 'auto'\]$"):
        loss_terms(model, digits.test, precision="fp16")


def test_model_output_float_upcasts_every_tensor():
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 8, 8))
    assert out.posterior.mean.dtype == torch.bfloat16
    assert out.recon.dtype == torch.float32  # the GEMM output layer accumulates the logits in fp32
    f = out.float()
    assert {f.recon.dtype, f.z.dtype, f.posterior.mean.dtype, f.posterior.logvar.dtype} == {torch.float32}


def test_allocator_setting_is_idempotent():
    assert keep_freed_memory() is keep_freed_memory()
