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
from vaelab.models.nets import ConvTranspose2d, UpsampleConv2d, _StridedConvBF16
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
    cond = {"condition_dim": 10} if MODELS[name].cls.conditional else {}
    model = build_model(model=name, channels=(8, 8), hidden=(16,), input_shape=digits.train.sample_shape, **cond)
    history = fit(model, digits.train, digits.test, epochs=3, batch_size=64, progress=False, precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(isinstance(v, float) for v in history[-1].values() if not isinstance(v, int))


def test_model_output_float_upcasts_every_tensor():
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 8, 8))
    assert out.recon.dtype == torch.bfloat16
    f = out.float()
    assert {f.recon.dtype, f.z.dtype, f.posterior.mean.dtype, f.posterior.logvar.dtype} == {torch.float32}


def test_allocator_setting_is_idempotent():
    assert keep_freed_memory() is keep_freed_memory()
