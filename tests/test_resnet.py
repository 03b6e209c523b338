"""arch resnet (models/resnet.py): residual encoders and decoders for every model that takes an arch, at 16 to
128 px and 1, 3 or 4 channels, under every likelihood's parameter count; its GroupNorm groups, its residual block
in closed form, a saved run that reloads, a short real training run on the emoji images, and the errors of the
configurations it cannot build.

The emoji images (64x64 RGB) come from the shared data folder, VAELAB_TEST_DATA (default ../shared/data).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vaelab.config import PRESETS, ModelConfig
from vaelab.data import load_dataset
from vaelab.errors import ConfigError
from vaelab.evaluation import evaluate
from vaelab.models import MODELS, build_model, from_pretrained
from vaelab.models.kernels import Conv2d, UpsampleConv2d
from vaelab.models.registry import model_class
from vaelab.models.resnet import ResidualBlock, groups
from vaelab.training import fit

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VAELAB_TEST_DATA") or REPO.parent / "shared" / "data")
TINY = dict(arch="resnet", channels=(4, 8), blocks=(1,), hidden=(), latent_dim=3)
KINDS = sorted(n for n in MODELS if "resnet" in model_class(n).archs)
# a likelihood per channel count, so that the decoder's output width is checked for 1, 2 and 15 parameters
LIKELIHOOD = {1: "bernoulli", 3: "discretized-logistic", 4: "discretized-gaussian"}
PARAMS = {"bernoulli": 1, "discretized-gaussian": 2, "discretized-logistic": 15}  # 3 per logistic, 5 logistics


def _tiny(model: str, likelihood: str = "bernoulli", **changes) -> ModelConfig:
    cond = 3 if model_class(model).capabilities.conditional else 0
    return ModelConfig(model=model, likelihood=likelihood, condition_dim=cond, **{**TINY, **changes})


def _batch(shape, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g).float() / 255


def _condition(model, n=2):
    return torch.arange(n) % 3 if model.capabilities.conditional else None


def test_every_built_in_model_that_takes_an_arch_takes_resnet():
    assert {"ae", "vae", "cvae", "hvae", "m2", "vqvae", "btcvae", "dipvae", "factorvae"} <= set(KINDS)


# ----------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [16, 28, 32, 64, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_for_every_model_size_and_channel_count(kind, size):
    for c in (1, 3, 4):
        likelihood = LIKELIHOOD[c]
        torch.manual_seed(0)
        model = build_model(_tiny(kind, likelihood), input_shape=(c, size, size))
        x, cond = _batch((c, size, size)), _condition(model)
        out = model(x, cond)
        assert tuple(out.recon.shape) == (2, PARAMS[likelihood] * c, size, size)
        grid = (size // 4, size // 4)  # two levels halve twice
        # the two-layer models' latent is their top layer: hvae's z2 (half of latent_dim), m1m2's M2 latent
        latent = ((3, *grid) if model.capabilities.discrete else (1,) if kind == "hvae" else
                  (model.settings.m2_latent,) if kind == "m1m2" else (3,))
        assert tuple(model.latent_shape) == latent
        assert tuple(out.z.shape) == (2, *latent)
        terms = model.loss(x, out)
        assert terms["loss"].shape == (2,) and torch.isfinite(terms["loss"]).all()
        assert model.reconstruct(x, cond).shape == x.shape


def test_each_level_halves_then_doubles_the_feature_maps_exactly():
    model = build_model(ModelConfig(model="vqvae", arch="resnet", channels=(4, 8, 16), blocks=(1, 0, 2),
                                    latent_dim=5), input_shape=(3, 64, 48))
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, tuple(o.shape[1:]))))
             for m in model.modules() if isinstance(m, (Conv2d, UpsampleConv2d))]
    model(_batch((3, 64, 48)))
    for h in hooks:
        h.remove()
    assert seen == [("Conv2d", (4, 32, 24)), ("Conv2d", (8, 16, 12)), ("Conv2d", (16, 8, 6)),
                    ("UpsampleConv2d", (8, 16, 12)), ("UpsampleConv2d", (4, 32, 24)), ("UpsampleConv2d", (4, 64, 48))]
    assert model.latent_shape == (5, 8, 6)
    # blocks (1, 0, 2): one residual block at level 0, none at level 1, two at level 2, in each network
    for net in (model.encoder, model.decoder):
        assert sum(isinstance(m, ResidualBlock) for m in net) == 3
    widths = [m.conv1.out_channels for m in model.encoder if isinstance(m, ResidualBlock)]
    assert widths == [4, 16, 16]


def test_a_cvae_takes_its_condition_as_input_channels_and_latent_features():
    model = build_model(_tiny("cvae"), input_shape=(3, 16, 16))
    assert model.encoder[0].in_channels == 3 + 3  # the stem sees the image and 3 one-hot channels
    assert model.decoder[0].in_features == 3 + 3  # the first dense layer sees z and the one-hot label
    x = _batch((3, 16, 16))
    a, b = model.reconstruct(x, torch.tensor([0, 0])), model.reconstruct(x, torch.tensor([1, 1]))
    assert not torch.equal(a, b)  # the condition acts


# ------------------------------------------------------------------------------------------- GroupNorm


def test_group_count_is_the_largest_power_of_two_up_to_32_dividing_the_width():
    for width in range(1, 300):
        g = groups(width)
        assert width % g == 0 and g <= 32 and g & (g - 1) == 0
        assert g == 32 or width % (2 * g) != 0  # no larger power of two <= 32 divides it
    assert [groups(w) for w in (1, 3, 4, 12, 48, 64, 96, 100, 256)] == [1, 1, 4, 4, 16, 32, 32, 4, 32]


@pytest.mark.parametrize("channels", [(4, 8), (12, 48), (3, 5, 7), (64, 128)])
def test_every_group_norm_of_a_network_divides_its_width(channels):
    model = build_model(ModelConfig(model="vae", arch="resnet", channels=channels, hidden=()),
                        input_shape=(3, 32, 32))
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 2 * (2 * 2 * len(channels) + 1)  # 2 blocks per level of 2 norms, one final norm; x2 nets
    for m in norms:
        assert m.num_channels % m.num_groups == 0 and m.num_groups == groups(m.num_channels)


@pytest.mark.parametrize("name, size", [("resnet-32", 32), ("resnet-64", 64), ("vqvae-resnet-64", 64)])
def test_colour_presets_build_with_32_groups_and_the_8_bit_likelihood(name, size):
    preset = PRESETS[name]
    model = build_model(preset.model, input_shape=(3, size, size))
    assert model.arch == "resnet" and model.config.likelihood == "discretized-logistic"
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {32}
    assert model.latent_shape == {"resnet-32": (128,), "resnet-64": (128,), "vqvae-resnet-64": (64, 16, 16)}[name]
    x = _batch((3, size, size))
    assert model(x).recon.shape == (2, 45, size, size)  # 5 logistics x 3 parameters per sub-pixel


# --------------------------------------------------------------------------------- the residual block


def test_residual_block_is_the_identity_when_its_last_conv_is_zero():
    block = ResidualBlock(8, 8)
    nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(block.conv2.bias)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(block(x), x)


def test_residual_block_matches_its_formula():
    torch.manual_seed(0)
    block = ResidualBlock(4, 8)  # a width change: a 1x1 conv on the skip path
    x = torch.randn(2, 4, 6, 6)
    h = block.conv1(torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4, block.norm1.weight,
                                                                           block.norm1.bias)))
    h = block.conv2(torch.nn.functional.silu(torch.nn.functional.group_norm(h, 8, block.norm2.weight,
                                                                           block.norm2.bias)))
    assert torch.allclose(block(x), block.skip(x) + h, atol=1e-6)
    assert isinstance(block.skip, nn.Conv2d) and block.skip.kernel_size == (1, 1)


def test_a_samples_output_does_not_depend_on_its_batch():
    # GroupNorm normalizes within a sample: unlike batch norm, evaluation sees the function training saw
    model = build_model(_tiny("vae"), input_shape=(3, 32, 32)).train()
    x = _batch((3, 32, 32), n=4)
    together = model.reconstruct_raw(x)
    alone = torch.cat([model.reconstruct_raw(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)


# ------------------------------------------------------------------------------- real data and a saved run


@functools.cache
def _emoji_splits():
    return load_dataset(DATA / "emoji")


def _emoji(n_train=128, n_test=64):
    folder = DATA / "emoji"
    if not (folder / "train").is_dir():
        pytest.skip(f"the emoji images are absent from {folder}; set VAELAB_TEST_DATA")
    data = _emoji_splits()
    g = torch.Generator().manual_seed(0)
    return (data.train.subset(torch.randperm(len(data.train), generator=g)[:n_train]),
            data.test.subset(torch.arange(n_test)))


def test_a_short_emoji_run_learns_the_images(tmp_path):
    train, test = _emoji()
    assert train.sample_shape == (3, 64, 64) and len(train) == 128
    config = ModelConfig(model="vae", arch="resnet", channels=(8, 16, 32), blocks=(1,), hidden=(), latent_dim=16,
                         likelihood="discretized-logistic", mixtures=2)
    torch.manual_seed(0)
    model = build_model(config, input_shape=train.sample_shape)
    before = evaluate(model, test, latent=False)["bits_per_dim"]
    start = time.perf_counter()
    history = fit(model, train, test, epochs=4, batch_size=16, lr=2e-3, progress=False)
    seconds = time.perf_counter() - start
    after = evaluate(model, test, latent=False)["bits_per_dim"]
    assert len(history) == 4 and seconds < 60
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # 32 steps take the test split's bits per sub-pixel well down (a flat logistic mixture at the start)
    assert after < before - 0.75, (before, after)  # 5.75 -> 4.71 bits here


@pytest.mark.parametrize("kind", ["vae", "cvae", "vqvae", "m2"])
def test_a_saved_emoji_run_reloads_exactly(kind, tmp_path):
    train, test = _emoji(n_train=32, n_test=8)
    extra = {"codebook_size": 16} if kind == "vqvae" else {"condition_dim": 9} if kind in ("cvae", "m2") else {}
    config = ModelConfig(model=kind, arch="resnet", channels=(4, 8), blocks=(1, 2), hidden=(8,), latent_dim=4,
                         likelihood="discretized-logistic", mixtures=1, **extra)
    torch.manual_seed(0)
    model = build_model(config, input_shape=train.sample_shape)
    fit(model, train, test, epochs=1, batch_size=16, progress=False, out=tmp_path / "run")
    loaded = from_pretrained(tmp_path / "run")
    assert loaded.arch == "resnet" and type(loaded) is type(model)
    assert loaded.config.blocks == (1, 2) and loaded.config.channels == (4, 8)
    assert loaded.latent_shape == model.latent_shape
    state, again = model.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    x = test.batch(torch.arange(8))
    cond = test.y[:8] if model.capabilities.conditional else None
    assert torch.equal(model.eval().reconstruct(x, cond), loaded.eval().reconstruct(x, cond))


# ---------------------------------------------------------------------------------------------- errors


def test_an_image_size_that_does_not_divide_by_two_to_the_levels_says_what_to_do():
    config = ModelConfig(model="vae", arch="resnet", channels=(8, 16, 32, 64))
    with pytest.raises(ConfigError) as e:
        build_model(config, input_shape=(3, 60, 60))
    assert e.value.problems == [
        "input_shape=(3, 60, 60): arch='resnet' halves H and W at each of its 4 levels (channels=[8, 16, 32, 64]), "
        "so H and W must be multiples of 2^4 = 16, got 60 x 60; resize the images to a multiple of 16 (e.g. "
        "--image-size 64) or use at most 2 levels (channels with 2 entries)"]
    with pytest.raises(ConfigError) as e:
        build_model(config.replace(channels=(8,)), input_shape=(1, 27, 28))
    assert e.value.problems == [
        "input_shape=(1, 27, 28): arch='resnet' halves H and W at each of its 1 levels (channels=[8]), so H and W "
        "must be multiples of 2^1 = 2, got 27 x 28; resize the images to a multiple of 2 (e.g. --image-size 28) "
        "(no level count fits an odd size)"]


def test_impossible_resnet_configs_are_reported_together():
    with pytest.raises(ConfigError) as e:
        ModelConfig(model="vae", arch="resnet", channels=(8, 16, 32), blocks=(1, 2)).validate()
    assert e.value.problems == ["blocks=[1, 2] must have one entry (the same at every level) or one per channels "
                                "entry (3: channels=[8, 16, 32])"]
    with pytest.raises(ConfigError) as e:
        ModelConfig(model="vae", arch="resnet", channels=(), blocks=(-1,)).validate()
    assert e.value.problems == ["arch='resnet' needs at least one entry in channels",
                                "blocks=[-1] must be a list of integers >= 0 (residual blocks per level of arch "
                                "'resnet')"]
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(model="ae", arch="resnet"), input_shape=(10,))
    assert e.value.problems == ["arch='resnet' needs image input (C, H, W), got input_shape=(10,); use arch='mlp' "
                                "for vectors"]
    assert ModelConfig(blocks=3).blocks == (3,)  # one count for every level


def test_cli_refuses_a_size_the_levels_do_not_divide_without_a_traceback(tmp_path):
    # scikit-learn's 8x8 digits (offline) through 4 levels: 8 is no multiple of 2^4
    r = subprocess.run([sys.executable, "-m", "vaelab", "train", "--dataset", "digits", "--arch", "resnet",
                        "--channels", "4,8,8,8", "--blocks", "1", "--epochs", "1", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "input_shape=(1, 8, 8): arch='resnet' halves H and W at each of its 4 levels" in r.stderr
    assert "must be multiples of 2^4 = 16, got 8 x 8; resize the images to a multiple of 16 (e.g. --image-size 16)" \
        " or use at most 3 levels (channels with 3 entries)" in r.stderr
